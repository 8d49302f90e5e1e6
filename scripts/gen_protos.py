"""Generate the Python stubs of protos/ into client/loraplex_client/_proto (`make protos`).

The proto is mapped under `loraplex_client/_proto/` so the generated imports name the
client package, never the server's `loraplex` package.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "loraplex/v1/loraplex.proto"
PREFIX = "loraplex_client/_proto"


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under out_root (a folder that plays `client/`); return the files."""
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{PREFIX}={ROOT / 'protos'}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PREFIX}/{PROTO}",
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out_root / PREFIX
    for d in [pkg, pkg / "loraplex", pkg / "loraplex" / "v1"]:
        (d / "__init__.py").touch()
    return sorted(p for p in pkg.rglob("*") if p.is_file())


def main() -> int:
    target = ROOT / "client" / PREFIX
    shutil.rmtree(target, ignore_errors=True)
    for path in generate(ROOT / "client"):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
