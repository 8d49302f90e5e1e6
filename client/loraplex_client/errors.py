"""Typed errors: one class per gRPC status code the server documents (see loraplex.proto).

Every failed call raises a LoraplexError subclass, so callers catch by meaning
(`except AdapterNotFoundError`) instead of comparing `grpc.StatusCode`s. A code the
server does not document (UNIMPLEMENTED, DATA_LOSS, ...) raises LoraplexError itself.
Arguments the SDK can check before sending (a value the proto cannot hold, an upload
directory that is missing or incomplete) raise InvalidRequestError naming the argument.
"""

from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """A call failed. `.code` is the gRPC status code, `.details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple[type[LoraplexError], tuple[grpc.StatusCode, str]]:
        # Exception pickles by self.args (the message); rebuild from code + details instead.
        return type(self), (self.code, self.details)


class InvalidRequestError(LoraplexError):
    """INVALID_ARGUMENT: a request field is out of range or malformed (the message names it)."""


class AdapterNotFoundError(LoraplexError):
    """NOT_FOUND: unknown adapter id, or a LoadAdapter path that does not exist under the root.

    The server never falls back to the base model.
    """


class AdapterIncompatibleError(LoraplexError):
    """FAILED_PRECONDITION: the adapter cannot be served on this base (DoRA, rank, shapes, ...)."""


class RequestConflictError(LoraplexError):
    """ALREADY_EXISTS: a request with this request_id is already in flight."""


class OverloadedError(LoraplexError):
    """RESOURCE_EXHAUSTED: the admission queue is full, or an upload is too large."""


class ServerUnavailableError(LoraplexError):
    """UNAVAILABLE: the server is unreachable, shutting down, or not ready yet."""


class DeadlineExceededError(LoraplexError):
    """DEADLINE_EXCEEDED: the call's deadline passed; the server aborted the request."""


class AuthenticationError(LoraplexError):
    """UNAUTHENTICATED: no valid bearer token."""


class PermissionDeniedError(LoraplexError):
    """PERMISSION_DENIED: the token's tenant may not use this adapter or operation."""


class InternalServerError(LoraplexError):
    """INTERNAL: a bug or device failure in this request (the message has its id)."""


class RequestCancelledError(LoraplexError):
    """CANCELLED: the call was cancelled (by this client or the server)."""


class RequestAbortedError(LoraplexError):
    """ABORTED: the server ended the request, e.g. its adapter was unloaded with force=True."""


_BY_CODE: dict[grpc.StatusCode, type[LoraplexError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: AdapterNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: AdapterIncompatibleError,
    grpc.StatusCode.ALREADY_EXISTS: RequestConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INTERNAL: InternalServerError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.ABORTED: RequestAbortedError,
}


def error_from_rpc(error: grpc.RpcError) -> LoraplexError:
    """The typed error for a failed call (sync grpc.Call or grpc.aio.AioRpcError)."""
    # Both failed-call types carry code() and details(); a bare RpcError has neither.
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or ""
    return _BY_CODE.get(code, LoraplexError)(code, details)
