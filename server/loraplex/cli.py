"""`loraplex` command line: serve, healthcheck, demo, make-demo.

Only `serve` (and the demo commands) import torch; `healthcheck` and `--help` do not.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import typing
from pathlib import Path

from loraplex import settings
from loraplex.config import Quantization
from loraplex.logs import LOG_LEVELS

DEFAULT_DEMO_DIR = ".cache/demo"


def _setup_logging(level: str, fmt: str = "text") -> None:
    from loraplex.logs import configure

    configure(level, fmt)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    try:
        values, sources = settings.resolve_with_sources(args)
    except ValueError as e:
        print(f"loraplex serve: {e}", file=sys.stderr)
        return 2
    _setup_logging(values["log_level"], values["log_format"])
    log = logging.getLogger("loraplex")
    if values["model"] == "demo":
        from loraplex.model.demo import make_demo

        root = make_demo(DEFAULT_DEMO_DIR)
        values["model"] = str(root / "model")
        sources["model"] += ", the demo model"
        if not values["adapter_root"]:
            values["adapter_root"] = (str(root / "adapters"),)
            sources["adapter_root"] = "the demo adapters"
    try:
        config = settings.build_config(values, sources)
        preload = settings.parse_preload(values["preload"])
    except ValueError as e:
        print(f"loraplex serve: {e}", file=sys.stderr)
        return 2
    log.info("configuration (flag > LORAPLEX_* > --config file > default):\n%s", settings.describe(values, sources))
    for name in settings.unknown_environment():
        log.warning("ignoring %s: no such option", name)
    engine_config = config.engine
    if not engine_config.lora.adapter_roots:
        log.warning("no --adapter-root: LoadAdapter and UploadAdapter are refused")

    # torch and the model code load only here: `--help` and errors above stay fast.
    from loraplex.api.server import serve
    from loraplex.engine.engine import Engine

    return asyncio.run(serve(config, lambda: Engine(engine_config), preload=preload))


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


def cmd_make_demo(args: argparse.Namespace) -> int:
    from loraplex.model.demo import make_demo

    out = make_demo(args.out_dir)
    print(f"demo model: {out / 'model'}\ndemo adapters: {out / 'adapters'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loraplex.demo_run import run_demo

    return run_demo(Path(args.workdir), quantization=args.quantization)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-tenant LoRA adapter serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC server", description="Every option also reads LORAPLEX_<NAME> and --config.")
    settings.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "healthcheck", help="exit 0 if the server is ready (grpc.health.v1), 1 otherwise",
        description="Asks a running server's grpc.health.v1 service; exit 0 on SERVING, 1 otherwise.",
    )
    port = os.environ.get("LORAPLEX_PORT", "50051")
    p.add_argument("--address", default=f"127.0.0.1:{port}", help="host:port (default: 127.0.0.1:$LORAPLEX_PORT or 50051)")
    p.add_argument("--service", default=None, help="readiness: loraplex.v1.LoraPlex (default), or '' for liveness")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.set_defaults(func=cmd_healthcheck)

    p = sub.add_parser("make-demo", help="build the demo model and adapters (CPU, under a minute)")
    p.add_argument("out_dir", nargs="?", default=DEFAULT_DEMO_DIR)
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("demo", help="the main job: mixed-adapter streams on the demo model")
    p.add_argument("--workdir", default=DEFAULT_DEMO_DIR)
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
