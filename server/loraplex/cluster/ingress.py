"""The cluster's front door: Ray Serve's gRPC proxy calls these methods by RPC name
(loraplex.v1.LoraPlex and grpc.health.v1.Health), so the unchanged SDK, grpcurl and
`loraplex healthcheck` work against the cluster as against one server; Ray Serve's HTTP
proxy calls `__call__`, the OpenAI-compatible API (http.py).

    Generate, GenerateStream, GetAdapter ──> one replica, routed by the request's adapter id
                                             (multiplexed_model_id): the one holding it if any
    LoadAdapter, UploadAdapter ──> validated and registered on one replica (routed the same
        way), recorded in the shared registry, then every replica holding an older version
        re-registers it (`refresh`); a pinned adapter is registered on every replica
    UnloadAdapter ──> removed from the registry, then from every replica (broadcast)
    ListAdapters ──> every replica's list, merged by id; registered ids no replica holds
    GetModelInfo ──> any replica;  Health.Check ──> ready while any replica is

Failures reach the caller with the replica's own status; a replica that dies mid-request
ends that request with UNAVAILABLE (calls.py). A streaming method must raise after setting
the code: Serve sends the context only with a yielded message, so a plain return would
end the stream OK. No torch here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from loraplex.cluster.calls import CallError, status_of_failure
from loraplex.cluster.http import HttpDoor
from loraplex.cluster.registry import AdapterRegistry, RegistryEntry
from loraplex_proto.health import READY_SERVICE
from loraplex_proto.v1 import loraplex_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")
READY_TIMEOUT_S = 5.0
TIERS = (pb.ADAPTER_TIER_REGISTERED, pb.ADAPTER_TIER_HOST, pb.ADAPTER_TIER_DEVICE)  # lowest first


class Ingress:
    """The ingress deployment class (app.py wraps it with serve.deployment)."""

    def __init__(
        self, replicas: DeploymentHandle, adapter_root: str | None, max_upload_bytes: int, base_name: str
    ) -> None:
        self.replicas = replicas
        self.registry = AdapterRegistry(adapter_root) if adapter_root else None
        self.max_upload_bytes = max_upload_bytes
        self.route_by_adapter = True  # False: Ray's default routing (cluster_bench compares the two)
        self.http = HttpDoor(self, base_name)

    def to_replica(self, adapter_id: str, stream: bool = False) -> DeploymentHandle:
        return self.replicas.options(multiplexed_model_id=adapter_id if self.route_by_adapter else "", stream=stream)

    def set_route_by_adapter(self, on: bool) -> None:
        self.route_by_adapter = on

    async def _answer(self, context: RayServegRPCContext | None, empty: T, call: Callable[[], Awaitable[T]]) -> T:
        """Run a unary call; a failure becomes the call's status (a CallError for handle callers)."""
        try:
            return await call()
        except Exception as e:
            code, details = status_of_failure(e)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("call failed", exc_info=e)
            if context is None:
                raise CallError(code.name, details) from None
            context.set_code(code)
            context.set_details(details)
            return empty

    def _registry(self) -> AdapterRegistry:
        if self.registry is None:
            raise CallError("FAILED_PRECONDITION", "no adapter root is configured for loaded adapters")
        return self.registry

    # -- generation ----------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext | None = None) -> pb.GenerateResponse:
        return await self._answer(
            grpc_context, pb.GenerateResponse(), lambda: self.to_replica(request.adapter_id).Generate.remote(request)
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext | None = None
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            chunks: Any = self.to_replica(request.adapter_id, stream=True).GenerateStream.remote(request)
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            code, details = status_of_failure(e)
            if grpc_context is None:
                raise CallError(code.name, details) from None
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            raise CallError(code.name, details) from None  # raising keeps the code (see above)

    # -- adapters ----------------------------------------------------------------------------------

    async def _record(self, info: pb.AdapterInfo, path: str, pin: bool) -> pb.AdapterInfo:
        """After one replica validated and registered it: the registry, then the others."""
        entry = RegistryEntry(info.adapter_id, path, pin, info.content_hash, info.rank, tuple(info.target_modules))
        await asyncio.to_thread(self._registry().put, entry)
        results = await self.replicas.broadcast("refresh", info.adapter_id, pin).results_async(return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.warning("refresh of %s failed on a replica: %s", info.adapter_id, result)
        return info

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, grpc_context: RayServegRPCContext | None = None) -> pb.AdapterInfo:
        async def call() -> pb.AdapterInfo:
            self._registry()
            info = await self.to_replica(request.adapter_id).LoadAdapter.remote(request)
            return await self._record(info, request.path, request.pin)

        return await self._answer(grpc_context, pb.AdapterInfo(), call)

    async def UploadAdapter(
        self, request_stream: gRPCInputStream, grpc_context: RayServegRPCContext | None = None
    ) -> pb.AdapterInfo:
        async def call() -> pb.AdapterInfo:
            self._registry()
            messages, received = [], 0
            async for message in request_stream:
                received += len(message.chunk.data)
                if received > self.max_upload_bytes:
                    raise CallError("RESOURCE_EXHAUSTED", f"upload larger than the limit of {self.max_upload_bytes} bytes")
                messages.append(message)
            header = next((m.header for m in messages if m.HasField("header")), None)
            adapter_id = header.adapter_id if header is not None else ""
            # The replica checks the messages as one server would, and stores the files under
            # the shared root (content-addressed), where every replica reads them.
            info = await self.to_replica(adapter_id).UploadAdapter.remote(messages)
            return await self._record(info, info.path, header.pin if header is not None else False)

        return await self._answer(grpc_context, pb.AdapterInfo(), call)

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.UnloadAdapterResponse:
        async def call() -> pb.UnloadAdapterResponse:
            if not request.adapter_id:
                raise CallError("INVALID_ARGUMENT", "adapter_id: is required")
            recorded = self.registry is not None and await asyncio.to_thread(self.registry.remove, request.adapter_id)
            results = await self.replicas.broadcast("unload", request.adapter_id, request.force).results_async()
            held = [r for r in results if r is not None]
            if not held and not recorded:
                raise CallError("NOT_FOUND", f"adapter {request.adapter_id!r} is not registered")
            return pb.UnloadAdapterResponse(adapter_id=request.adapter_id, aborted_requests=sum(held))

        return await self._answer(grpc_context, pb.UnloadAdapterResponse(), call)

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.ListAdaptersResponse:
        async def call() -> pb.ListAdaptersResponse:
            lists = await self.replicas.broadcast("adapters").results_async()
            merged = merge_adapter_lists(lists)
            for entry in await asyncio.to_thread(self.registry.entries) if self.registry is not None else []:
                if entry.adapter_id not in merged:
                    merged[entry.adapter_id] = pb.AdapterInfo(
                        adapter_id=entry.adapter_id, path=entry.path, pinned=entry.pin, content_hash=entry.content_hash,
                        rank=entry.rank, target_modules=list(entry.target_modules), tier=pb.ADAPTER_TIER_REGISTERED,
                    )
            return pb.ListAdaptersResponse(adapters=[merged[k] for k in sorted(merged)])

        return await self._answer(grpc_context, pb.ListAdaptersResponse(), call)

    async def GetAdapter(self, request: pb.GetAdapterRequest, grpc_context: RayServegRPCContext | None = None) -> pb.AdapterInfo:
        return await self._answer(
            grpc_context, pb.AdapterInfo(), lambda: self.to_replica(request.adapter_id).GetAdapter.remote(request)
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context: RayServegRPCContext | None = None) -> pb.ModelInfo:
        return await self._answer(grpc_context, pb.ModelInfo(), lambda: self.replicas.GetModelInfo.remote(request))

    # -- grpc.health.v1 ----------------------------------------------------------------------------

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext | None = None
    ) -> health_pb2.HealthCheckResponse:
        """Liveness ("") while the ingress answers; readiness while any replica is ready."""
        if request.service == "":
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        if request.service != READY_SERVICE:
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        ready = await self.any_ready()
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def any_ready(self) -> bool:
        """A replica answers that it is ready (Serve routes to live replicas only)."""
        try:
            return bool(await asyncio.wait_for(self.replicas.ready.remote(), READY_TIMEOUT_S))
        except Exception:
            return False

    # -- the OpenAI-compatible HTTP API (Ray Serve's HTTP proxy) -------------------------------------

    async def __call__(self, request: Request) -> Response:
        return await self.http.answer(request)

    async def stats(self) -> list[dict[str, Any]]:
        """Every live replica's routing and store numbers (tests, the cluster benchmark)."""
        results = await self.replicas.broadcast("stats").results_async(return_exceptions=True)
        return [r for r in results if not isinstance(r, BaseException)]


def merge_adapter_lists(lists: list[list[pb.AdapterInfo]]) -> dict[str, pb.AdapterInfo]:
    """One AdapterInfo per id over the replicas holding it: the highest tier and version
    number (numbers count per replica), requests and stats summed."""
    merged: dict[str, pb.AdapterInfo] = {}
    for infos in lists:
        for info in infos:
            seen = merged.get(info.adapter_id)
            if seen is None:
                merged[info.adapter_id] = out = pb.AdapterInfo()
                out.CopyFrom(info)
                continue
            seen.tier = max(seen.tier, info.tier, key=TIERS.index)
            seen.version = max(seen.version, info.version)
            seen.active_requests += info.active_requests
            seen.loading = seen.loading or info.loading
            for field in ("requests", "host_hits", "host_misses", "device_hits", "device_misses", "loads", "evictions"):
                setattr(seen.stats, field, getattr(seen.stats, field) + getattr(info.stats, field))
            seen.stats.last_used_unix = max(seen.stats.last_used_unix, info.stats.last_used_unix)
    return merged
