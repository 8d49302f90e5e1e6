"""Who is calling: the one place a caller's identity is read, and adapter ids are resolved for it.

Today every caller with a valid token (or any caller, when no tokens are configured) may use
every adapter. The tenant step plugs in here: map a token to a tenant, allow only that
tenant's namespace (`tenant/...`), and require admin or owner rights for load / upload /
unload. Adapter ids carry their namespace everywhere, so no cache key ignores it.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str | None  # None: not bound to a namespace
    admin: bool


ANONYMOUS = Caller(tenant=None, admin=True)
_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("loraplex_caller", default=ANONYMOUS)


def current_caller() -> Caller:
    return _caller.get()


def resolve_adapter_id(caller: Caller, adapter_id: str) -> str:
    """The adapter id a caller means. The tenant namespace check goes here."""
    return adapter_id


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Reads `authorization: Bearer <token>` and sets the caller for the handler."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self.tokens = tokens

    def _identify(self, metadata: Any) -> Caller | None:
        if not self.tokens:
            return ANONYMOUS
        token = _bearer(metadata)
        if token is not None and any(hmac.compare_digest(token, t) for t in self.tokens):
            return Caller(tenant=None, admin=True)
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):  # health and reflection stay open
            return handler
        caller = self._identify(details.invocation_metadata)
        return _wrap(handler, caller)


def _wrap(handler: grpc.RpcMethodHandler, caller: Caller | None) -> grpc.RpcMethodHandler:
    async def deny(context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization metadata)")

    def unary(behavior: Any) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if caller is None:
                await deny(context)
            _caller.set(caller or ANONYMOUS)
            return await behavior(request, context)

        return run

    def streaming(behavior: Any) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if caller is None:
                await deny(context)
            _caller.set(caller or ANONYMOUS)
            async for item in behavior(request, context):
                yield item

        return run

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)
    return handler
