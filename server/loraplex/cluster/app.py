"""Building and running the Ray Serve application.

    deploy/ray/serve_config.yaml ── import_path: loraplex.cluster.app:build_app, args: {...}
    loraplex serve-ray ...        ── run_cluster(): ray.init → serve.start (gRPC + HTTP proxies) → serve.run
                     both ──> application(config, options): Ingress.bind(Replica.bind(...))

`args` take the `loraplex serve` option names with TOML-typed values (the same rules as its
--config file; LORAPLEX_* variables apply too), plus the ClusterOptions fields. A Serve
config's `deployments:` entries override the deployment options set here (replicas,
autoscaling, health checks, resources).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from loraplex import settings
from loraplex.cluster.http import served_model_name
from loraplex.cluster.ingress import Ingress
from loraplex.cluster.replica import Replica
from loraplex.config import ServerConfig
from loraplex.ports import free_ports
from loraplex.rules import InvalidFieldError, is_s3_uri

log = logging.getLogger(__name__)

APP_NAME = "loraplex"
# The servicers Ray's gRPC proxy serves: it calls the ingress method named like each RPC.
GRPC_SERVICERS = (
    "loraplex_proto.v1.loraplex_pb2_grpc.add_LoraPlexServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    replicas: int = 1  # engine replicas (the minimum, with autoscaling)
    max_replicas: int = 0  # > replicas: autoscale between them by queue length; 0: fixed
    max_adapters_per_replica: int = 0  # Serve's multiplex LRU size; 0: as many as the host tier holds
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 0  # per replica, past it Serve queues; 0: twice max_num_seqs
    health_check_period_s: float = 5.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidFieldError("replicas", f"replicas must be >= 1, got {self.replicas}")
        if self.max_replicas and self.max_replicas < self.replicas:
            raise InvalidFieldError("max_replicas", f"max_replicas must be 0 or >= replicas ({self.replicas})")
        for name in ("max_adapters_per_replica", "max_ongoing_requests"):
            if getattr(self, name) < 0:
                raise InvalidFieldError(name, f"{name} must be >= 0")

    @classmethod
    def pop_from(cls, args: dict[str, Any]) -> ClusterOptions:
        """The cluster fields of a Serve config's args (removed from it)."""
        return cls(**{f.name: args.pop(f.name) for f in fields(cls) if f.name in args})


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """Serve's application builder (a Serve config's import_path)."""
    remaining = {k.replace("-", "_"): v for k, v in dict(args).items()}
    options = ClusterOptions.pop_from(remaining)
    values, sources = settings.resolve_mapping(remaining, "the application's args")
    config = settings.build_config(settings.with_demo_model(values, sources), sources)
    return application(config, options, log_level=values["log_level"])


def check_cluster_config(config: ServerConfig) -> None:
    """What one server accepts but the cluster cannot honour (InvalidFieldError naming it)."""
    if config.api.auth_tokens:  # Ray's gRPC proxy has no interceptors: nothing would check them
        raise InvalidFieldError(
            "auth_tokens", "auth_token: bearer tokens are not checked through Ray Serve yet; the cluster refuses "
            "them rather than serve without them (keep its port on a private network)",
        )
    if config.api.tenants_file:
        raise InvalidFieldError(
            "tenants", "tenants: tenants are not enforced through Ray Serve yet; the cluster refuses the file "
            "rather than serve every caller as an administrator (keep its port on a private network)",
        )
    if config.api.tls_cert:
        raise InvalidFieldError(
            "tls_cert", "tls_cert: the cluster's endpoints are Ray's proxies, which this application does not "
            "configure for TLS; terminate TLS in front of them",
        )


def application(config: ServerConfig, options: ClusterOptions, *, log_level: str = "info") -> serve.Application:
    """Ingress ← Replica × N for one loraplex configuration."""
    check_cluster_config(config)
    local_roots = [r for r in config.engine.lora.adapter_roots if not is_s3_uri(r)]
    scale: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas > options.replicas:
        scale = {"autoscaling_config": {
            "min_replicas": options.replicas, "initial_replicas": options.replicas,
            "max_replicas": options.max_replicas,
            # requests per replica the autoscaler aims at: half a full batch queued or running
            "target_ongoing_requests": max(1, config.engine.scheduler.max_num_seqs // 2),
        }}
    replica = serve.deployment(
        name="Replica",
        max_ongoing_requests=options.max_ongoing_requests or 2 * config.engine.scheduler.max_num_seqs,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=max(30.0, config.api.heartbeat_timeout_s),
        graceful_shutdown_timeout_s=config.api.drain_timeout_s + 10.0,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        **scale,
    )(Replica)
    ingress = serve.deployment(
        name="Ingress", num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0}
    )(Ingress)
    return ingress.bind(
        replica.bind(config, options.max_adapters_per_replica, log_level),
        local_roots[0] if local_roots else None,
        config.engine.lora.max_upload_bytes,
        served_model_name(config),
    )


# Ray's default port for the dashboard agent: a pick for another agent must not be it.
DEFAULT_DASHBOARD_AGENT_LISTEN_PORT = 52365


def init_local_ray(**options: Any) -> None:
    """ray.init of a new single-node cluster here (never one another process started), with
    its agents' ports chosen up front: Ray 2.60's raylet waits only 15 s for agents that bind
    port 0 to report theirs, which a busy machine misses (the raylet then aborts)."""
    import ray
    from ray._private import parameter

    names = ("metrics_agent_port", "runtime_env_agent_port", "dashboard_agent_listen_port")
    ports = dict(zip(names, free_ports(len(names), avoid=[DEFAULT_DASHBOARD_AGENT_LISTEN_PORT])))
    original = parameter.RayParams.__init__

    def with_ports(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        for name, port in ports.items():
            if name not in kwargs:  # the agent's default (52365) may be another cluster's, or ours
                setattr(self, name, port)

    parameter.RayParams.__init__ = with_ports  # type: ignore[method-assign]
    try:
        ray.init(address="local", **options)
    finally:
        parameter.RayParams.__init__ = original  # type: ignore[method-assign]


def start_serve(host: str, grpc_port: int, http_port: int) -> None:
    """Serve on the connected Ray cluster: its gRPC proxy speaks loraplex.v1 on grpc_port."""
    serve.start(
        http_options=HTTPOptions(host=host, port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(GRPC_SERVICERS)),
        logging_config={"enable_access_log": False},
    )


def run_cluster(config: ServerConfig, options: ClusterOptions, *, ray_address: str | None, log_level: str) -> int:
    """`loraplex serve-ray`: deploy, serve until SIGTERM / SIGINT, then tear the application down."""
    import ray

    level = logging.getLevelName(log_level.upper())
    if ray_address:
        ray.init(address=ray_address, logging_level=level)
    else:
        init_local_ray(logging_level=level)
    try:
        api = config.api
        # Serve always runs its HTTP proxy: with --http-port 0 it listens on a port nobody is told of.
        http_port = api.http_port if api.http_port > 0 else free_ports(1, api.host, avoid=[api.port])[0]
        start_serve(api.host, api.port, http_port)
        serve.run(application(config, options, log_level=log_level), name=APP_NAME, route_prefix="/")
        log.info("ready: loraplex.v1 on %s:%d through Ray Serve's gRPC proxy", api.host, api.port)
        if api.http_port != 0:
            log.info("ready: the OpenAI-compatible HTTP API on %s:%d through Ray Serve's HTTP proxy", api.host, http_port)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        log.info("signal received: stopping the application")
        serve.delete(APP_NAME)
    finally:
        if not ray_address:  # a cluster this command started
            serve.shutdown()
        ray.shutdown()
    return 0
