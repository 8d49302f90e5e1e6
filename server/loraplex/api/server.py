"""The gRPC server around one engine: service, health, reflection, auth, TLS, warm-up and drain.

Start-up:  (the caller reads the tenants file, then loads the engine) → preload → bind
           /metrics, gRPC (over TLS with --tls-cert) and the OpenAI-compatible HTTP API, each
           port exclusively (a taken one: StartupError) → listen (liveness SERVING) → warm up
           one request → readiness SERVING (and HTTP /health 200) → SIGTERM / SIGINT now drain.
Running:   a watchdog turns readiness NOT_SERVING while the engine loop makes no progress;
           SIGHUP reloads the tenants file (auth.Auth.reload: streams in flight go on).
           Both doors identify callers through the one auth seam (auth.Auth).
Shutdown:  SIGTERM/SIGINT → readiness NOT_SERVING, new calls UNAVAILABLE (HTTP 503), in-flight
           streams of both doors get up to drain_timeout to finish, the rest end UNAVAILABLE
           (an error event on an HTTP stream), then HTTP and gRPC stop listening, exit 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from loraplex import startup
from loraplex.api.auth import Auth
from loraplex.api.decode_guard import DecodeGuard
from loraplex.api.engine_loop import EngineLoop
from loraplex.api.grpc_auth import AuthInterceptor
from loraplex.api.http_app import build_app
from loraplex.api.http_server import HttpServer, TlsFiles
from loraplex.api.metrics import Metrics
from loraplex.api.openai_front import OpenAIFront
from loraplex.api.quotas import Quotas
from loraplex.api.service import SHUTDOWN_REASON, LoraPlexService
from loraplex.config import ANY_PORT, ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import ErrorKind
from loraplex.lora.adapter_spec import AdapterError
from loraplex.lora.adapter_version import AdapterNotFoundError
from loraplex.rules import InvalidFieldError
from loraplex_proto.health import READY_SERVICE
from loraplex_proto.v1 import loraplex_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = READY_SERVICE  # "loraplex.v1.LoraPlex": readiness; "" is liveness
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WATCHDOG_PERIOD_S = 0.5


def server_credentials(api: ApiConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert / --tls-key, requiring client certificates signed by
    --tls-client-ca when given (mTLS); None without --tls-cert (plaintext)."""
    if api.tls_cert is None or api.tls_key is None:
        return None

    def read(option: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise startup.StartupError(f"--{option.replace('_', '-')}: cannot read {path}: {e.strerror}") from None

    client_ca = read("tls_client_ca", api.tls_client_ca) if api.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read("tls_key", api.tls_key), read("tls_cert", api.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class Server:
    def __init__(self, config: ServerConfig, engine: Engine, auth: Auth | None = None) -> None:
        """auth: the tenants and tokens; by default read from config.api (TenantFileError if unusable)."""
        self.config = config
        self.engine = engine
        self.auth = auth or Auth.from_options(config.api.tenants_file, config.api.auth_tokens)
        self.health = HealthServicer()
        self.port = 0
        self.ready = False
        self.draining = False
        self._grpc: grpc.aio.Server | None = None
        self._grpc_started = False
        self._watchdog: asyncio.Task[None] | None = None
        self.engine_loop: EngineLoop | None = None
        self.service: LoraPlexService | None = None
        self.metrics: Metrics | None = None
        self.metrics_port = 0  # bound /metrics port; 0 while off
        self.http: HttpServer | None = None
        self.http_front: OpenAIFront | None = None
        self.http_port = 0  # bound HTTP API port; 0 while off
        self.on_ready: Callable[[], None] | None = None

    async def start(self) -> int:
        """Bind the gRPC, metrics and HTTP ports, then start the engine loop and serve.

        A port that cannot be bound raises StartupError ("port N is already in use") before
        the engine is touched; whatever was set up is released again.
        """
        try:
            return await self._start()
        except BaseException:
            await self._release()
            raise

    async def _start(self) -> int:
        api = self.config.api
        credentials = server_credentials(api)
        self.engine_loop = EngineLoop(self.engine, asyncio.get_running_loop(), Quotas())
        self.service = LoraPlexService(self.engine_loop, self.config, self.auth)
        if api.metrics_port:
            self.metrics = Metrics(self.engine, top_adapters=api.metrics_top_adapters, tenant_label=self.auth.label)
            with startup.binding("metrics", api.host, api.metrics_port, "--metrics-port"):
                self.metrics_port = self.metrics.serve(api.host, api.metrics_port)
            self.metrics.attach(self.engine_loop)  # before the loop starts: warm-up counts too
            self.auth.on_denied = self.metrics.on_denied
        if api.http_port:
            self._bind_http()
        # grpc sets SO_REUSEPORT by default: a second server on the port would start and take
        # half of the calls. Without it a taken port fails the bind, which grpc reports as a
        # RuntimeError (or port 0, in older versions) without the reason: bind_failed finds it.
        server = grpc.aio.server(interceptors=[AuthInterceptor(self.auth), DecodeGuard()], options=[("grpc.so_reuseport", 0)])
        self._grpc = server
        pb_grpc.add_LoraPlexServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server)
        address = f"{api.host}:{api.port}"
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise startup.bind_failed("gRPC", api.host, api.port, "--port")
        self.engine_loop.start()
        await self.health.set("", SERVING)  # live
        await self.health.set(SERVICE_NAME, NOT_SERVING)  # not ready before warm-up
        await server.start()
        self._grpc_started = True
        tls = "plaintext" if credentials is None else "TLS, client certificates required" if api.tls_client_ca else "TLS"
        if self.http is not None:
            await self.http.start()
            assert self.http_front is not None
            log.info(
                "listening on %s:%d (OpenAI-compatible HTTP API, model %r; %s)", api.host, self.http_port,
                self.http_front.served_model_name, tls,
            )
        self._watchdog = asyncio.create_task(self._watch())
        log.info("listening on %s:%d (gRPC %s, health, reflection; %s)", api.host, self.port, SERVICE_NAME, tls)
        log.log(logging.WARNING if self.auth.open else logging.INFO, "auth: %s", self.auth.describe())
        return self.port

    def _bind_http(self) -> None:
        api = self.config.api
        assert self.engine_loop is not None
        name = api.served_model_name or Path(self.engine.loaded.path).name
        self.http_front = OpenAIFront(self.engine_loop, name, self.auth)
        port = 0 if api.http_port == ANY_PORT else api.http_port  # the socket's own 0: the OS picks
        tls = None if api.tls_cert is None or api.tls_key is None else TlsFiles(api.tls_cert, api.tls_key, api.tls_client_ca)
        self.http = HttpServer(build_app(self.http_front), api.host, port, tls)
        with startup.binding("HTTP", api.host, port, "--http-port"):
            self.http_port = self.http.bind()

    async def _release(self) -> None:
        """Undo a start that failed part-way (a port taken, Ctrl-C)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._grpc is not None:
            if self.port and not self._grpc_started:
                await self._grpc.start()  # a bound server that never started keeps its port until it stops
            await self._grpc.stop(None)
        if self.engine_loop is not None and self.engine_loop.alive:
            self.engine_loop.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.http is not None:
            await self.http.stop()

    async def warm_up(self) -> None:
        """Run one short request through the whole path, then report ready."""
        assert self.engine_loop is not None and self.service is not None
        seconds = await self.engine_loop.warm_up()
        self.ready = True
        self.service.ready = True
        if self.http_front is not None:
            self.http_front.ready = True
        await self.health.set(SERVICE_NAME, SERVING)
        log.info("ready (warm-up %.2fs)", seconds)
        if self.on_ready is not None:
            self.on_ready()

    def _stalled(self) -> str | None:
        if self.engine_loop is None:
            return "no engine loop"
        return self.engine_loop.stalled(self.config.api.heartbeat_timeout_s)

    async def _watch(self) -> None:
        healthy = True
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            if not self.ready or self.draining:
                continue
            problem = self._stalled()
            if problem is not None and healthy:
                log.error("readiness NOT_SERVING: %s", problem)
                await self.health.set(SERVICE_NAME, NOT_SERVING)
            elif problem is None and not healthy:
                log.info("readiness SERVING again: the engine loop is making progress")
                await self.health.set(SERVICE_NAME, SERVING)
            healthy = problem is None

    async def drain(self, timeout: float) -> None:
        """Stop taking requests, let in-flight ones finish for `timeout` seconds, end the rest."""
        assert self.engine_loop is not None and self._grpc is not None
        self.draining = True
        await self.health.set(SERVICE_NAME, NOT_SERVING)
        if self.service is not None:
            self.service.draining = True
        if self.http_front is not None:
            self.http_front.draining = True
        self.engine.stop_accepting()
        engine_loop = self.engine_loop
        log.info("draining: %d streams in flight, up to %.1fs", engine_loop.num_streams, timeout)
        deadline = time.monotonic() + timeout
        while engine_loop.num_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine_loop.num_streams:
            log.warning("drain timeout: ending %d streams with UNAVAILABLE", engine_loop.num_streams)
            engine_loop.abort_all(ErrorKind.SHUTDOWN, SHUTDOWN_REASON)
            end = time.monotonic() + 5.0
            while engine_loop.num_streams and time.monotonic() < end:
                await asyncio.sleep(0.02)
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        await self._grpc.stop(grace=1.0)
        if self._watchdog is not None:
            self._watchdog.cancel()
        engine_loop.stop()
        if self.metrics is not None:
            self.metrics.close()
        log.info("stopped")

    async def stop(self) -> None:
        await self.drain(0.0)


async def serve(
    config: ServerConfig, engine: Engine, *, preload: dict[str, str] | None = None, auth: Auth | None = None
) -> int:
    """Preload, bind, warm up, then run until SIGTERM / SIGINT and drain; SIGHUP reloads the
    tenants file. Returns the exit code. `auth`: read by the caller before the model loaded
    (a bad tenants file stops it early); by default read here.

    Until the server is ready nothing needs draining: SIGINT raises KeyboardInterrupt as it
    does anywhere (the CLI reports it in one line) and SIGTERM ends the process.
    """
    try:
        auth = auth or Auth.from_options(config.api.tenants_file, config.api.auth_tokens)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, auth.reload)
        for adapter_id, path in (preload or {}).items():
            try:
                await asyncio.to_thread(engine.register_adapter, adapter_id, path)
            except (AdapterError, AdapterNotFoundError, InvalidFieldError) as e:
                raise startup.StartupError(
                    f"--preload {adapter_id}={path}: {e}", "give a directory relative to --adapter-root, or drop the --preload"
                ) from e
        server = Server(config, engine, auth)
        await server.start()
        try:
            await server.warm_up()
        except BaseException:
            await server.stop()
            raise
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining for up to %.1fs", config.api.drain_timeout_s)
        await server.drain(config.api.drain_timeout_s)
        return 0
    finally:
        engine.close()


class BackgroundServer:
    """A server on its own event loop thread (tests, benchmarks, the demo)."""

    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.server = Server(config, engine)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)

    def start(self, warm_up: bool = True) -> str:
        self._thread.start()
        port = self.call(self.server.start())
        if warm_up:
            self.call(self.server.warm_up())
        return f"{self.server.config.api.host}:{port}"

    def call(self, coro: Any, timeout: float | None = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def begin_drain(self, drain_timeout: float) -> concurrent.futures.Future[None]:
        """Start draining (as SIGTERM does) without waiting for it."""
        return asyncio.run_coroutine_threadsafe(self.server.drain(drain_timeout), self._loop)

    def close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def stop(self, drain_timeout: float = 0.0) -> None:
        self.call(self.server.drain(drain_timeout))
        self.close_loop()
