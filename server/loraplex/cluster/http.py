"""The OpenAI-compatible HTTP API through the cluster: Ray Serve's HTTP proxy calls the
ingress's `__call__`, which routes by the body's `model` as gRPC routes by adapter id.

    client ──HTTP──> Ray's HTTP proxy ──> Ingress.__call__ ──> HttpDoor.answer
        POST /v1/completions, /v1/chat/completions, /tokenize
            ──handle(multiplexed_model_id = model, unless it names the base)──> Replica.http:
              the replica's own FastAPI app (api/http_app.py over its engine loop), driven
              through ASGI by asgi_exchange; its response start and body chunks come back
              as they are sent (SSE streams stay streams)
        POST /v1/load_lora_adapter, /v1/unload_lora_adapter ──> the ingress's LoadAdapter /
              UnloadAdapter (the shared registry, every replica), as gRPC's
        GET  /v1/models ──> the base and the adapters of ListAdapters
        GET  /health    ──> 200 while any replica is ready

A failure before the response starts is answered in OpenAI's error shape with the status
api/openai_front.py gives its gRPC code (a dead replica: 503); a replica that dies during
an SSE stream ends it with an error event. No Ray import here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from loraplex.api.openai_front import HTTP_STATUS, json_error
from loraplex.api.openai_protocol import HttpError, LoadLoraBody, UnloadLoraBody
from loraplex.cluster.calls import CallError, status_of_failure
from loraplex.cluster.registry import AdapterRegistry
from loraplex.config import ServerConfig
from loraplex_proto.v1 import loraplex_pb2 as pb

log = logging.getLogger(__name__)

Message = dict[str, Any]  # {"status": int, "headers": [[name, value], ...]} first, then {"body": bytes}
HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}  # the proxy sets its own


def served_model_name(config: ServerConfig) -> str:
    """The base model's name in the HTTP API (api/server.py's rule: --served-model-name, else
    the model directory's name)."""
    return config.api.served_model_name or Path(config.engine.model.model).name


async def asgi_exchange(
    app: Callable[..., Awaitable[None]], method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes
) -> AsyncIterator[Message]:
    """One HTTP request through an ASGI app in this process: the response's start, then its
    body chunks as the app sends them. Closing the generator is the client leaving (the app
    receives http.disconnect)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query, "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("ray-serve", 0), "server": ("ray-serve", 80),
    }
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> Message:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield {"body": bytes(message["body"])}
                if not message.get("more_body", False):
                    break
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)


def model_of(body: bytes) -> str | None:
    """The body's `model` (None when it has none or is not a JSON object)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def error_response(e: BaseException) -> JSONResponse:
    if isinstance(e, HttpError):
        return json_error(e)
    code, details = status_of_failure(e)
    status = HTTP_STATUS.get(code, 500)
    return json_error(HttpError(status, details, retry_after_s=1.0 if status in (429, 503) else None))


class ClusterCalls(Protocol):
    """What the HTTP side calls on the ingress (ingress.py; a Protocol, as the ingress imports this module)."""

    registry: AdapterRegistry | None

    def to_replica(self, adapter_id: str, stream: bool = False) -> Any: ...
    async def any_ready(self) -> bool: ...
    async def ListAdapters(self, request: pb.ListAdaptersRequest) -> pb.ListAdaptersResponse: ...
    async def GetModelInfo(self, request: pb.GetModelInfoRequest) -> pb.ModelInfo: ...
    async def LoadAdapter(self, request: pb.LoadAdapterRequest) -> pb.AdapterInfo: ...
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest) -> pb.UnloadAdapterResponse: ...


class HttpDoor:
    """The ingress's HTTP side (Ingress.__call__ hands every request here)."""

    def __init__(self, ingress: ClusterCalls, base_name: str) -> None:
        self.ingress = ingress
        self.base_name = base_name
        self.created = int(time.time())

    async def answer(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        try:
            if (method, path) == ("GET", "/health"):
                return Response(status_code=200 if await self.ingress.any_ready() else 503)
            if (method, path) == ("GET", "/v1/models"):
                return JSONResponse(await self.models())
            body = await request.body()
            if (method, path) == ("POST", "/v1/load_lora_adapter"):
                return await self.load(body)
            if (method, path) == ("POST", "/v1/unload_lora_adapter"):
                return await self.unload(body)
            return await self.forward(request, body)
        except Exception as e:
            return error_response(e)

    async def forward(self, request: Request, body: bytes) -> Response:
        """To a replica, routed by the body's model: its own FastAPI app answers."""
        model = model_of(body)
        adapter_id = "" if model is None or model == self.base_name else model
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        chunks: Any = self.ingress.to_replica(adapter_id, stream=True).http.remote(
            request.method, request.url.path, request.url.query.encode("latin-1"), headers, body, adapter_id
        )
        messages = chunks.__aiter__()
        start = await messages.__anext__()
        response_headers = {k: v for k, v in start["headers"] if k.lower() not in HOP_HEADERS}
        events = response_headers.get("content-type", "").startswith("text/event-stream")

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for message in messages:
                    yield message["body"]
            except Exception as e:  # the status is sent: the stream ends with an error event
                if not events:
                    raise
                yield b"data: " + bytes(error_response(e).body) + b"\n\n"

        return StreamingResponse(rest(), status_code=start["status"], headers=response_headers)

    async def models(self) -> dict[str, Any]:
        listed = await self.ingress.ListAdapters(pb.ListAdaptersRequest())
        info = await self.ingress.GetModelInfo(pb.GetModelInfoRequest())
        base = {
            "id": self.base_name, "object": "model", "created": self.created, "owned_by": "loraplex",
            "root": self.base_name, "parent": None, "max_model_len": info.max_model_len,
        }
        adapters = [
            {"id": a.adapter_id, "object": "model", "created": self.created, "owned_by": "loraplex",
             "root": a.path, "parent": self.base_name, "max_model_len": None}
            for a in listed.adapters
        ]
        return {"object": "list", "data": [base, *adapters]}

    async def load(self, raw: bytes) -> Response:
        body = _parse(LoadLoraBody, raw)
        if body.lora_name == self.base_name:
            raise HttpError(400, f"lora_name {body.lora_name!r} is the base model's name", param="lora_name")
        path = body.lora_path
        root = self.ingress.registry.root if self.ingress.registry is not None else None
        if root is not None and Path(path).is_absolute() and Path(path).is_relative_to(root):
            path = str(Path(path).relative_to(root))  # vLLM scripts send absolute paths
        await self.ingress.LoadAdapter(pb.LoadAdapterRequest(adapter_id=body.lora_name, path=path))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(self, raw: bytes) -> Response:
        body = _parse(UnloadLoraBody, raw)
        try:
            await self.ingress.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=body.lora_name))
        except CallError as e:
            if e.code != "NOT_FOUND":
                raise
            raise HttpError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                            code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _parse(model: Any, raw: bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise HttpError(400, f"{param}: {first.get('msg')}", param=param or None, code="invalid_value") from None
