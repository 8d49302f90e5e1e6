"""`loraplex` command line: make-demo, demo, generate (serve comes with the gRPC API)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

DEFAULT_DEMO_DIR = ".cache/demo"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


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
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-demo", help="build the demo model and adapters (CPU, under a minute)")
    p.add_argument("out_dir", nargs="?", default=DEFAULT_DEMO_DIR)
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("demo", help="the main job: mixed-adapter streams on the demo model")
    p.add_argument("--workdir", default=DEFAULT_DEMO_DIR)
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    start = time.perf_counter()
    rc = int(args.func(args))
    logging.getLogger("loraplex").debug("done in %.1fs", time.perf_counter() - start)
    return rc


if __name__ == "__main__":
    sys.exit(main())
