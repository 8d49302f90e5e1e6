"""Re-building a gRPC method handler around new behaviour, for the server interceptors
(grpc_auth.py: the caller; decode_guard.py: undecodable requests): one place that knows the
four handler kinds and which factory makes each."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc

Wrap = Callable[[Any], Any]  # the handler's behaviour -> the behaviour that replaces it

_FACTORIES = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def rewrap(handler: grpc.RpcMethodHandler, wraps: Mapping[str, Wrap], request_deserializer: Any = None) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour passed through `wraps[kind]` (kind: "unary_unary", ...),
    and `request_deserializer` in place of its own when given."""
    deserializer = request_deserializer or handler.request_deserializer
    for kind, factory in _FACTORIES:
        behavior = getattr(handler, kind)
        if behavior:
            return factory(wraps[kind](behavior), request_deserializer=deserializer, response_serializer=handler.response_serializer)
    return handler
