"""Where adapters are read from: local directories and s3:// prefixes (`--adapter-root`).

    path given to LoadAdapter ──> s3:// under an S3 root (not found under a local root first)
                              └─> else a directory under a local root
    auto-register of an id    ──> <root>/<id> under each local root, then each S3 root

Registration reads the adapter's config and tensor shapes here (read_spec: local files, or the
config and the safetensors header from S3); the loader thread reads the tensors later. No torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from loraplex.lora import s3_source
from loraplex.lora.adapter_spec import AdapterError, AdapterReadError, AdapterSpec, BaseLayerInfo, read_spec
from loraplex.lora.adapter_version import AdapterNotFoundError, display_path, resolve_adapter_path


class AdapterRoots:
    def __init__(self, adapter_roots: tuple[str, ...], layers: Mapping[str, BaseLayerInfo], max_rank: int) -> None:
        self.local = tuple(Path(r).resolve() for r in adapter_roots if not s3_source.is_s3_uri(r))
        self.s3 = tuple(s3_source.parse_s3_uri(r) for r in adapter_roots if s3_source.is_s3_uri(r))
        self.layers = layers
        self.max_rank = max_rank

    def read_spec(self, path: str | Path, relative_only: bool) -> AdapterSpec:
        """Check the adapter at `path`: a directory under a local root, or an s3:// location."""
        location = self._s3_location(path, relative_only)
        if location is None:
            resolved = resolve_adapter_path(self.local, path, relative_only=relative_only)
            where = display_path(self.local, resolved)
            try:
                return read_spec(resolved, self.layers, self.max_rank, where)
            except OSError as e:  # an I/O error while hashing: the files are not refused, just unreadable now
                raise AdapterReadError(f"{where}: cannot read the adapter files: {e.strerror or 'I/O error'}") from None
        if not self.local:
            raise AdapterError(f"{location.uri}: s3:// adapters need a local adapter root for their download cache")
        return s3_source.read_spec(location, self.layers, self.max_rank, self.local[0] / s3_source.CACHE_DIR)

    def _s3_location(self, path: str | Path, relative_only: bool) -> s3_source.S3Location | None:
        def found_locally() -> bool:  # local roots come first
            try:
                resolve_adapter_path(self.local, path, relative_only=relative_only)
            except AdapterNotFoundError:
                return False
            return True

        return s3_source.locate(path, self.s3, found_locally if self.local else lambda: False)

    def find(self, adapter_id: str) -> tuple[str, bool] | None:
        """Where auto-register finds an id: (path to register, relative to a local root only), or None."""
        for root in self.local:
            if (root / adapter_id).is_dir():
                return adapter_id, True
        location = s3_source.find(adapter_id, self.s3)
        return None if location is None else (location.uri, False)
