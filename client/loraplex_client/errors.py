"""Typed errors: one class per gRPC status code the server documents (see loraplex.proto).

Every failed call raises a LoraplexError subclass, so callers catch by meaning
(`except AdapterNotFoundError`) instead of comparing `grpc.StatusCode`s. A code the
server does not document (UNIMPLEMENTED, DATA_LOSS, ...) raises LoraplexError itself.
Arguments the SDK can check before sending (a value the proto cannot hold, an upload
directory that is missing or incomplete) raise InvalidRequestError naming the argument.
When the server says how long to wait before retrying (google.rpc RetryInfo in the status
details), `.retry_delay` has the seconds; a tenant limit raises QuotaExceededError, whose
`.limit` names it.
"""

from __future__ import annotations

from typing import Any

import grpc

from loraplex_client._status_details import status_details


class LoraplexError(Exception):
    """A call failed. `.code` is the gRPC status code, `.details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, *, retry_delay: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        self.retry_delay = retry_delay  # seconds to wait before retrying, when the server says (else None)

    def __reduce__(self) -> tuple[type[LoraplexError], tuple[grpc.StatusCode, str], dict[str, Any]]:
        # Exception pickles by self.args (the message); rebuild from code + details, then the rest.
        return type(self), (self.code, self.details), dict(self.__dict__)


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


class QuotaExceededError(OverloadedError):
    """RESOURCE_EXHAUSTED from a tenant limit: `.limit` is max_requests, tokens_per_minute or
    max_adapters; `.retry_delay` (seconds) is set when waiting helps."""

    limit: str | None = None


class ServerUnavailableError(LoraplexError):
    """UNAVAILABLE: the server is unreachable, shutting down, or not ready yet."""


class DeadlineExceededError(LoraplexError):
    """DEADLINE_EXCEEDED: the call's deadline passed; the server aborted the request."""


class AuthenticationError(LoraplexError):
    """UNAUTHENTICATED: no valid bearer token."""


class PermissionDeniedError(LoraplexError):
    """PERMISSION_DENIED: the token's tenant may not load, upload or unload this id, or load this
    path: both must lie in its own namespaces (ids of read namespaces may be used, not changed)."""


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
    extra = status_details(error)
    if extra.quota_limit is not None:
        quota = QuotaExceededError(code, details, retry_delay=extra.retry_delay)
        quota.limit = extra.quota_limit
        return quota
    return _BY_CODE.get(code, LoraplexError)(code, details, retry_delay=extra.retry_delay)
