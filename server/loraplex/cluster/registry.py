"""The cluster's adapter registry: which path an adapter id was loaded from, kept in the
shared adapter root so every replica (and every replica Ray starts later) reads the same.

    Ingress: LoadAdapter / UploadAdapter ──put──> <root>/.cluster/adapters/<id>.json
             UnloadAdapter ──remove──>
    Replica: first request for an id here ──get──> register the path (or auto-register the id)

One small JSON file per id, written to a temporary name and renamed, so a reader never sees
half of one. No Ray and no torch here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from loraplex.rules import check_adapter_id

REGISTRY_DIR = ".cluster/adapters"


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    adapter_id: str
    path: str  # as LoadAdapter was given it: relative to the adapter root, or s3://...
    pin: bool = False
    # What the replica that validated it reported, for ListAdapters while no replica holds it.
    content_hash: str = ""
    rank: int = 0
    target_modules: tuple[str, ...] = ()


class AdapterRegistry:
    def __init__(self, adapter_root: str | Path) -> None:
        self.root = Path(adapter_root)
        self.dir = self.root / REGISTRY_DIR

    def _file(self, adapter_id: str) -> Path:
        check_adapter_id(adapter_id)  # no '..' parts: the file stays under the registry
        return self.dir / f"{adapter_id}.json"

    def put(self, entry: RegistryEntry) -> None:
        target = self._file(entry.adapter_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(asdict(entry), fh)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, adapter_id: str) -> RegistryEntry | None:
        try:
            data = json.loads(self._file(adapter_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        data["target_modules"] = tuple(data.get("target_modules", ()))
        return RegistryEntry(**data)

    def remove(self, adapter_id: str) -> bool:
        try:
            self._file(adapter_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def entries(self) -> list[RegistryEntry]:
        if not self.dir.is_dir():
            return []
        ids = sorted(str(p.relative_to(self.dir).with_suffix("")) for p in self.dir.rglob("*.json"))
        return [e for e in (self.get(i) for i in ids) if e is not None]
