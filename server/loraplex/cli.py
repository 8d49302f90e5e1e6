"""`loraplex` command line: serve, serve-ray, healthcheck, token, demo, make-demo.

Only `serve`, `serve-ray` (and the demo commands) import torch; `healthcheck`, `token` and
`--help` do not.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import traceback
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplex import settings
from loraplex.config import Quantization
from loraplex.logs import LOG_LEVELS

DEMO_DIR_HELP = "default: $LORAPLEX_DEMO_DIR, else $XDG_CACHE_HOME/loraplex/demo, else ~/.cache/loraplex/demo"


def _setup_logging(level: str, fmt: str = "text") -> None:
    from loraplex.logs import configure

    configure(level, fmt)


def cmd_serve(args: argparse.Namespace) -> int:
    """Exit codes: 0 after a drain, 2 for a start-up failure the user can fix (one or two
    lines on stderr: the cause, then the fix), 130 for Ctrl-C before the server was ready,
    1 for a bug (with its traceback)."""
    from loraplex.startup import StartupError

    try:
        values, sources = settings.resolve_with_sources(args)
    except ValueError as e:
        print(f"loraplex serve: {e}", file=sys.stderr)  # the log format itself may be what is wrong
        return 2
    _setup_logging(values["log_level"], values["log_format"])
    try:
        return _serve(values, sources)
    except StartupError as e:
        _report(values, [e.cause, e.fix] if e.fix else [e.cause], e)
        return 2
    except KeyboardInterrupt as e:
        _report(values, ["interrupted (Ctrl-C) while starting: nothing was served"], e)
        return 130


class _CtrlC:
    """SIGINT while the server starts. Installed whatever SIGINT's inherited disposition (a
    process started in the background of a script inherits it ignored, and Python would then
    never raise KeyboardInterrupt). It raises KeyboardInterrupt as Python's own handler does and
    also remembers it, so that a library catching BaseException while torch or the model loads
    cannot swallow it: `check()` at the end of each long stage raises it again. Once the server
    is ready, serve() drains on SIGINT."""

    def __init__(self) -> None:
        self.pressed = False

    def __call__(self, signum: int, frame: object) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


def _serve(values: dict[str, Any], sources: dict[str, str]) -> int:
    import asyncio

    from loraplex import startup

    ctrl_c = _CtrlC()
    signal.signal(signal.SIGINT, ctrl_c)
    startup.check_server_extra()
    from loraplex.api.auth import Auth  # torch-free: a bad tenants file stops us in a second

    try:
        config = settings.build_config(values, sources)
        preload = settings.parse_preload(values["preload"])
        auth = Auth.from_options(config.api.tenants_file, config.api.auth_tokens)
    except ValueError as e:  # TenantFileError too
        raise startup.StartupError(str(e)) from e  # it names the option (or the file) and where the value came from
    api = config.api
    startup.check_port_free(api.host, api.port, "gRPC", "--port")
    if api.metrics_port:
        startup.check_port_free(api.host, api.metrics_port, "metrics", "--metrics-port")
    if api.http_port > 0:
        startup.check_port_free(api.host, api.http_port, "HTTP", "--http-port")
    if values["model"] == "demo":
        with _server_imports():
            values = settings.with_demo_model(values, sources)
        config = settings.build_config(values, sources)
    startup.check_model_dir(config.engine.model.model)
    startup.check_adapter_roots(config.engine.lora.adapter_roots)
    log = logging.getLogger("loraplex")
    log.info("configuration (flag > LORAPLEX_* > --config file > default):\n%s", settings.describe(values, sources))
    for name in settings.unknown_environment():
        log.warning("ignoring %s: no such option", name)
    if not config.engine.lora.adapter_roots:
        log.warning("no --adapter-root: LoadAdapter and UploadAdapter are refused")

    # torch and the model code load only here: `--help` and the checks above stay fast.
    with _server_imports():
        from loraplex.api.server import serve
        from loraplex.engine.engine import Engine
    ctrl_c.check()

    engine = Engine(config.engine)  # in the main thread, so that Ctrl-C stops it at once
    try:
        ctrl_c.check()
    except KeyboardInterrupt:
        engine.close()
        raise
    return asyncio.run(serve(config, engine, preload=preload, auth=auth))


@contextlib.contextmanager
def _server_imports() -> Iterator[None]:
    """An import that fails for want of the server extra says how to install it."""
    from loraplex.startup import missing_server_extra

    try:
        yield
    except ImportError as e:
        raise (missing_server_extra(e) or e) from e


def _report(values: dict[str, Any], lines: list[str], error: BaseException) -> None:
    """A start-up failure: plain lines on stderr, or one JSON log line; the traceback at debug level."""
    debug = values["log_level"] == "debug"
    if values["log_format"] == "json":
        logging.getLogger("loraplex").error("; ".join(lines), exc_info=error if debug else None)
        return
    if debug:
        traceback.print_exception(error)
    print("\n".join([f"loraplex serve: {lines[0]}", *(f"  {line}" for line in lines[1:])]), file=sys.stderr)


CLUSTER_FLAGS = {  # serve-ray's own options: ClusterOptions fields (cluster/app.py)
    "replicas": (int, "engine replicas (with --max-replicas: the autoscaling minimum; default 1)"),
    "max_replicas": (int, "autoscale up to this many replicas by queue length (default: no autoscaling)"),
    "max_adapters_per_replica": (int, "adapter ids Ray's router keeps per replica (default: what the host tier holds)"),
    "replica_cpus": (float, "CPUs Ray reserves per replica (default 1)"),
    "replica_gpus": (float, "GPUs Ray reserves per replica (default 0; 1 on a GPU cluster)"),
}


def cmd_serve_ray(args: argparse.Namespace) -> int:
    """`loraplex serve` as a Ray Serve application: N engine replicas behind Ray's gRPC proxy
    on --port. Exit codes as `serve` (2: a configuration or start-up problem)."""
    from loraplex import startup

    try:
        values, sources = settings.resolve_with_sources(args)
        _setup_logging(values["log_level"], values["log_format"])
        startup.check_server_extra()
        try:
            from loraplex.cluster.app import ClusterOptions, check_cluster_config, run_cluster
        except ImportError as e:
            raise startup.StartupError(f"Ray Serve is not installed ({e})", "install the ray extra: pip install 'loraplex[ray]'") from e
        with _server_imports():
            values = settings.with_demo_model(values, sources)
        config = settings.build_config(values, sources)
        options = ClusterOptions(**{k: getattr(args, k) for k in CLUSTER_FLAGS if getattr(args, k) is not None})
        check_cluster_config(config)
        startup.check_adapter_roots(config.engine.lora.adapter_roots)
        startup.check_port_free(config.api.host, config.api.port, "gRPC", "--port")
        if config.api.http_port > 0:
            startup.check_port_free(config.api.host, config.api.http_port, "HTTP", "--http-port")
    except ValueError as e:
        print(f"loraplex serve-ray: {e}", file=sys.stderr)
        return 2
    except startup.StartupError as e:
        print("\n".join([f"loraplex serve-ray: {e.cause}", *([f"  {e.fix}"] if e.fix else [])]), file=sys.stderr)
        return 2
    return run_cluster(config, options, ray_address=args.ray_address, log_level=values["log_level"])


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the server reports SERVING for the service (readiness by default), else 1.

    For container HEALTHCHECKs and probes: needs grpcio and protobuf (loraplex_proto), never torch.
    """
    import grpc

    from loraplex_proto import health

    service = health.READY_SERVICE if args.service is None else args.service
    what = f"{args.address} service {service!r}"
    with grpc.insecure_channel(args.address) as channel:
        try:
            response = health.check_stub(channel)(health.HealthCheckRequest(service=service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"loraplex healthcheck: {what}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if response.status != health.SERVING:
        print(f"loraplex healthcheck: {what}: {health.STATUS_NAMES.get(response.status, response.status)}", file=sys.stderr)
        return 1
    print(f"{what}: SERVING")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a new random bearer token, then the line that goes into the tenants file."""
    from loraplex.api.tenants import new_token

    token, line = new_token()
    print(token)
    print(line)
    return 0


def cmd_make_demo(args: argparse.Namespace) -> int:
    from loraplex.model.demo import demo_dir, make_demo

    out = make_demo(args.out_dir or demo_dir())
    print(f"demo model: {out / 'model'}\ndemo adapters: {out / 'adapters'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loraplex.demo_run import run_demo
    from loraplex.model.demo import demo_dir

    return run_demo(Path(args.workdir) if args.workdir else demo_dir(), quantization=args.quantization)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-tenant LoRA adapter serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC server", description="Every option also reads LORAPLEX_<NAME> and --config.")
    settings.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "serve-ray", help="run N engine replicas on Ray Serve behind one gRPC endpoint (the ray extra)",
        description="The serve options (flags, LORAPLEX_*, --config), plus the cluster's. Clients connect to --port "
        "(gRPC) and --http-port (OpenAI API) as to one server; requests go to the replica that holds their adapter.",
    )
    settings.add_arguments(p)
    for name, (kind, text) in CLUSTER_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (e.g. 'auto'); default: start one here")
    p.set_defaults(func=cmd_serve_ray)

    p = sub.add_parser(
        "healthcheck", help="exit 0 if the server is ready (grpc.health.v1), 1 otherwise",
        description="Asks a running server's grpc.health.v1 service; exit 0 on SERVING, 1 otherwise.",
    )
    port = os.environ.get("LORAPLEX_PORT", "50051")
    p.add_argument("--address", default=f"127.0.0.1:{port}", help="host:port (default: 127.0.0.1:$LORAPLEX_PORT or 50051)")
    p.add_argument("--service", default=None, help="readiness: loraplex.v1.LoraPlex (default), or '' for liveness")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.set_defaults(func=cmd_healthcheck)

    p = sub.add_parser(
        "token", help="print a new random bearer token and its token_sha256 line for the --tenants file",
        description="Prints a new token (give it to the tenant) and the `token_sha256 = \"...\"` line "
        "(put it in the tenant's [[tenant]] table); the server never stores the token itself.",
    )
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("make-demo", help="build the demo model and adapters (CPU, under a minute)")
    p.add_argument("out_dir", nargs="?", help=DEMO_DIR_HELP)
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("demo", help="the main job: mixed-adapter streams on the demo model")
    p.add_argument("--workdir", help=f"where the demo model is built or reused ({DEMO_DIR_HELP})")
    p.add_argument("--quantization", default="nf4", choices=typing.get_args(Quantization))
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("make-demo", "demo"):  # serve sets up its own; healthcheck only prints
        _setup_logging(args.log_level)
    start = time.perf_counter()
    rc = int(args.func(args))
    logging.getLogger("loraplex").debug("done in %.1fs", time.perf_counter() - start)
    return rc


if __name__ == "__main__":
    sys.exit(main())
