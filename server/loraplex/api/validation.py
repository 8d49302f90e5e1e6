"""Turning a GenerateRequest into engine arguments.

Each rule is checked where it lives, not again here: sampling ranges and defaults by
SamplingParams, adapter and request ids by loraplex.rules, the prompt (one of text or ids,
the vocabulary, its length against the longest sequence the engine holds) by
Engine.add_request, chat messages and their template by engine/prompts.py. What stays here
is what only the wire needs: a bound on the text's size before it is tokenized, messages
instead of (not beside) a prompt, and max_new_tokens within the model's context. Every
failure is an InvalidFieldError naming the proto field (INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraplex.engine.prompts import ChatMessage
from loraplex.engine.request import SamplingParams
from loraplex.rules import InvalidFieldError, check_adapter_id, check_request_id
from loraplex_proto.v1 import loraplex_pb2 as pb

MAX_PROMPT_CHARS = 1 << 20
# GenerateRequest's `optional` fields that are SamplingParams fields of the same name:
# unset, they take SamplingParams' defaults.
OPTIONAL_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "logprobs", "n")


@dataclass(frozen=True, slots=True)
class GenerateArgs:
    prompt: str | None
    prompt_token_ids: list[int] | None
    adapter_id: str | None
    params: SamplingParams
    request_id: str | None
    messages: tuple[ChatMessage, ...] | None = None  # instead of a prompt: rendered with the adapter's chat template
    priority: int = 0  # lower first, among the caller's own requests only (engine/fair_share.py)


def parse_generate(req: pb.GenerateRequest, *, max_model_len: int) -> GenerateArgs:
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidFieldError("prompt", f"prompt: longer than {MAX_PROMPT_CHARS} characters")
    messages = messages_from_proto(req.messages)
    if messages is not None and (req.prompt or req.prompt_token_ids):
        raise InvalidFieldError("messages", "give exactly one of prompt, prompt_token_ids and messages")
    adapter_id = req.adapter_id or None
    if adapter_id is not None:
        check_adapter_id(adapter_id)
    if req.request_id:
        check_request_id(req.request_id)
    fields: dict[str, Any] = {name: getattr(req, name) for name in OPTIONAL_PARAMS if req.HasField(name)}
    params = SamplingParams(
        **fields, stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos
    )
    if params.max_new_tokens > max_model_len:
        raise InvalidFieldError(
            "max_new_tokens", f"max_new_tokens must be in [1, {max_model_len}], got {params.max_new_tokens}"
        )
    return GenerateArgs(
        req.prompt or None,
        list(req.prompt_token_ids) or None,
        adapter_id,
        params,
        req.request_id or None,
        messages,
        req.priority,
    )


def messages_from_proto(messages: Sequence[pb.ChatMessage]) -> tuple[ChatMessage, ...] | None:
    if not messages:
        return None
    if sum(len(m.content) for m in messages) > MAX_PROMPT_CHARS:
        raise InvalidFieldError("messages", f"messages: longer than {MAX_PROMPT_CHARS} characters in all")
    return tuple(ChatMessage(m.role, m.content) for m in messages)
