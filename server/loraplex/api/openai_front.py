"""What every HTTP route shares: the engine loop, the served model name, who calls, drain state,
and the one path from any failure to an OpenAI-shaped error.

The caller comes from `Authorization: Bearer` (the one auth seam, api/auth.py); a model
name is the base's (--served-model-name) or an adapter id, never the base for an unknown
name. Exceptions go through `status_of` (errors.py), the same mapping as gRPC's, then one
table from gRPC codes to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from loraplex.api.auth import ANONYMOUS, Caller, resolve_adapter_id
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


class OpenAIFront:
    """What the HTTP routes share: the engine loop, the served name, auth, and drain state."""

    def __init__(self, engine_loop: EngineLoop, served_model_name: str, auth_tokens: tuple[str, ...]) -> None:
        self.engine_loop = engine_loop
        self.engine = engine_loop.engine
        self.served_model_name = served_model_name
        self.auth_tokens = auth_tokens
        self.created = int(time.time())
        self.ready = False
        self.draining = False  # set by Server.drain: new calls get 503

    # -- who and what -----------------------------------------------------------------------

    def caller(self, request: Request) -> Caller:
        """The caller, as gRPC's interceptor reads it: `Authorization: Bearer <token>`.

        The one place HTTP reads identity; it decides as api/auth.py's AuthInterceptor does.
        """
        if not self.auth_tokens:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        token = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else None
        if token is not None and any(hmac.compare_digest(token, t) for t in self.auth_tokens):
            return Caller(tenant=None, admin=True)
        raise HttpError(401, "missing or invalid bearer token (Authorization: Bearer <token>)", code="invalid_api_key")

    def adapter_for(self, model: str, caller: Caller) -> str | None:
        """The adapter a `model` names (None: the base model). Never the base for an unknown name."""
        if model == self.served_model_name:
            return None
        if adapter_id_problem(model) is not None:
            raise self.unknown_model(model)
        return resolve_adapter_id(caller, model)

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
        if isinstance(e, AdapterNotFoundError) and model is not None:
            return self.unknown_model(model)
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
        for info in self.engine.adapter_infos():
            try:
                resolve_adapter_id(caller, info.adapter_id)
            except Exception:
                continue  # not the caller's to use
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
        adapter_id = resolve_adapter_id(caller, body.lora_name)
        # A path inside an adapter root, absolute (as vLLM scripts send) or relative to it.
        await asyncio.to_thread(self.engine.register_adapter, adapter_id, body.lora_path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoraBody, caller: Caller) -> str:
        check_adapter_id(body.lora_name, "lora_name")
        adapter_id = resolve_adapter_id(caller, body.lora_name)
        released = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_released() -> None:  # now, or from the engine thread when the last holder finishes
            loop.call_soon_threadsafe(released.set)

        try:
            self.engine.unregister_adapter(adapter_id, on_released=on_released)
        except AdapterNotFoundError:
            raise HttpError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                            code="model_not_found") from None
        await released.wait()  # new requests already get 404; the ones holding it finish first
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    async def tokenize(self, body: TokenizeBody, caller: Caller) -> dict[str, Any]:
        adapter_id = None if body.model is None else self.adapter_for(body.model, caller)
        if body.prompt is not None and len(body.prompt) > MAX_PROMPT_CHARS:
            raise HttpError(400, f"prompt: longer than {MAX_PROMPT_CHARS} characters", param="prompt")
        messages = None if body.messages is None else [m.to_message() for m in body.messages]
        ids = await self.engine_loop.tokenize(body.prompt, messages, adapter_id)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids, "token_strs": None}


    async def answer(
        self, request: Request, model: str | None, work: Callable[[Caller], Any], rename: dict[str, str] | None = None
    ) -> Response:
        """Drain check, the caller, `work(caller)` (a value, an awaitable or a Response), and
        every exception as an OpenAI error."""
        try:
            self.check_open()
            result = work(self.caller(request))
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return json_error(self.error(e, model, rename))
        return result if isinstance(result, Response) else JSONResponse(result)


def json_error(e: HttpError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
