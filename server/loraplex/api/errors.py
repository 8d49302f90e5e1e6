"""One mapping from what went wrong to a gRPC status; every message names the field or adapter.

Two kinds of failure reach a call: an exception while it is set up (status_of), and a
request that the engine ended ABORTED or ERROR (ended_status, by its ErrorKind). Neither
reads a message's text to decide. The auth seam's refusals (AccessError) map by their
Outcome; a tenant limit also carries google.rpc RetryInfo (when waiting helps) and
QuotaFailure (naming the limit) in the status details (rich_status).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from loraplex.api.auth import AccessError, Outcome
from loraplex.engine.errors import DuplicateRequestError, EngineClosedError, EngineOverloadedError
from loraplex.engine.request import ErrorKind, FinishReason, RequestOutput
from loraplex.lora.adapter_spec import AdapterError, AdapterReadError
from loraplex.lora.adapter_version import AdapterNotFoundError
from loraplex.rules import InvalidFieldError


class ApiError(Exception):
    """An error with its status, raised anywhere in the API layer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, problem: str) -> InvalidFieldError:
    return InvalidFieldError(field, f"{field}: {problem}")


ACCESS_STATUS = {
    Outcome.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Outcome.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Outcome.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Outcome.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message for an exception raised while serving a call."""
    if isinstance(error, ApiError):
        return error.code, error.message
    if isinstance(error, AccessError):
        return ACCESS_STATUS.get(error.outcome, grpc.StatusCode.PERMISSION_DENIED), error.message
    if isinstance(error, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, InvalidFieldError):  # the only caller's mistake: a stray ValueError is a bug
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, AdapterReadError):  # the disk failed, not the adapter: retry later
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, AdapterError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, DuplicateRequestError):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, EngineOverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {error}; retry later"
    if isinstance(error, EngineClosedError):
        return grpc.StatusCode.UNAVAILABLE, "the server is shutting down"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


ENDED_STATUS = {
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,  # nobody listens any more; for completeness
    ErrorKind.UNLOADED: grpc.StatusCode.ABORTED,
    ErrorKind.SHUTDOWN: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.ADAPTER: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def ended_status(out: RequestOutput) -> ApiError | None:
    """The status a finished request ends its call with: None (OK) unless it was ABORTED or ERROR."""
    if out.error_kind is None:
        return None
    message = out.error or out.error_kind.value
    if out.finish_reason is FinishReason.ABORTED:
        message = f"request {out.request_id}: {message}"
    return ApiError(ENDED_STATUS[out.error_kind], message)


def rich_status(error: BaseException) -> grpc.Status | None:
    """A tenant limit's status with its details: QuotaFailure naming the limit, and RetryInfo
    when waiting helps (None for other errors: a plain status says all)."""
    if not isinstance(error, AccessError) or error.limit is None:
        return None
    details = []
    quota = any_pb2.Any()
    quota.Pack(error_details_pb2.QuotaFailure(violations=[
        error_details_pb2.QuotaFailure.Violation(subject=error.limit, description=error.message)
    ]))
    details.append(quota)
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(error.retry_after_s * 1e9))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    code, message = status_of(error)
    return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details))
