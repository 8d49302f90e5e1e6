"""loraplex client SDK: blocking (Client) and asyncio (AsyncClient) over gRPC.

Needs only grpcio and protobuf. Results are plain dataclasses (types.py); failed calls
raise LoraplexError subclasses (errors.py).
"""

from loraplex_client._convert import GenerateOptions
from loraplex_client.aio import AsyncClient
from loraplex_client.client import Client
from loraplex_client.errors import (
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AuthenticationError,
    DeadlineExceededError,
    InternalServerError,
    InvalidRequestError,
    LoraplexError,
    OverloadedError,
    PermissionDeniedError,
    QuotaExceededError,
    RequestAbortedError,
    RequestCancelledError,
    RequestConflictError,
    ServerUnavailableError,
)
from loraplex_client.stream import AsyncGenerateStream, GenerateStream
from loraplex_client.types import (
    AdapterInfo,
    AdapterStats,
    FinishReason,
    GenerateChunk,
    GenerateResult,
    ModelInfo,
    Sample,
    TokenizeResult,
    TokenLogprob,
    UnloadResult,
    Usage,
)

__all__ = [
    "AdapterIncompatibleError",
    "AdapterInfo",
    "AdapterNotFoundError",
    "AdapterStats",
    "AsyncClient",
    "AsyncGenerateStream",
    "AuthenticationError",
    "Client",
    "DeadlineExceededError",
    "FinishReason",
    "GenerateChunk",
    "GenerateOptions",
    "GenerateResult",
    "GenerateStream",
    "InternalServerError",
    "InvalidRequestError",
    "LoraplexError",
    "ModelInfo",
    "OverloadedError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "RequestAbortedError",
    "RequestCancelledError",
    "RequestConflictError",
    "Sample",
    "ServerUnavailableError",
    "TokenLogprob",
    "TokenizeResult",
    "UnloadResult",
    "Usage",
]
