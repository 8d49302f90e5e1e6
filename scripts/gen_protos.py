"""Generate the Python stubs of protos/ into client/loraplex_proto/v1 (`make protos`).

`protos/loraplex/v1/loraplex.proto` is mapped to `loraplex_proto/v1/loraplex.proto`, so the
generated imports name the public `loraplex_proto` package that the server and the client
SDK both import (never the server's `loraplex` package, never a private client module).
Only `v1/` is generated; `loraplex_proto/__init__.py` and `health.py` are written by hand.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "loraplex_proto"
PROTO = "v1/loraplex.proto"
GENERATED = f"{PACKAGE}/v1"  # what this script writes, under client/


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under out_root (a folder that plays `client/`); return the files."""
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE}={ROOT / 'protos' / 'loraplex'}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE}/{PROTO}",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = out_root / GENERATED
    (generated / "__init__.py").touch()
    return sorted(p for p in generated.rglob("*") if p.is_file())


def main() -> int:
    shutil.rmtree(ROOT / "client" / GENERATED, ignore_errors=True)
    for path in generate(ROOT / "client"):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
