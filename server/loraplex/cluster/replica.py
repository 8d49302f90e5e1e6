"""One engine replica of the Ray Serve application: the same Engine, engine loop and
loraplex.v1 service code as `loraplex serve`, called through Ray instead of a gRPC port.

    Ingress ──handle.options(multiplexed_model_id=id)──> Generate / GenerateStream / GetAdapter
        └─> hold(id): Serve's @serve.multiplexed LRU (max_adapters_per_replica ids)
               miss → register(id): the registry's path (registry.py), else auto-register
        └─> LoraPlexService.<Method>(request, ReplicaContext())  (calls.py maps its statuses)
    Ingress ──handle.broadcast──> refresh(id) after LoadAdapter, unload(id), adapters(), stats()

The router's view of where an adapter lives follows this replica's own store: the LRU
evicting an id unregisters it here (its running requests finish on it first); an id
unloaded here leaves the LRU at once, so the router stops sending its requests here.
No @serve.batch: the engine batches requests of every adapter together in one step, while
Serve's batching would split batches by model id.

Health: __init__ returns once the model is loaded and a warm-up request has run (Serve
routes nothing here before); check_health raises while the engine loop is stalled or dead,
so Serve replaces the replica (api/server.py's readiness rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ray import serve

from loraplex.cluster.calls import CallError, ReplicaContext
from loraplex.cluster.http import asgi_exchange, served_model_name
from loraplex.cluster.registry import AdapterRegistry
from loraplex.config import ServerConfig
from loraplex_proto.v1 import loraplex_pb2 as pb

if TYPE_CHECKING:
    from loraplex.api.engine_loop import EngineLoop
    from loraplex.api.service import LoraPlexService
    from loraplex.engine.engine import Engine

log = logging.getLogger(__name__)

MULTIPLEX_ATTR = "__serve_multiplex_wrapper"  # where @serve.multiplexed keeps its LRU (Ray 2.60)


class HeldAdapter:
    """An adapter id in Serve's multiplex LRU on this replica; Serve calls __del__ (in a
    thread) when its LRU evicts the id, and the GC may call it again later: only the
    version registered here for this hold is unregistered, once."""

    def __init__(self, replica: Replica, adapter_id: str, version: object) -> None:
        self.replica, self.adapter_id, self.version = replica, adapter_id, version
        self.released = False

    def __del__(self) -> None:
        if not self.released:
            self.released = True
            try:
                self.replica.evicted(self)
            except Exception:  # never raise from __del__ (the GC may call it during shutdown)
                log.debug("releasing adapter %s failed", self.adapter_id, exc_info=True)


class Replica:
    """The deployment class (app.py wraps it with serve.deployment and its options)."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, config: ServerConfig, max_adapters_per_replica: int, log_level: str = "info"
    ) -> None:
        from loraplex.api.auth import Auth
        from loraplex.api.engine_loop import EngineLoop
        from loraplex.api.http_app import build_app
        from loraplex.api.openai_front import OpenAIFront
        from loraplex.api.service import LoraPlexService
        from loraplex.engine.engine import Engine
        from loraplex.logs import configure

        configure(log_level, "text")
        self.config = config
        self.name = serve.get_replica_context().replica_id.to_full_id_str()
        self.engine: Engine = await asyncio.to_thread(Engine, config.engine)
        self.engine_loop: EngineLoop = EngineLoop(self.engine, asyncio.get_running_loop())
        self.engine_loop.start()
        # The cluster checks no tokens (app.py): an open Auth, every caller anonymous.
        auth = Auth()
        self.service: LoraPlexService = LoraPlexService(self.engine_loop, config, auth)
        # The OpenAI API's own app over this engine loop.
        self.http_front = OpenAIFront(self.engine_loop, served_model_name(config), auth)
        self.http_app = build_app(self.http_front)
        roots = self.engine.adapter_roots
        self.registry = AdapterRegistry(roots[0]) if roots else None
        self.requests = 0  # generation requests that named an adapter
        self.misses = 0  # of them, those whose adapter was not held here when they arrived
        self.adapter_loads = 0  # multiplex misses of any call (requests, loads, refreshes)

        async def hold(adapter_id: str) -> HeldAdapter:
            return await self._register(adapter_id)

        self._hold_fn = hold
        self.max_adapters = max_adapters_per_replica or host_tier_adapters(self.engine)
        self._hold = serve.multiplexed(max_num_models_per_replica=self.max_adapters)(hold)
        warm = await self.engine_loop.warm_up()
        self.service.ready = True
        self.http_front.ready = True
        log.info("replica %s ready (warm-up %.2fs, up to %d adapters held)", self.name, warm, self.max_adapters)

    # -- adapters in Serve's view ------------------------------------------------------------

    async def _register(self, adapter_id: str) -> HeldAdapter:
        """Serve's multiplex miss: make the id known here, from the registry or by its name."""
        self.adapter_loads += 1
        version = await asyncio.to_thread(self._register_sync, adapter_id)
        return HeldAdapter(self, adapter_id, version)

    def _register_sync(self, adapter_id: str) -> object:
        entry = self.registry.get(adapter_id) if self.registry is not None else None
        if entry is not None:
            self.engine.register_adapter(adapter_id, entry.path, pin=entry.pin, relative_only=True)
            version = self.engine.lookup_adapter(adapter_id)
            assert version is not None
            return version
        return self.engine.resolve_adapter(adapter_id)  # auto-register, or AdapterNotFoundError

    async def _held(self, adapter_id: str, counted: bool = False) -> None:
        """Make an adapter held here (statuses as the service's own); a request counts as a
        miss when its adapter was not held here as it arrived."""
        if not adapter_id:
            return
        if counted:
            self.requests += 1
            self.misses += adapter_id not in self.held_ids()
        try:
            await self._hold(adapter_id)
        except Exception as e:
            from loraplex.api.errors import status_of

            code, message = status_of(e)
            raise CallError(code.name, message) from None

    def evicted(self, held: HeldAdapter) -> None:
        """Serve's LRU let go of an id: unregister the version held for it (not a pinned one)."""
        version = self.engine.lookup_adapter(held.adapter_id)
        if version is held.version and not getattr(version, "pinned", False):
            try:
                self.engine.unregister_adapter(held.adapter_id)
                log.info("adapter %s left this replica (Serve's LRU evicted it)", held.adapter_id)
            except KeyError:
                pass

    def _release(self, adapter_id: str) -> None:
        """Drop an id from Serve's view of this replica (pushed to the router within 0.1 s)."""
        wrapper = getattr(self._hold_fn, MULTIPLEX_ATTR, None)
        models = getattr(wrapper, "models", None)
        if models is None or adapter_id not in models:
            return
        held = models.pop(adapter_id)
        held.released = True
        wrapper._push_multiplexed_replica_info = True  # type: ignore[union-attr]

    def held_ids(self) -> list[str]:
        wrapper = getattr(self._hold_fn, MULTIPLEX_ATTR, None)
        return list(getattr(wrapper, "models", {}))

    # -- the loraplex.v1 calls the ingress forwards ----------------------------------------------

    async def _unary(self, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
        return await method(request, ReplicaContext())

    async def Generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        await self._held(request.adapter_id, counted=True)
        return await self._unary(self.service.Generate, request)

    async def GenerateStream(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateStreamResponse]:
        await self._held(request.adapter_id, counted=True)
        async for chunk in self.service.GenerateStream(request, ReplicaContext()):
            yield chunk

    async def GetAdapter(self, request: pb.GetAdapterRequest) -> pb.AdapterInfo:
        await self._held(request.adapter_id)
        return await self._unary(self.service.GetAdapter, request)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest) -> pb.ModelInfo:
        return await self._unary(self.service.GetModelInfo, request)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest) -> pb.AdapterInfo:
        """Validate and register here (the ingress then records it in the registry)."""
        info = await self._unary(self.service.LoadAdapter, request)
        await self._held(request.adapter_id)
        return info

    async def UploadAdapter(self, messages: list[pb.UploadAdapterRequest]) -> pb.AdapterInfo:
        """The upload's messages, gathered by the ingress: stored under the shared root, registered here."""

        async def replay() -> AsyncIterator[pb.UploadAdapterRequest]:
            for message in messages:
                yield message

        info = await self.service.UploadAdapter(replay(), ReplicaContext())
        await self._held(info.adapter_id)
        return info

    async def http(
        self, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes, adapter_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        """An OpenAI API request the ingress routed here by its model (http.py): this replica's
        own HTTP app answers it; the response start, then body chunks as they are sent."""
        if adapter_id:
            with contextlib.suppress(CallError):  # an unknown model: the app answers 404 in OpenAI's shape
                await self._held(adapter_id, counted=True)
        async for message in asgi_exchange(self.http_app, method, path, query, headers, body):
            yield message

    # -- broadcasts (every replica) -------------------------------------------------------------

    async def refresh(self, adapter_id: str, everywhere: bool) -> None:
        """After LoadAdapter: re-register from the registry where the id is held (new content
        makes a new version), or on every replica when it is pinned (`everywhere`)."""
        if everywhere or self.engine.lookup_adapter(adapter_id) is not None:
            try:
                await asyncio.to_thread(self._register_sync, adapter_id)
                await self._hold(adapter_id)
            except Exception as e:  # the ingress already validated it on one replica
                log.warning("refreshing adapter %s failed here: %s", adapter_id, e)

    async def unload(self, adapter_id: str, force: bool) -> int | None:
        """Forget an id here: None if it was not registered here, else how many requests were aborted."""
        self._release(adapter_id)
        if self.engine.lookup_adapter(adapter_id) is None:
            return None
        try:
            response = await self._unary(
                self.service.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id=adapter_id, force=force)
            )
        except CallError as e:
            if e.status.name == "NOT_FOUND":
                return None
            raise
        return int(response.aborted_requests)

    async def adapters(self) -> list[pb.AdapterInfo]:
        response = await self._unary(self.service.ListAdapters, pb.ListAdaptersRequest())
        return list(response.adapters)

    def stats(self) -> dict[str, Any]:
        """This replica's routing and adapter-store numbers (tests and the cluster benchmark)."""
        store = self.engine.stats().adapters
        return {
            "replica": self.name,
            "requests": self.requests,
            "misses": self.misses,
            "adapter_loads": self.adapter_loads,
            "held": self.held_ids(),
            "registered": [info.adapter_id for info in self.engine.adapter_infos()],
            "max_held": self.max_adapters,
            "in_flight": self.engine_loop.stream_ids(),
            "store": {f"{tier}_{event}": n for (tier, event), n in store.counters.items()},
        }

    def ready(self) -> bool:
        return self.service.ready and self.engine_loop.alive

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising 3 times replaces the replica."""
        problem = self.engine_loop.stalled(self.config.api.heartbeat_timeout_s)
        if problem is not None:
            raise RuntimeError(f"loraplex replica not ready: {problem}")



def host_tier_adapters(engine: Engine) -> int:
    """How many adapters of the largest servable size (max_lora_rank on every LoRA layer)
    the host tier holds, at least the device slots: Serve's LRU size by default."""
    lora = engine.config.lora
    per_adapter = lora.max_lora_rank * engine.store.itemsize * sum(
        layer.in_features + layer.out_features for layer in engine.store.layers.values()
    )
    return max(lora.max_loras, lora.max_host_adapter_bytes // max(1, per_adapter))
