"""Requests whose bytes do not parse as their message (e.g. a string field that is not UTF-8)
end INVALID_ARGUMENT naming the message, not gRPC's generic error for a failed deserializer.

    gRPC core ── bytes ──> guarded deserializer ── message, or Undecodable(reason) ──> handler
                                                     Undecodable: abort INVALID_ARGUMENT

For client-streaming calls (UploadAdapter) the reason surfaces as an InvalidFieldError from
the request iterator, which the handler's error mapping answers INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from loraplex.api.grpc_handlers import rewrap
from loraplex.rules import InvalidFieldError


@dataclass(frozen=True, slots=True)
class Undecodable:
    reason: str


def _guard(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as e:
            return Undecodable(str(e))

    return deserialize


def _message(request: Undecodable) -> str:
    return f"request: not a valid message: {request.reason}"


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise InvalidFieldError("request", _message(request))
        yield request


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):  # health and reflection: their own types
            return handler
        wraps = {"unary_unary": _unary_unary, "unary_stream": _unary_stream, "stream_unary": _stream_unary, "stream_stream": _stream_stream}
        return rewrap(handler, wraps, _guard(handler.request_deserializer))


def _unary_unary(behavior: Any) -> Any:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(request))
        return await behavior(request, context)

    return run


def _unary_stream(behavior: Any) -> Any:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(request))
        async for item in behavior(request, context):
            yield item

    return run


def _stream_unary(behavior: Any) -> Any:
    async def run(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(_checked(requests), context)

    return run


def _stream_stream(behavior: Any) -> Any:
    async def run(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for item in behavior(_checked(requests), context):
            yield item

    return run
