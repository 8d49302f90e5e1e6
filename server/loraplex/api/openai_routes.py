"""POST /v1/completions and /v1/chat/completions: bodies to engine requests, outputs to OpenAI's shapes.

Both routes: the model name to an adapter id (http_app.OpenAIFront), the body's fields to
SamplingParams (each range checked there once; a failure names the body's field), one
GenerateArgs per choice, then openai_generate.py runs them, streamed (SSE) or not.
Chat requests carry their messages to the engine loop, which renders them with the
adapter's own chat template, else the base model's (engine/prompts.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraplex.api.auth import Caller
from loraplex.api.openai_front import OpenAIFront
from loraplex.api.openai_generate import (
    Choices,
    ChoiceState,
    ClientGone,
    first_outputs,
    run_all,
    stream_events,
    unless_disconnected,
)
from loraplex.api.openai_protocol import (
    DEFAULT_TEMPERATURE,
    MAX_CHOICES,
    ChatCompletionBody,
    CompletionBody,
    SamplingBody,
    bad_field,
    chat_logprobs,
    completion_logprobs,
    usage,
)
from loraplex.api.validation import MAX_PROMPT_CHARS, GenerateArgs
from loraplex.engine.logprobs import TokenLogprobs
from loraplex.engine.request import RequestOutput, SamplingParams
from loraplex.logs import current_request_id
from loraplex.rules import InvalidFieldError, check_request_id, new_request_id

# SamplingParams' field names as each route's body names them (for `param` in errors).
COMPLETION_FIELDS = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt"}
CHAT_FIELDS = {"logprobs": "top_logprobs", "prompt": "messages", "prompt_token_ids": "messages"}


def add_routes(app: FastAPI, front: OpenAIFront) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody) -> Response:
        return await front.answer(
            request, body.model, lambda caller: _completions(front, request, body, caller), COMPLETION_FIELDS
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionBody) -> Response:
        fields = {**CHAT_FIELDS, "max_new_tokens": _chat_max_field(body)}
        return await front.answer(request, body.model, lambda caller: _chat(front, request, body, caller), fields)


def _chat_max_field(body: ChatCompletionBody) -> str:
    return "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"


def _request_id(request: Request) -> str:
    """X-Request-Id when the client sends a valid one (as vLLM), else a new id."""
    rid = request.headers.get("x-request-id")
    if rid:
        try:
            check_request_id(rid)
        except InvalidFieldError:
            rid = None
    rid = rid or new_request_id()
    current_request_id.set(rid)
    return rid


def _check_neutral(body: SamplingBody) -> None:
    problems = body.neutral_problems()
    if problems:
        raise bad_field(*problems[0])


def _params(front: OpenAIFront, body: SamplingBody, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    max_new = front.engine.max_model_len if max_tokens is None else max_tokens
    if max_new > front.engine.max_model_len:
        raise InvalidFieldError(
            "max_new_tokens", f"max_new_tokens must be at most max_model_len ({front.engine.max_model_len}), got {max_new}"
        )
    top_k = body.top_k if body.top_k is None or body.top_k >= 0 else 0  # vLLM: -1 = off
    optional: dict[str, Any] = {"top_p": body.top_p, "top_k": top_k, "repetition_penalty": body.repetition_penalty}
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        seed=body.seed,
        n=body.n,  # choice i of a seeded request samples with seed + i (engine/samples.py)
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        **{k: v for k, v in optional.items() if v is not None},
    )


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[str | None, list[int] | None]]:
    """The completions `prompt` forms: a text, texts, token ids, lists of token ids."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_field("prompt", "prompt must not be empty")
    out: list[tuple[str | None, list[int] | None]] = []
    for p in items:
        if isinstance(p, str):
            if len(p) > MAX_PROMPT_CHARS:
                raise bad_field("prompt", f"prompt: longer than {MAX_PROMPT_CHARS} characters")
            out.append((p, None))
        else:
            out.append((None, list(p)))
    return out


def _prompt_ids(rid: str, count: int) -> list[str]:
    """The engine request ids of a body's prompts: the request's id, suffixed when it has several."""
    return [rid] if count == 1 else [f"{rid}-{i}" for i in range(count)]


async def _completions(front: OpenAIFront, request: Request, body: CompletionBody, caller: Caller) -> Response:
    _check_neutral(body)
    adapter_id = front.adapter_for(body.model)
    prompts = _prompts(body.prompt)
    if len(prompts) * body.n > MAX_CHOICES:
        raise bad_field("n", f"{len(prompts)} prompts x n={body.n} choices; at most {MAX_CHOICES} in one request")
    rid = _request_id(request)
    ids = _prompt_ids(rid, len(prompts))
    params = _params(front, body, body.max_tokens, body.logprobs)
    requests = [
        GenerateArgs(text, tokens, adapter_id, params, ids[p], priority=body.priority) for p, (text, tokens) in enumerate(prompts)
    ]
    shape = _Shape(front, body, f"cmpl-{rid}", "text_completion", chat=False)
    return await _respond(front, request, body, requests, shape, caller)


