"""A request's parameters, its lifecycle, how it ends and what each step reports. No torch here.

Lifecycle (one place to read it):

    WAITING ──schedule──> RUNNING ──stop token / string──> FINISHED_STOPPED
       ^                    │  └────max_new_tokens / max_seq_len─> FINISHED_LENGTH
       └─────preempt────────┘
    any unfinished state ──cancel / deadline / unload --force / shutdown──> FINISHED_ABORTED
    any unfinished state ──adapter failed to load, internal error──> FINISHED_ERROR

How it ends travels as enums, never as message text: FinishReason (one spelling from the
engine to the proto's FINISH_REASON_<NAME> to the SDK's FinishReason) and, for ABORTED and
ERROR, an ErrorKind that the API maps to one gRPC status.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from loraplex.engine.logprobs import MAX_LOGPROBS, TokenLogprobs
from loraplex.rules import InvalidFieldError


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens, or the longest sequence the engine holds
    ABORTED = "aborted"  # ended from outside: see its ErrorKind
    ERROR = "error"  # could not run: see its ErrorKind (ends a call with a status, no proto value)


class ErrorKind(enum.StrEnum):
    """Why a request ended ABORTED or ERROR."""

    CANCELLED = "cancelled"  # ABORTED: the caller left (cancel, disconnect, deadline)
    UNLOADED = "unloaded"  # ABORTED: its adapter was unloaded with force
    SHUTDOWN = "shutdown"  # ABORTED: the server is shutting down
    ADAPTER = "adapter"  # ERROR: its adapter could not be loaded
    INTERNAL = "internal"  # ERROR: a bug or device failure in this request

    @property
    def status(self) -> RequestStatus:
        if self in (ErrorKind.ADAPTER, ErrorKind.INTERNAL):
            return RequestStatus.FINISHED_ERROR
        return RequestStatus.FINISHED_ABORTED


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORTED,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}

# Whose a request is: a name the API gives (the tenant's); requests from callers without one
# (library use, a server without tenants, admin tokens) share this name. Parentheses never
# occur in a tenant's name.
ANONYMOUS_TENANT = "(anonymous)"

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_SAMPLES = 16  # n
SEED_MODULUS = 2**63  # seeds are in [0, 2**63)


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of a request with n samples: (seed + index) mod 2**63, so
    sample i of a request seeded s equals a request of one sample seeded s + i."""
    return None if seed is None else (seed + index) % SEED_MODULUS


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding parameters. temperature == 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; N: each sampled token's logprob and the top N (logprobs.py)
    n: int = 1  # samples of the prompt (sample_seed); they share the prompt's KV blocks

    def __post_init__(self) -> None:
        """The sampling ranges: the API relies on these, so each is checked here only."""
        if self.max_new_tokens < 1:
            raise InvalidFieldError("max_new_tokens", f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InvalidFieldError("temperature", f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidFieldError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidFieldError("top_k", f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise InvalidFieldError(
                "repetition_penalty", f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )
        if self.seed is not None and not 0 <= self.seed < SEED_MODULUS:
            raise InvalidFieldError("seed", f"seed must be in [0, 2**63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidFieldError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not 1 <= len(s) <= MAX_STOP_LEN for s in self.stop):
            raise InvalidFieldError("stop", f"stop strings must have 1-{MAX_STOP_LEN} characters")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidFieldError("stop_token_ids", "stop_token_ids must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidFieldError("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not 1 <= self.n <= MAX_SAMPLES:
            raise InvalidFieldError("n", f"n must be in [1, {MAX_SAMPLES}], got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class Request:
    """One generation request and its sequence state, owned by the engine thread."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None
    tenant: str = ANONYMOUS_TENANT  # whose it is (per-tenant quotas, metrics and fair share)
    weight: float = 1.0  # the tenant's share when tenants compete (fair_share.py)
    priority: int = 0  # lower runs first, among the same tenant's requests only
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    # Prefix caching (block_manager.py): the key of the weights its KV is computed under
    # (prefix_cache.py; None: it neither reuses nor offers blocks), its full blocks' chained
    # hashes, how many leading blocks of its table the cache knows, and the prompt tokens its
    # first admission found cached (Usage.cached_prompt_tokens).
    cache_key: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_prompt_tokens: int = 0
    # Sample `index` of a request with n > 1: the samples share request_id; `leader` is
    # sample 0, whose prompt blocks the others wait for and then share (scheduler.py).
    index: int = 0
    leader: Request | None = None
    # The adapter version this request runs with, pinned at admission (reference held).
    adapter: Any = None
    eos_token_ids: frozenset[int] = frozenset()
    generator: Any = None  # torch.Generator, created by the sampler on first use
    detokenizer: Any = None
    scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    num_charged_prompt_tokens: int = 0  # fair share: prompt tokens counted as service (never twice)
    error: str | None = None  # what happened, for the caller (ABORTED and ERROR)
    error_kind: ErrorKind | None = None  # set with error

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_token(self, token: int, now: float, max_seq_len: int) -> tuple[str, RequestStatus | None]:
        """Take a sampled token: (the text it completes, the finished status it ends the request
        with or None). A stop or EOS token ends it STOPPED and adds no text; a stop string, too
        (the detokenizer holds text back until it is sure); max_new_tokens or the engine's
        longest sequence end it LENGTH."""
        if self.first_token_time is None:
            self.first_token_time = now
        self.output_token_ids.append(token)
        stop_token = token in self.params.stop_token_ids or token in self.eos_token_ids
        text = self.detokenizer.add(token, skip=stop_token)
        if stop_token or self.detokenizer.stopped:
            return text, RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= self.params.max_new_tokens or self.num_tokens >= max_seq_len:
            return text, RequestStatus.FINISHED_LENGTH
        return text, None

    def usage(self) -> Usage:
        start = self.scheduled_time or time.monotonic()
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            generated_tokens=len(self.output_token_ids),
            queue_time_s=max(0.0, start - self.arrival_time),
            time_to_first_token_s=None if self.first_token_time is None else self.first_token_time - self.arrival_time,
            cached_prompt_tokens=self.num_cached_prompt_tokens,
        )


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    queue_time_s: float
    time_to_first_token_s: float | None
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's cached_tokens)


@dataclass(frozen=True, slots=True)
class StepStats:
    """What the last step did, for metrics."""

    num_requests: int
    num_tokens: int
    num_adapters: int
    num_preempted: int
    duration_s: float
    num_decodes: int = 0  # requests that computed exactly their last sampled token

    @property
    def pure_decode(self) -> bool:
        return self.num_requests > 0 and self.num_decodes == self.num_requests

    @property
    def pure_prefill(self) -> bool:
        return self.num_requests > 0 and self.num_decodes == 0


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and their text delta."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None  # set when finish_reason is ABORTED or ERROR
    usage: Usage | None = None
    adapter_version: int | None = None  # final output: the adapter version the request ran on
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked for them
    index: int = 0  # which sample of the request (SamplingParams.n)
    tenant: str = ANONYMOUS_TENANT  # the request's tenant (its tokens are counted against it)


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """A finished request, as returned by Engine.generate."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked for them
