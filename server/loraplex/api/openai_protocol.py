"""The OpenAI-compatible HTTP API's wire shapes: request bodies, errors, and response pieces.

Bodies are pydantic models. Fields we do not know are ignored (clients send many); fields
we know but do not implement are accepted only at their neutral value (presence_penalty 0,
echo false, ...) and refused otherwise with 400 naming them, so nothing is silently served
differently from what was asked. vLLM's extras (top_k, repetition_penalty, ignore_eos,
stop_token_ids) are top-level body fields, as vLLM reads them (`extra_body=` in the SDK).

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which the
official SDK turns into its typed exceptions (404 -> NotFoundError, 400 -> BadRequestError).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.engine.logprobs import MAX_LOGPROBS, TokenLogprobs
from loraplex.engine.prompts import ChatMessage
from loraplex.engine.request import MAX_SAMPLES

# OpenAI's API samples at temperature 1 unless told otherwise (gRPC's default is greedy).
DEFAULT_TEMPERATURE = 1.0
MAX_CHOICES = 64  # prompts x n in one completions request
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_error",
    499: "invalid_request_error", 500: "server_error", 503: "service_unavailable", 504: "timeout",
}


class HttpError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}  # whole seconds, never early

    def sse(self) -> str:
        """As the last event of a stream that already started (the SDK raises it as APIError)."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_field(param: str, message: str) -> HttpError:
    return HttpError(400, message, param=param, code="invalid_value")


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Body):
    include_usage: bool = False


class SamplingBody(Body):
    """What completions and chat completions share."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_SAMPLES)  # the engine's samples of one prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None  # -1 or 0: off
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False  # each choice's generated token ids, as vLLM's `token_ids`
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)  # vLLM's: lower first, among the caller's own requests
    # accepted only at their neutral values
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    def neutral_problems(self) -> list[tuple[str, str]]:
        """(field, message) for each field set to something not implemented."""
        problems = []
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                problems.append((name, f"{name} is not supported (use repetition_penalty)"))
        if self.logit_bias:
            problems.append(("logit_bias", "logit_bias is not supported"))
        if self.best_of not in (None, self.n):
            problems.append(("best_of", "best_of is not supported (use n)"))
        return problems


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def neutral_problems(self) -> list[tuple[str, str]]:
        problems = super().neutral_problems()
        if self.echo:
            problems.append(("echo", "echo is not supported"))
        if self.suffix:
            problems.append(("suffix", "suffix is not supported"))
        return problems


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessageBody(Body):
    role: str
    content: str | list[TextPart] | None = None

    def to_message(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):  # OpenAI's content parts: text only, joined
            content = "".join(part.text for part in content)
        return ChatMessage(self.role, content or "")


class ResponseFormat(Body):
    type: Literal["text"]


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessageBody]
    max_tokens: int | None = None  # None: until the model's context is full
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: ResponseFormat | None = None

    def neutral_problems(self) -> list[tuple[str, str]]:
        problems = super().neutral_problems()
        if self.tools:
            problems.append(("tools", "tools are not supported"))
        if self.top_logprobs is not None and not self.logprobs:
            problems.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        return problems


class LoadLoraBody(Body):
    """vLLM's /v1/load_lora_adapter body."""

    lora_name: str
    lora_path: str


class UnloadLoraBody(Body):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; ignored


class TokenizeBody(Body):
    """vLLM's /tokenize body: a prompt or chat messages, for a model."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageBody] | None = None


def field_path(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as the body path OpenAI's `param` names: messages[0].content."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[TextPart]", "list[str]", "list[int]", "list[list[int]]", "int"):
            continue  # which member of a union pydantic tried
        else:
            path += f".{part}" if path else str(part)
    return path or None


# -- response pieces ----------------------------------------------------------------------------


def completion_logprobs(lps: list[TokenLogprobs], texts: dict[int, str], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, top alternatives keyed by token text."""
    tokens = [texts[lp.token_id] for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{texts[i]: v for i, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _token(token_id: int, logprob: float, texts: dict[int, str]) -> dict[str, Any]:
    text = texts[token_id]
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(lps: list[TokenLogprobs], texts: dict[int, str]) -> dict[str, Any]:
    """The chat shape: one entry per token with its top alternatives."""
    return {
        "content": [
            {**_token(lp.token_id, lp.logprob, texts), "top_logprobs": [_token(i, v, texts) for i, v in lp.top]}
            for lp in lps
        ]
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage; cached_tokens: prompt tokens the prefix cache held (not computed)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
