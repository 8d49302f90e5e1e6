"""How a call crosses the Ray hop: the replica runs the loraplex.v1 service's own methods and
hands their outcome to the ingress, which answers the gRPC caller with it.

    Ingress ──handle──> Replica: LoraPlexService.<Method>(request, ReplicaContext())
                           context.abort(code, details) ──raises──> CallError(code, details)
    Ingress <── CallError (through Ray) → that status; the replica died (RayActorError) →
                UNAVAILABLE; Serve's queue full (BackPressureError) → RESOURCE_EXHAUSTED

No Ray import here: the ingress, the replica and the tests share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

REPLICA_DIED = "the replica serving this request stopped; retry (Ray Serve is starting a new one)"


class CallError(Exception):
    """A status the replica answered (its code by name: picklable, and Ray re-raises it as is)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple[type[CallError], tuple[str, str]]:
        return CallError, (self.code, self.details)

    @property
    def status(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]


class ReplicaContext:
    """The part of grpc.aio.ServicerContext that LoraPlexService uses, inside a replica."""

    def __init__(self, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._metadata = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = None) -> None:
        raise CallError(code.name, details)

    async def abort_with_status(self, status: Any) -> None:  # grpc_status rich details
        raise CallError(status.code.name, status.details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ray-serve"

    def set_code(self, code: grpc.StatusCode) -> None:  # a handler that sets a code without aborting
        raise CallError(code.name, "")


def status_of_failure(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failed replica call ends the gRPC call with (no Ray import: by class name)."""
    # Ray wraps a replica's exception in a RayTaskError that also subclasses it and keeps it as .cause.
    for cause in (getattr(error, "cause", None), error):
        if isinstance(cause, CallError) and hasattr(cause, "code"):
            return cause.status, cause.details
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError"}:
        return grpc.StatusCode.UNAVAILABLE, REPLICA_DIED
    if "BackPressureError" in names:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the cluster is overloaded ({error}); retry later"
    if names & {"TimeoutError", "RequestTimeoutError"}:
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