async def _chat(front: OpenAIFront, request: Request, body: ChatCompletionBody, caller: Caller) -> Response:
    _check_neutral(body)
    adapter_id = front.adapter_for(body.model)
    messages = tuple(m.to_message() for m in body.messages)
    if sum(len(m.content) for m in messages) > MAX_PROMPT_CHARS:
        raise bad_field("messages", f"messages: longer than {MAX_PROMPT_CHARS} characters in all")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    rid = _request_id(request)
    requests = [
        GenerateArgs(None, None, adapter_id, _params(front, body, max_tokens, logprobs), rid, messages, priority=body.priority)
    ]
    shape = _Shape(front, body, f"chatcmpl-{rid}", "chat.completion", chat=True)
    return await _respond(front, request, body, requests, shape, caller)


async def _respond(
    front: OpenAIFront, request: Request, body: SamplingBody, requests: list[GenerateArgs], shape: _Shape, caller: Caller
) -> Response:
    choices = Choices(front.engine_loop, requests, caller)  # prompts x n choices, each prompt one engine request
    n = choices.n
    try:
        first = await unless_disconnected(request.receive, first_outputs(choices, n))
        if body.stream:
            events = stream_events(choices, first, shape.chunks, shape.final_chunks, n, lambda e: front.error(e, body.model).sse())
            return _EventStream(events, on_close=choices.close)
        states = await unless_disconnected(request.receive, run_all(choices, n, first))
    except ClientGone:
        choices.close()
        return Response(status_code=499)
    except BaseException:
        choices.close()
        raise
    choices.close()
    return JSONResponse(shape.whole(states))


class _EventStream(StreamingResponse):
    """SSE that closes its choices however the response ends: finished, failed, or the client
    gone before the first byte (when the body generator never starts, its finally never runs)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Shape:
    """Engine outputs as one route's response, whole or as stream chunks."""

    def __init__(self, front: OpenAIFront, body: SamplingBody, response_id: str, kind: str, *, chat: bool) -> None:
        self.front = front
        self.body = body
        self.per_prompt = body.n
        self.chat = chat
        self.head = {"id": response_id, "object": kind, "created": int(time.time()), "model": body.model}
        self.started: set[int] = set()  # streamed choices that have had their role chunk

    def _logprobs(self, lps: list[TokenLogprobs] | None, offset: int) -> dict[str, Any] | None:
        if lps is None:
            return None
        ids = sorted({lp.token_id for lp in lps} | {i for lp in lps for i, _ in lp.top})
        texts = dict(zip(ids, self.front.engine.prompts.token_texts(ids)))
        return chat_logprobs(lps, texts) if self.chat else completion_logprobs(lps, texts, offset)

    def _wants_logprobs(self) -> bool:
        body = self.body
        return bool(body.logprobs) if isinstance(body, ChatCompletionBody) else getattr(body, "logprobs", None) is not None

    def _usage(self, states: list[ChoiceState]) -> dict[str, Any]:
        """Each prompt once (its sample 0 computes it: its cached tokens), every choice's tokens."""
        firsts = states[:: self.per_prompt]
        prompt = sum(s.prompt_tokens for s in firsts)
        cached = sum(s.cached_prompt_tokens for s in firsts)
        return usage(prompt, sum(len(s.token_ids) for s in states), cached)

    def whole(self, states: list[ChoiceState]) -> dict[str, Any]:
        choices = []
        for i, s in enumerate(states):
            text = "".join(s.text)
            choice: dict[str, Any] = {"index": i, "finish_reason": s.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = self._logprobs(s.logprobs, 0) if self._wants_logprobs() else None
            if self.body.return_token_ids:
                choice["token_ids"] = s.token_ids
            choices.append(choice)
        return {**self.head, "choices": choices, "usage": self._usage(states)}

    def chunks(self, index: int, out: RequestOutput, state: ChoiceState) -> list[dict[str, Any]]:
        head = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion"}
        events = []
        if self.chat and index not in self.started:
            self.started.add(index)
            events.append({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]})
        if not (out.new_text or out.new_token_ids or out.finished):
            return events
        choice: dict[str, Any] = {"index": index, "finish_reason": str(out.finish_reason) if out.finished and out.finish_reason else None}
        if self.chat:
            choice["delta"] = {"content": out.new_text} if out.new_text else {}
        else:
            choice["text"] = out.new_text
        offset = sum(len(t) for t in state.text) - len(out.new_text)
        choice["logprobs"] = self._logprobs(out.logprobs or [], offset) if self._wants_logprobs() else None
        if self.body.return_token_ids:
            choice["token_ids"] = out.new_token_ids
        events.append({**head, "choices": [choice]})
        return events

    def final_chunks(self, states: list[ChoiceState]) -> list[dict[str, Any]]:
        options = self.body.stream_options
        if options is None or not options.include_usage:
            return []
        head = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion"}
        return [{**head, "choices": [], "usage": self._usage(states)}]

