"""`loraplex` command line: serve, demo, make-demo."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

DEFAULT_DEMO_DIR = ".cache/demo"


def _setup_logging(level: str, fmt: str = "text") -> None:
    from loraplex.logs import configure

    configure(level, fmt)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from loraplex import settings
    from loraplex.api.server import serve
    from loraplex.engine.engine import Engine

    values = settings.resolve(args)
    _setup_logging(values["log_level"], values["log_format"])
    log = logging.getLogger("loraplex")
    if values["model"] == "demo":
        from loraplex.model.demo import make_demo

        root = make_demo(DEFAULT_DEMO_DIR)
        values["model"] = str(root / "model")
        if not values["adapter_root"]:
            values["adapter_root"] = (str(root / "adapters"),)
    try:
        config = settings.build_config(values)
        preload = settings.parse_preload(values["preload"])
    except ValueError as e:
        print(f"loraplex serve: {e}", file=sys.stderr)
        return 2
    log.info("configuration:\n%s", settings.describe(values))
    engine_config = config.engine
    if not engine_config.lora.adapter_roots:
        log.warning("no --adapter-root: LoadAdapter and UploadAdapter are refused")
    return asyncio.run(serve(config, lambda: Engine(engine_config), preload=preload))


def cmd_make_demo(args: argparse.Namespace) -> int:
    from loraplex.model.demo import make_demo

    out = make_demo(args.out_dir)
    print(f"demo model: {out / 'model'}\ndemo adapters: {out / 'adapters'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from loraplex.demo_run import run_demo

    return run_demo(Path(args.workdir), quantization=args.quantization)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-tenant LoRA adapter serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC server", description="Every option also reads LORAPLEX_<NAME> and --config.")
    from loraplex import settings

    settings.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("make-demo", help="build the demo model and adapters (CPU, under a minute)")
    p.add_argument("out_dir", nargs="?", default=DEFAULT_DEMO_DIR)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("demo", help="the main job: mixed-adapter streams on the demo model")
    p.add_argument("--workdir", default=DEFAULT_DEMO_DIR)
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    if args.command != "serve":
        _setup_logging(args.log_level or "info")
    start = time.perf_counter()
    rc = int(args.func(args))
    logging.getLogger("loraplex").debug("done in %.1fs", time.perf_counter() - start)
    return rc


if __name__ == "__main__":
    sys.exit(main())
