"""The OpenAI-compatible HTTP API: a second door to the same engine loop as gRPC.

    GET  /v1/models                 the base (--served-model-name) and the adapters the caller may use
    POST /v1/completions            prompt(s) -> text; `model` = the base name or an adapter id
    POST /v1/chat/completions       messages -> the adapter's own chat template (else the base's) -> text
    POST /v1/load_lora_adapter      vLLM's body {lora_name, lora_path}: register a PEFT directory
    POST /v1/unload_lora_adapter    {lora_name}: forget it (after the requests using it finish)
    POST /tokenize                  a prompt or messages -> token ids and count (vLLM's shape)
    GET  /health                    200 once ready, 503 before and while draining

Each call: the caller and its model (openai_front.py) → the same GenerateArgs and
EngineLoop.stream as gRPC (openai_routes.py, openai_generate.py). Every failure is one
HttpError in OpenAI's shape (openai_protocol.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loraplex.api import openai_routes
from loraplex.api.auth import Caller
from loraplex.api.openai_front import OpenAIFront, json_error
from loraplex.api.openai_protocol import HttpError, LoadLoraBody, TokenizeBody, UnloadLoraBody, field_path


def build_app(front: OpenAIFront) -> FastAPI:
    app = FastAPI(title="loraplex", summary="OpenAI-compatible API of a loraplex server")

    @app.exception_handler(HttpError)
    async def on_http_error(request: Request, e: HttpError) -> JSONResponse:
        return json_error(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request body"}
        param = field_path(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg')}" if param else f"invalid request body: {first.get('msg')}"
        return json_error(HttpError(400, message, param=param, code="invalid_value"))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if front.ready and not front.draining else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await front.answer(request, None, front.models)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request, body: LoadLoraBody) -> Response:
        async def load(caller: Caller) -> Response:
            return PlainTextResponse(await front.load(body, caller))

        return await front.answer(request, None, load)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request, body: UnloadLoraBody) -> Response:
        async def unload(caller: Caller) -> Response:
            return PlainTextResponse(await front.unload(body, caller))

        return await front.answer(request, None, unload)

    @app.post("/tokenize")
    async def tokenize(request: Request, body: TokenizeBody) -> Response:
        return await front.answer(request, body.model, lambda caller: front.tokenize(body, caller))

    openai_routes.add_routes(app, front)
    return app
