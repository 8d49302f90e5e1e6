"""One mapping from what went wrong to a gRPC status; every message names the field or adapter."""

from __future__ import annotations

import grpc

from loraplex.engine.errors import DuplicateRequestError, EngineClosedError, EngineOverloadedError
from loraplex.lora.adapter_spec import AdapterError
from loraplex.lora.adapter_version import AdapterNotFoundError


class ApiError(Exception):
    """An error with its status, raised anywhere in the API layer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, problem: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message for an exception raised while serving a call."""
    if isinstance(error, ApiError):
        return error.code, error.message
    if isinstance(error, AdapterNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, AdapterError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, DuplicateRequestError):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, EngineOverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {error}; retry later"
    if isinstance(error, EngineClosedError):
        return grpc.StatusCode.UNAVAILABLE, "the server is shutting down"
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
