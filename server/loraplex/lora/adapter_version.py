"""What the adapter store holds and reports: versions, tiers, counters, snapshots; paths.

No torch here: host tensors are an opaque `AdapterWeights` the loader thread hands over.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from loraplex.lora.adapter_spec import AdapterError, AdapterSpec

if TYPE_CHECKING:
    from loraplex.lora.adapter_weights import AdapterWeights


class AdapterNotFoundError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "adapter not found"


def not_registered(adapter_id: str) -> AdapterNotFoundError:
    """The one wording of "no such adapter": the API answers an id hidden from a caller with
    exactly this, so that nobody learns another tenant's ids exist."""
    return AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")


class Tier(enum.Enum):
    REGISTERED = "registered"
    HOST = "host"
    DEVICE = "device"


class StoreListener(Protocol):
    """The metrics hook (the loader and engine threads call it; it must not raise)."""

    def on_load(self, tier: Tier, seconds: float) -> None: ...


@dataclass
class AdapterStats:
    host_hits: int = 0
    host_misses: int = 0
    device_hits: int = 0
    device_misses: int = 0
    loads: int = 0
    evictions: int = 0
    requests: int = 0  # cumulative: every request that ever held this id (all its versions)
    last_used: float = 0.0  # wall clock
    last_load_s: float = 0.0


@dataclass(eq=False)
class AdapterVersion:
    adapter_id: str
    version: int
    spec: AdapterSpec
    host_bytes: int
    weights: AdapterWeights | None = None
    slot: int | None = None
    loading: bool = False
    queued: bool = False
    error: str | None = None
    error_transient: bool = False  # a read error: the error goes with the requests that saw it
    holders: int = 0  # live: unfinished requests holding this version (hold .. unhold)
    slot_refs: int = 0  # live: running requests using its adapter slot
    retired: bool = False
    pinned: bool = False
    stats: AdapterStats = field(default_factory=AdapterStats)

    @property
    def key(self) -> str:
        return f"{self.adapter_id}@{self.version}"

    @property
    def tier(self) -> Tier:
        if self.slot is not None:
            return Tier.DEVICE
        return Tier.HOST if self.weights is not None else Tier.REGISTERED

    def info(self) -> AdapterInfo:
        """A snapshot (call with the store's lock held)."""
        return AdapterInfo(
            adapter_id=self.adapter_id,
            version=self.version,
            path=self.spec.display_path,
            tier=self.tier.value,
            rank=self.spec.rank,
            target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in self.spec.module_ranks})),
            host_bytes=self.host_bytes,
            pinned=self.pinned,
            loading=self.loading or self.queued,
            error=self.error,
            active_requests=self.holders,
            content_hash=self.spec.content_hash,
            stats=AdapterStats(**vars(self.stats)),
        )


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A snapshot for list / get calls and metrics."""

    adapter_id: str
    version: int
    path: str
    tier: str
    rank: int
    target_modules: tuple[str, ...]
    host_bytes: int
    pinned: bool
    loading: bool
    error: str | None
    active_requests: int
    content_hash: str
    stats: AdapterStats


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    host_bytes: int
    host_budget: int
    host_resident: int
    device_resident: int
    device_slots: int
    registered: int
    counters: Mapping[tuple[str, str], int]
    slot_refs: int = 0  # running requests' references to device slots (0 when idle)
    holders: int = 0  # live requests holding an adapter version (0 when idle)


def display_path(roots: tuple[Path, ...], resolved: Path) -> str:
    """How an adapter directory is named to callers: relative to the adapter root holding it
    (the server's own absolute paths stay in its log)."""
    for root in roots:
        if resolved == root or root in resolved.parents:
            return str(resolved.relative_to(root)) or "."
    return str(resolved)


def resolve_adapter_path(roots: tuple[Path, ...], path: str | Path, *, relative_only: bool = False) -> Path:
    """An adapter directory inside one of the adapter roots (symlinks resolved)."""
    p = Path(path)
    if relative_only and p.is_absolute():
        raise AdapterError(f"adapter path {str(path)!r} must be relative to the adapter root")
    if not roots:
        if relative_only:
            raise AdapterError("no adapter root is configured")
        if not p.exists():
            raise AdapterNotFoundError(f"adapter path {str(path)!r} does not exist")
        return p.resolve()
    candidates = [p] if p.is_absolute() else [root / p for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if any(resolved == root or root in resolved.parents for root in roots):
            if resolved.is_dir():
                return resolved
        elif candidate.exists() or not p.is_absolute():
            raise AdapterError(f"adapter path {str(path)!r} resolves outside the adapter roots")
    if p.is_absolute():
        raise AdapterError(f"adapter path {str(path)!r} is outside the adapter roots")
    if not any(c.exists() for c in candidates):  # NOT_FOUND, not "incompatible": nothing is there
        raise AdapterNotFoundError(f"adapter path {str(path)!r} does not exist under the adapter roots")
    raise AdapterError(f"adapter path {str(path)!r} is not a directory under the adapter roots")
