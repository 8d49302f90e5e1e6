"""What the SDK returns: plain frozen dataclasses, so callers never touch protobuf types.

finish_reason is a FinishReason, a str enum: `result.finish_reason == "length"` holds, and
the values are the server's own spelling (FINISH_REASON_<NAME> on the wire). An adapter's
tier is "registered" | "host" | "device". Values a newer server adds read as "unknown".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens, or the longest sequence the server holds
    ABORTED = "aborted"  # cancelled, deadline, or adapter unloaded with force
    UNKNOWN = "unknown"  # a reason this SDK does not know (a newer server)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    queue_time_s: float  # arrival to first scheduled
    time_to_first_token_s: float  # arrival to first token (of any sample)
    total_time_s: float
    cached_prompt_tokens: int = 0  # prompt tokens the server's prefix cache held (not computed)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution (before
    repetition penalty, temperature, top-k and top-p), its rank, and the most likely tokens."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token at this position
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; `logprobs=N` of them


@dataclass(frozen=True, slots=True)
class Sample:
    """One of the n samples of a request (GenerateResult.samples)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for with logprobs=N


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """One finished request (Client.generate). text, token_ids and finish_reason are sample
    0's; with n > 1, `samples` has every sample (sample i of a seeded request: seed + i)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage  # with n > 1: the prompt once, the generated tokens of all samples
    adapter_id: str | None  # None: the base model
    adapter_version: int
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for with logprobs=N
    samples: list[Sample] = field(default_factory=list)  # n of them, by index (n = 1: sample 0 only)


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One message of Client.generate_stream: the new text and token ids of an engine step.

    finish_reason is set on the last chunk of each sample, usage on the stream's last chunk
    only (None before). With n > 1, the samples' chunks interleave: `index` tells whose.
    """

    request_id: str
    text: str  # a delta; never a broken character
    token_ids: list[int]  # the new ids only
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for with logprobs=N
    index: int = 0  # which sample (n > 1)


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    """The prompt ids a prompt or a chat makes on the server (Client.tokenize)."""

    token_ids: list[int]
    count: int
    max_model_len: int  # prompt plus generated tokens must fit in it


@dataclass(frozen=True, slots=True)
class AdapterStats:
    requests: int
    host_hits: int
    host_misses: int
    device_hits: int
    device_misses: int
    loads: int
    evictions: int
    last_used_unix: float
    last_load_s: float


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    adapter_id: str
    version: int  # increases when the id is re-loaded with new content
    tier: str  # "registered" | "host" | "device"
    rank: int
    target_modules: list[str]
    host_bytes: int
    pinned: bool
    loading: bool
    error: str | None  # why the adapter could not be loaded, if it could not
    active_requests: int
    content_hash: str
    path: str  # relative to the server's adapter root
    stats: AdapterStats


@dataclass(frozen=True, slots=True)
class UnloadResult:
    adapter_id: str
    aborted_requests: int  # requests ended by force=True


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    model_type: str
    quantization: str
    dtype: str
    device: str
    max_model_len: int
    vocab_size: int
    max_loras: int
    max_lora_rank: int
    max_num_seqs: int
    num_kv_blocks: int
    block_size: int
    server_version: str
    ready: bool
