"""What every HTTP route shares: the engine loop, the served model name, who calls, drain state,
and the one path from any failure to an OpenAI-shaped error.

The HTTP side of the auth seam (api/auth.py), as grpc_auth.py is gRPC's:

    Authorization: Bearer <token> ──> Auth.identify ──> Caller    (None: 401, audited)
    /v1/models                        access.visible(caller): own + read namespaces (admins: all)
    completions, chat, /tokenize      EngineLoop.stream / tokenize(args, caller): quotas, and an
                                      id outside the caller's namespaces answered as unknown (404)
    load / unload_lora_adapter        access.register / unregister: 403 outside its own namespaces
    any refusal                       Auth.denied(caller, route, error): the audit line and counter

A model name is the base's (--served-model-name) or an adapter id, never the base for an
unknown name. Exceptions go through `status_of` (errors.py), the same mapping as gRPC's,
then one table from gRPC codes to HTTP statuses: 401, 403, 404, and 429 with Retry-After
(a tenant limit's own retry delay, rounded up).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from loraplex.api.auth import AccessError, Auth, Caller, Outcome, bearer_token, set_current_caller
from loraplex.api.engine_loop import EngineLoop
from loraplex.api.errors import status_of
from loraplex.api.openai_protocol import HttpError, LoadLoraBody, TokenizeBody, UnloadLoraBody
from loraplex.api.validation import MAX_PROMPT_CHARS
from loraplex.engine.errors import EngineOverloadedError
from loraplex.lora.adapter_version import AdapterNotFoundError
from loraplex.rules import InvalidFieldError, adapter_id_problem, check_adapter_id

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
OVERLOADED_RETRY_AFTER_S = 1.0
ACCESS_CODES = {  # OpenAI's `code` for the auth seam's refusals
    Outcome.UNAUTHENTICATED: "invalid_api_key",
    Outcome.PERMISSION_DENIED: "permission_denied",
    Outcome.RESOURCE_EXHAUSTED: "rate_limit_exceeded",
}
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token (Authorization: Bearer <token>)"


class OpenAIFront:
    """What the HTTP routes share: the engine loop, the served name, auth, and drain state."""

    def __init__(self, engine_loop: EngineLoop, served_model_name: str, auth: Auth) -> None:
        self.engine_loop = engine_loop
        self.engine = engine_loop.engine
        self.access = engine_loop.access
        self.served_model_name = served_model_name
        self.auth = auth
        self.created = int(time.time())
        self.ready = False
        self.draining = False  # set by Server.drain: new calls get 503

    # -- who and what -----------------------------------------------------------------------

    def caller(self, request: Request) -> Caller:
        """The caller of this HTTP call: the one place HTTP reads identity (Auth.identify, as
        gRPC's interceptor). Raises AccessError(UNAUTHENTICATED) for no or an unknown token."""
        caller = self.auth.identify(bearer_token(request.headers.get("authorization")))
        if caller is None:
            raise AccessError(Outcome.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        set_current_caller(caller)
        return caller

    def adapter_for(self, model: str) -> str | None:
        """The adapter a `model` names (None: the base model). Never the base for an unknown
        name; whether the caller may use it is decided where it is resolved (access.py)."""
        if model == self.served_model_name:
            return None
        if adapter_id_problem(model) is not None:
            raise self.unknown_model(model)
        return model

    def unknown_model(self, model: str) -> HttpError:
        return HttpError(
            404,
            f"The model `{model}` does not exist: it is neither the base model ({self.served_model_name!r}) "
            "nor an adapter you may use (GET /v1/models lists them)",
            param="model",
            code="model_not_found",
        )

    def check_open(self) -> None:
        if self.draining:
            raise HttpError(503, "the server is shutting down", retry_after_s=1.0)

    def error(self, e: BaseException, model: str | None = None, rename: dict[str, str] | None = None) -> HttpError:
        """Any failure as the one HttpError to answer with."""
        if isinstance(e, HttpError):
            return e
        if isinstance(e, AdapterNotFoundError) and model is not None:  # HiddenAdapterError too: the same answer
            return self.unknown_model(model)
        if isinstance(e, AccessError):
            code, message = status_of(e)
            return HttpError(HTTP_STATUS[code], message, code=ACCESS_CODES.get(e.outcome), retry_after_s=e.retry_after_s)
        if isinstance(e, InvalidFieldError):  # named as this route's body names the field
            param = (rename or {}).get(e.field, e.field)
            return HttpError(400, str(e).replace(e.field, param, 1), param=param, code="invalid_value")
        code, message = status_of(e)
        status = HTTP_STATUS.get(code, 500)
        if status == 500:
            log.error("HTTP request failed: %s", message, exc_info=e)
        retry = OVERLOADED_RETRY_AFTER_S if isinstance(e, EngineOverloadedError) or status == 429 else None
        return HttpError(status, message, retry_after_s=retry)

    # -- models and adapters ------------------------------------------------------------------

    def models(self, caller: Caller) -> dict[str, Any]:
        base = {
            "id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "loraplex",
            "root": self.served_model_name, "parent": None, "max_model_len": self.engine.max_model_len,
        }
        adapters: list[dict[str, Any]] = []
        for info in self.access.visible(caller):  # only what the caller may use
            adapters.append({
                "id": info.adapter_id, "object": "model", "created": self.created, "owned_by": "loraplex",
                "root": self._relative(info.path), "parent": self.served_model_name, "max_model_len": None,
            })
        return {"object": "list", "data": [base, *sorted(adapters, key=lambda m: str(m["id"]))]}

    def _relative(self, path: str) -> str:
        for root in self.engine.adapter_roots:
            if Path(path).is_relative_to(root):
                return str(Path(path).relative_to(root))
        return path

    async def load(self, body: LoadLoraBody, caller: Caller) -> str:
        if body.lora_name == self.served_model_name:
            raise HttpError(400, f"lora_name {body.lora_name!r} is the base model's name", param="lora_name")
        check_adapter_id(body.lora_name, "lora_name")
        # A path inside an adapter root, absolute (as vLLM scripts send) or relative to it; the
        # tenant rules (own namespaces, paths under them, max_adapters) as for gRPC's LoadAdapter.
        path = self._under_root(body.lora_path)
        await asyncio.to_thread(self.access.register, caller, "load_lora_adapter", body.lora_name, path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    def _under_root(self, path: str) -> str:
        """An absolute path inside an adapter root as the relative path the store takes."""
        if not os.path.isabs(path):
            return path
        normalized = Path(os.path.normpath(path))
        for root in self.engine.adapter_roots:
            if normalized.is_relative_to(root):
                return str(normalized.relative_to(root))
        return path  # refused where it is checked, in the caller's own words

    async def unload(self, body: UnloadLoraBody, caller: Caller) -> str:
        check_adapter_id(body.lora_name, "lora_name")
        adapter_id = body.lora_name
        released = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_released() -> None:  # now, or from the engine thread when the last holder finishes
            loop.call_soon_threadsafe(released.set)

        try:
            self.access.unregister(caller, "unload_lora_adapter", adapter_id, force=False, on_released=on_released)
        except AdapterNotFoundError:
            raise HttpError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                            code="model_not_found") from None
        await released.wait()  # new requests already get 404; the ones holding it finish first
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    async def tokenize(self, body: TokenizeBody, caller: Caller) -> dict[str, Any]:
        adapter_id = None if body.model is None else self.adapter_for(body.model)
        if body.prompt is not None and len(body.prompt) > MAX_PROMPT_CHARS:
            raise HttpError(400, f"prompt: longer than {MAX_PROMPT_CHARS} characters", param="prompt")
        messages = None if body.messages is None else [m.to_message() for m in body.messages]
        ids = await self.engine_loop.tokenize(body.prompt, messages, adapter_id, caller)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids, "token_strs": None}


    async def answer(
        self, request: Request, model: str | None, work: Callable[[Caller], Any], rename: dict[str, str] | None = None
    ) -> Response:
        """Drain check, the caller, `work(caller)` (a value, an awaitable or a Response), and
        every exception as an OpenAI error; a refusal of the auth seam is audited once."""
        caller: Caller | None = None
        try:
            self.check_open()
            caller = self.caller(request)
            result = work(caller)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.auth.denied(caller, f"{request.method} {request.url.path}", e)
            return json_error(self.error(e, model, rename))
        return result if isinstance(result, Response) else JSONResponse(result)


def json_error(e: HttpError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
