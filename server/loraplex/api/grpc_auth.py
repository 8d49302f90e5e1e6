"""The gRPC side of the auth seam: one interceptor reads each call's bearer token once.

    call ── authorization: Bearer <token> ──> Auth.identify ──> Caller ── set for the handler
                                                       └── None ──> UNAUTHENTICATED (audited)

Health and reflection (`/grpc.*`) stay open. The handler reads its caller with
auth.current_caller(); nothing else in the gRPC service looks at tokens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from loraplex.api.auth import AccessError, Auth, Caller, Outcome, bearer_token, set_current_caller
from loraplex.api.grpc_handlers import rewrap

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token (authorization metadata)"


def bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return bearer_token(value)
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):  # health and reflection stay open
            return handler
        caller = self.auth.identify(bearer(details.invocation_metadata))
        return _wrap(handler, caller, details.method.rsplit("/", 1)[-1], self.auth)


def _wrap(handler: grpc.RpcMethodHandler, caller: Caller | None, rpc: str, auth: Auth) -> grpc.RpcMethodHandler:
    async def deny(context: grpc.aio.ServicerContext) -> None:
        auth.denied(None, rpc, AccessError(Outcome.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE))
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    def unary(behavior: Any) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if caller is None:
                await deny(context)
            assert caller is not None
            set_current_caller(caller)
            return await behavior(request, context)

        return run

    def streaming(behavior: Any) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if caller is None:
                await deny(context)
            assert caller is not None
            set_current_caller(caller)
            async for item in behavior(request, context):
                yield item

        return run

    return rewrap(handler, {"unary_unary": unary, "unary_stream": streaming, "stream_unary": unary, "stream_stream": streaming})
