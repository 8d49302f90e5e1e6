"""Turning a GenerateRequest into engine arguments, checking every field."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from loraplex.api.errors import invalid
from loraplex.config import ADAPTER_ID_RE
from loraplex.engine.request import SamplingParams
from loraplex_proto.v1 import loraplex_pb2 as pb

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_PROMPT_CHARS = 1 << 20
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


@dataclass(frozen=True, slots=True)
class GenerateArgs:
    prompt: str | None
    prompt_token_ids: list[int] | None
    adapter_id: str | None
    params: SamplingParams
    request_id: str | None


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise invalid(field, f"must be a finite number, got {value}")
    return value


def parse_generate(req: pb.GenerateRequest, *, vocab_size: int, max_model_len: int) -> GenerateArgs:
    has_text, has_ids = bool(req.prompt), len(req.prompt_token_ids) > 0
    if has_text == has_ids:
        raise invalid("prompt", "give exactly one of prompt and prompt_token_ids")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise invalid("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
    ids = list(req.prompt_token_ids) if has_ids else None
    if ids is not None:
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise invalid("prompt_token_ids", f"ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if len(ids) >= max_model_len:
            raise invalid("prompt_token_ids", f"{len(ids)} tokens; max_model_len is {max_model_len}")

    adapter_id = req.adapter_id or None
    if adapter_id is not None and not ADAPTER_ID_RE.match(adapter_id):
        raise invalid("adapter_id", f"{adapter_id!r} is not a valid id (1-128 characters of A-Z a-z 0-9 . _ / -)")
    if req.request_id and not REQUEST_ID_RE.match(req.request_id):
        raise invalid("request_id", "must be 1-128 printable ASCII characters without spaces")

    max_new = req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
    if not 1 <= max_new <= max_model_len:
        raise invalid("max_new_tokens", f"must be in [1, {max_model_len}], got {max_new}")
    temperature = _finite("temperature", req.temperature) if req.HasField("temperature") else 0.0
    if temperature < 0:
        raise invalid("temperature", f"must be >= 0, got {temperature}")
    top_p = _finite("top_p", req.top_p) if req.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise invalid("top_p", f"must be in (0, 1], got {top_p}")
    top_k = req.top_k if req.HasField("top_k") else 0
    if top_k < 0:
        raise invalid("top_k", f"must be >= 0, got {top_k}")
    penalty = _finite("repetition_penalty", req.repetition_penalty) if req.HasField("repetition_penalty") else 1.0
    if penalty <= 0:
        raise invalid("repetition_penalty", f"must be > 0, got {penalty}")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(req.stop)}")
    for s in req.stop:
        if not s or len(s) > MAX_STOP_LEN:
            raise invalid("stop", f"stop strings must have 1-{MAX_STOP_LEN} characters, got {len(s)}")
    bad_stop = [t for t in req.stop_token_ids if t >= vocab_size]
    if bad_stop:
        raise invalid("stop_token_ids", f"ids outside the vocabulary [0, {vocab_size}): {bad_stop[:5]}")
    seed = req.seed if req.HasField("seed") else None
    if seed is not None and seed >= 2**63:
        raise invalid("seed", "must be < 2**63")

    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
        repetition_penalty=penalty,
    )
    return GenerateArgs(req.prompt if has_text else None, ids, adapter_id, params, req.request_id or None)
