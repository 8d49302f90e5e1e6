"""Between the SDK's Python values and the generated protobuf messages, in both directions.

The only module besides the clients that touches loraplex_pb2, so the types users see
(types.py) stay plain dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, Unpack

import grpc

from loraplex_client.errors import InvalidRequestError
from loraplex_client.types import (
    AdapterInfo,
    AdapterStats,
    FinishReason,
    GenerateChunk,
    GenerateResult,
    ModelInfo,
    Sample,
    TokenizeResult,
    TokenLogprob,
    UnloadResult,
    Usage,
)
from loraplex_proto.v1 import loraplex_pb2 as pb

_REPEATED = frozenset({"prompt_token_ids", "stop", "stop_token_ids"})

# FINISH_REASON_X on the wire is FinishReason.X (a reason the proto lacks fails here, at import).
_FINISH_REASONS = {
    pb.FinishReason.Value(f"FINISH_REASON_{r.name}"): r for r in FinishReason if r is not FinishReason.UNKNOWN
}

_TIERS = {
    pb.ADAPTER_TIER_REGISTERED: "registered",
    pb.ADAPTER_TIER_HOST: "host",
    pb.ADAPTER_TIER_DEVICE: "device",
}


class GenerateOptions(TypedDict, total=False):
    """Generation keyword arguments, named as the GenerateRequest fields; unset = server default."""

    prompt_token_ids: Sequence[int] | None
    adapter_id: str | None
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: str | Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    repetition_penalty: float | None
    request_id: str | None
    messages: Sequence[Mapping[str, str]] | None
    logprobs: int | None
    n: int | None  # samples of the prompt (1-16); sample i of a seeded request uses seed + i
    priority: int | None  # lower first, among the caller's own requests only (default 0)


def chat_messages(messages: Sequence[Mapping[str, str]]) -> list[pb.ChatMessage]:
    """[{"role": "user", "content": "Hi"}, ...] as proto ChatMessages (the chat template renders them)."""
    out = []
    for i, m in enumerate(messages):
        try:
            out.append(pb.ChatMessage(role=m["role"], content=m["content"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"messages[{i}]: needs a 'role' and a 'content' string ({e!r})"
            ) from e
    return out


def generate_request(prompt: str | None, **options: Unpack[GenerateOptions]) -> pb.GenerateRequest:
    """A GenerateRequest holding only the fields the caller set.

    None leaves a field unset: for the proto's `optional` fields that is what lets the
    server apply its own default, and an explicit 0 (temperature=0, seed=0) still counts
    as set. Values the proto cannot hold raise InvalidRequestError naming the field,
    as the server would.
    """
    stop = options.get("stop")
    if isinstance(stop, str):  # one stop string, not one per character
        stop = [stop]
    unknown = set(options) - set(GenerateOptions.__annotations__)
    if unknown:
        raise TypeError(f"unexpected generation arguments: {', '.join(sorted(unknown))}")
    messages = options.pop("messages", None)
    fields: dict[str, Any] = {"prompt": prompt, **options, "stop": stop}
    request = pb.GenerateRequest()
    if messages is not None:
        request.messages.extend(chat_messages(messages))
    for name, value in fields.items():
        if value is None:
            continue
        try:
            if name in _REPEATED:
                getattr(request, name).extend(value)
            else:
                setattr(request, name, value)
        except (TypeError, ValueError) as e:
            # protobuf's own message ("Value out of range: -1") does not say which field.
            raise InvalidRequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {e}") from e
    return request


def usage(message: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=message.prompt_tokens,
        generated_tokens=message.generated_tokens,
        queue_time_s=message.queue_time_s,
        time_to_first_token_s=message.time_to_first_token_s,
        total_time_s=message.total_time_s,
        cached_prompt_tokens=message.cached_prompt_tokens,
    )


def logprobs(messages: Sequence[pb.TokenLogprob]) -> list[TokenLogprob] | None:
    if not messages:
        return None
    return [
        TokenLogprob(m.token_id, m.logprob, m.rank, [(t.token_id, t.logprob) for t in m.top]) for m in messages
    ]


def tokenize_request(
    prompt: str | None, messages: Sequence[Mapping[str, str]] | None, adapter_id: str | None
) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(
        prompt=prompt or "", messages=chat_messages(messages or ()), adapter_id=adapter_id or ""
    )


def tokenize_result(message: pb.TokenizeResponse) -> TokenizeResult:
    return TokenizeResult(list(message.token_ids), message.count, message.max_model_len)


def _finish_reason(value: int) -> FinishReason:
    return _FINISH_REASONS.get(value, FinishReason.UNKNOWN)


def generate_result(message: pb.GenerateResponse) -> GenerateResult:
    samples = [
        Sample(s.index, s.text, list(s.token_ids), _finish_reason(s.finish_reason), logprobs(s.logprobs))
        for s in message.samples
    ] or [Sample(0, message.text, list(message.token_ids), _finish_reason(message.finish_reason), logprobs(message.logprobs))]
    return GenerateResult(
        request_id=message.request_id,
        text=message.text,
        token_ids=list(message.token_ids),
        finish_reason=_finish_reason(message.finish_reason),
        usage=usage(message.usage),
        adapter_id=message.adapter_id or None,
        adapter_version=message.adapter_version,
        logprobs=logprobs(message.logprobs),
        samples=samples,
    )


def generate_chunk(message: pb.GenerateStreamResponse) -> GenerateChunk:
    unfinished = message.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    return GenerateChunk(
        request_id=message.request_id,
        text=message.text,
        token_ids=list(message.token_ids),
        finish_reason=None if unfinished else _finish_reason(message.finish_reason),
        usage=usage(message.usage) if message.HasField("usage") else None,
        logprobs=logprobs(message.logprobs),
        index=message.index,
    )


def adapter_info(message: pb.AdapterInfo) -> AdapterInfo:
    s = message.stats
    return AdapterInfo(
        adapter_id=message.adapter_id,
        version=message.version,
        tier=_TIERS.get(message.tier, "unknown"),
        rank=message.rank,
        target_modules=list(message.target_modules),
        host_bytes=message.host_bytes,
        pinned=message.pinned,
        loading=message.loading,
        error=message.error or None,
        active_requests=message.active_requests,
        content_hash=message.content_hash,
        path=message.path,
        stats=AdapterStats(
            requests=s.requests,
            host_hits=s.host_hits,
            host_misses=s.host_misses,
            device_hits=s.device_hits,
            device_misses=s.device_misses,
            loads=s.loads,
            evictions=s.evictions,
            last_used_unix=s.last_used_unix,
            last_load_s=s.last_load_s,
        ),
    )


def unload_result(message: pb.UnloadAdapterResponse) -> UnloadResult:
    return UnloadResult(adapter_id=message.adapter_id, aborted_requests=message.aborted_requests)


def model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=message.model,
        model_type=message.model_type,
        quantization=message.quantization,
        dtype=message.dtype,
        device=message.device,
        max_model_len=message.max_model_len,
        vocab_size=message.vocab_size,
        max_loras=message.max_loras,
        max_lora_rank=message.max_lora_rank,
        max_num_seqs=message.max_num_seqs,
        num_kv_blocks=message.num_kv_blocks,
        block_size=message.block_size,
        server_version=message.server_version,
        ready=message.ready,
    )
