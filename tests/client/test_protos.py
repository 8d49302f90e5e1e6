"""The checked-in stubs under client/loraplex_proto/v1 match protos/ (run `make protos`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "client" / "loraplex_proto" / "v1"


def load_gen_protos() -> ModuleType:
    # scripts/ is not a package: load the script by its path.
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    generated = load_gen_protos().generate(tmp_path)
    fresh = source_files(tmp_path / "loraplex_proto" / "v1")
    checked_in = source_files(CHECKED_IN)

    assert len(generated) == len(fresh) >= 3  # *_pb2.py, *_pb2.pyi, *_pb2_grpc.py at least
    assert sorted(checked_in) == sorted(fresh), "stub files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated code {stale}: run `make protos`"
