"""The adapter store: three LRU tiers, reference counts, versions and a background loader.

    registered ──(worker thread: read + validate safetensors)──> host ──(one copy per layer)──> device
    id -> path, spec, hash          tensors, bounded in bytes          slots of the pool

- A request holds its adapter *version* from admission to finish (`hold` / `unhold`: the
  version's live `holders`; `stats.requests` counts every request ever), and
  the version's device slot while it runs (`try_acquire` / `release`, called by the
  scheduler). A version with slot references is never evicted from the device; one that a
  waiting request needs is only evicted from the host once it is on the device.
- Re-registering an id with new content makes a new version (numbered per id: 1, 2, ...):
  requests already holding the old one finish on it; new requests resolve to the new one.
  Retired versions leave every tier when their last request ends.
- `pin` keeps an adapter resident in the host and device tiers.
- Disk reads happen only on the loader thread (adapter_loader.py), oldest need first, within
  the host budget.
- A root may be `s3://bucket/prefix` (s3_source.py): registration then reads the config and
  the safetensors header from S3, and the loader thread downloads the files into a cache under
  the first local root. LoadAdapter may name `s3://...` under such a root; auto-register looks
  for `<id>/adapter_config.json` under each root, local ones first.

No torch here: reading tensors and writing slots are injected (`load_fn`, `slots`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.lora.adapter_loader import AdapterLoader
from loraplex.lora.adapter_roots import AdapterRoots
from loraplex.lora.adapter_spec import AdapterError, AdapterSpec, BaseLayerInfo
from loraplex.lora.adapter_version import (
    AdapterInfo,
    AdapterVersion,
    StoreListener,
    StoreSnapshot,
    Tier,
    not_registered,
)
from loraplex.lora.device_slots import DeviceSlots
from loraplex.lora.host_tier import HostTier
from loraplex.lora.slots import SlotState, SlotWriter
from loraplex.rules import adapter_id_problem, check_adapter_id

if TYPE_CHECKING:
    from loraplex.lora.adapter_weights import AdapterWeights

log = logging.getLogger(__name__)


class AdapterStore:
    def __init__(
        self,
        layers: Mapping[str, BaseLayerInfo],
        slots: SlotWriter,
        load_fn: Callable[[AdapterSpec], AdapterWeights],
        *,
        max_rank: int,
        host_budget: int,
        itemsize: int,
        adapter_roots: tuple[str, ...] = (),
        auto_register: bool = True,
        listener: StoreListener | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.layers = layers
        self.slots = slots
        self.load_fn = load_fn
        self.max_rank = max_rank
        self.host_budget = host_budget
        self.itemsize = itemsize
        self.sources = AdapterRoots(adapter_roots, layers, max_rank)
        self.roots = self.sources.local
        self.auto_register = auto_register
        self.listener = listener
        self.on_ready = on_ready or (lambda: None)

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._current: dict[str, AdapterVersion] = {}  # id -> newest version
        self._versions: dict[str, AdapterVersion] = {}  # key -> every live version
        self._host = HostTier(host_budget, on_evict=lambda: self._count(Tier.HOST, "evictions"))
        self._device = DeviceSlots(slots)
        self._queue: deque[AdapterVersion] = deque()
        self._last_version: dict[str, int] = {}  # id -> its newest version number, kept after unregister
        self.counters: dict[tuple[str, str], int] = {}
        self._loader = AdapterLoader(self._changed, self._next_load, load_fn, self._finish_load, self.on_ready)

    # -- registration (API threads) ------------------------------------------------------

    def register(self, adapter_id: str, path: str | Path, *, pin: bool = False, relative_only: bool = False) -> AdapterVersion:
        """Register (or re-register) an adapter. Validates config and tensor shapes now."""
        check_adapter_id(adapter_id)
        spec = self.sources.read_spec(path, relative_only)
        host_bytes = spec.host_bytes(self.layers, self.itemsize)
        if host_bytes > self.host_budget:
            raise AdapterError(
                f"adapter {adapter_id!r} takes {host_bytes} bytes, more than the host budget of {self.host_budget}"
            )
        with self._lock:
            current = self._current.get(adapter_id)
            unchanged = current is not None and (current.spec.content_hash, current.spec.chat_template) == (
                spec.content_hash, spec.chat_template
            )
            if current is not None and unchanged and not current.retired:
                if pin:
                    self._set_pin(current, True)
                return current
            if pin:
                self._check_pin_room(exclude=current)
            # Versions count per id from 1; a number is never reused (retired versions may still run).
            number = self._last_version.get(adapter_id, 0) + 1
            self._last_version[adapter_id] = number
            version = AdapterVersion(adapter_id, number, spec, host_bytes)
            if current is not None:
                version.stats = current.stats
                self._retire(current)
            self._current[adapter_id] = version
            self._versions[version.key] = version
            self._count(Tier.REGISTERED, "registrations")
            if pin:
                self._set_pin(version, True)
            log.info("registered adapter %s v%d (%s, rank %d)", adapter_id, version.version, spec.location, spec.rank)
            return version

    def unregister(self, adapter_id: str) -> AdapterVersion:
        """Forget an id. Requests holding it keep their version until they end."""
        with self._lock:
            version = self._registered(adapter_id)
            del self._current[adapter_id]
            self._retire(version)
            return version

    def lookup(self, adapter_id: str) -> AdapterVersion | None:
        """The current version of a registered id, or None (no disk work)."""
        with self._lock:
            return self._current.get(adapter_id)

    def resolve(self, adapter_id: str) -> AdapterVersion:
        """The current version of an id; auto-registers a directory of that name under a root."""
        version = self.lookup(adapter_id)
        if version is not None:
            return version
        if self.auto_register and adapter_id_problem(adapter_id) is None:
            found = self.sources.find(adapter_id)
            if found is not None:
                return self.register(adapter_id, found[0], relative_only=found[1])
        raise not_registered(adapter_id)

    def _check_pin_room(self, exclude: AdapterVersion | None) -> None:
        pinned = sum(1 for v in self._current.values() if v.pinned and v is not exclude)
        if pinned + 1 >= self.slots.max_loras:
            raise AdapterError(
                f"cannot pin more than {self.slots.max_loras - 1} adapters with {self.slots.max_loras} device slots"
            )

    def _set_pin(self, version: AdapterVersion, pinned: bool) -> None:
        version.pinned = pinned
        if pinned and version.weights is None:
            self._enqueue(version)

    # -- requests (engine thread) ----------------------------------------------------------

    def hold(self, version: AdapterVersion, samples: int = 1) -> None:
        """A request now needs this version: count it and start loading it if needed. Each of
        its samples (SamplingParams.n) holds the version until it finishes (unhold)."""
        with self._lock:
            version.holders += samples
            version.stats.requests += 1
            version.stats.last_used = time.time()
            if version.weights is not None or version.slot is not None:
                version.stats.host_hits += 1
                self._count(Tier.HOST, "hits")
                self._host.touch(version)
            else:
                version.stats.host_misses += 1
                self._count(Tier.HOST, "misses")
                self._enqueue(version)

    def unhold(self, version: AdapterVersion) -> None:
        with self._lock:
            version.holders -= 1
            if version.holders == 0 and version.error_transient:
                version.error, version.error_transient = None, False  # the next request reads the disk again
            if version.retired and version.holders == 0 and version.slot_refs == 0:
                self._drop(version)  # the same rule as release(): whichever reference goes last drops it
            self._changed.notify_all()

    def try_acquire(self, adapter: object) -> SlotState:
        version: AdapterVersion = adapter  # type: ignore[assignment]
        with self._lock:
            if version.error is not None:
                return SlotState.FAILED
            if version.slot is not None:
                version.slot_refs += 1
                self._device.touch(version)
                version.stats.device_hits += 1
                self._count(Tier.DEVICE, "hits")
                return SlotState.ACQUIRED
            if version.weights is None:
                self._enqueue(version)
                return SlotState.NOT_READY
            slot = self._free_slot(version.spec.rank)
            if slot is None:
                return SlotState.NOT_READY
            start = time.perf_counter()
            self._device.put(slot, version)
            elapsed = time.perf_counter() - start
            version.slot_refs = 1
            version.stats.device_misses += 1
            self._count(Tier.DEVICE, "misses")
            self._count_load(Tier.DEVICE, elapsed)
            self._changed.notify_all()  # its host copy may now make room for a load
            return SlotState.ACQUIRED

    def release(self, adapter: object) -> None:
        version: AdapterVersion = adapter  # type: ignore[assignment]
        with self._lock:
            version.slot_refs -= 1
            if version.retired and version.slot_refs == 0 and version.holders == 0:
                self._drop(version)

    def compact_slots(self) -> bool:
        """Between steps (engine thread): one exchange of two device slots towards rank order
        (slots.next_swap), so adapters of one rank sit side by side; False when already sorted."""
        with self._lock:
            moved = self._device.compact()
            if moved:
                self._count(Tier.DEVICE, "moves")
            return moved

    def on_device(self, adapter: object) -> bool:
        return getattr(adapter, "slot", None) is not None

    def loaded(self, adapter: object) -> bool:
        return getattr(adapter, "weights", None) is not None or getattr(adapter, "slot", None) is not None

    def failure(self, adapter: object) -> str:
        return getattr(adapter, "error", None) or "adapter failed to load"

    # -- tiers ---------------------------------------------------------------------------

    def _free_slot(self, rank: int) -> int | None:
        slot = self._device.slot_for(rank)
        if slot is None and (victim := self._device.victim()) is not None:
            slot = victim.slot
            self._evict_device(victim)
        return slot

    def _evict_device(self, version: AdapterVersion) -> None:
        self._device.remove(version)
        version.stats.evictions += 1
        self._count(Tier.DEVICE, "evictions")
        if version.holders > 0 and version.weights is None:
            self._enqueue(version)  # still wanted: bring it back to the host

    def _retire(self, version: AdapterVersion) -> None:
        version.retired = True
        version.pinned = False
        if version.holders == 0 and version.slot_refs == 0:
            self._drop(version)

    def _drop(self, version: AdapterVersion) -> None:
        self._device.remove(version)
        if version.weights is not None:
            self._host.evict(version)
        self._versions.pop(version.key, None)

    def _count(self, tier: Tier, event: str) -> None:
        key = (tier.value, event)
        self.counters[key] = self.counters.get(key, 0) + 1

    def _count_load(self, tier: Tier, seconds: float) -> None:
        self._count(tier, "loads")
        if self.listener is not None:
            self.listener.on_load(tier, seconds)

    # -- the loader thread -----------------------------------------------------------------

    def _enqueue(self, version: AdapterVersion) -> None:
        if version.queued or version.loading or version.weights is not None or version.error is not None:
            return
        version.queued = True
        self._queue.append(version)
        self._changed.notify_all()

    def _next_load(self) -> AdapterVersion | None:
        """The loader's next read: the oldest queued version still wanted that fits (lock held)."""
        while self._queue:
            version = self._queue[0]
            # A retired version still loads for the requests that hold it.
            wanted = (version.holders > 0 or version.pinned) and version.slot is None
            if not wanted or version.weights is not None:
                self._queue.popleft()
                version.queued = False
                continue
            if not self._host.make_room(version.host_bytes):
                return None  # wait for room: versions on the device or finished free it
            self._queue.popleft()
            version.queued = False
            version.loading = True
            self._host.reserve(version.host_bytes)  # now, so concurrent decisions see them
            return version
        return None

    def _finish_load(
        self, version: AdapterVersion, weights: AdapterWeights | None, error: str | None, transient: bool, elapsed: float
    ) -> None:
        """The loader thread read a version (weights) or failed (error; transient: a read error,
        kept only until the requests now holding the version have ended); lock held."""
        version.loading = False
        if weights is None or (version.retired and version.holders == 0):
            self._host.unreserve(version.host_bytes)
            version.error = error
            version.error_transient = transient and error is not None
        else:
            self._host.add(version, weights)
            version.stats.loads += 1
            version.stats.last_load_s = elapsed
            self._count_load(Tier.HOST, elapsed)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no load is queued or running (tests and warm-up)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or any(v.loading for v in self._versions.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(timeout=min(remaining, 0.1))
        return True

    def close(self) -> None:
        self._loader.close()

    # -- views -----------------------------------------------------------------------------

    def _registered(self, adapter_id: str) -> AdapterVersion:
        version = self._current.get(adapter_id)
        if version is None:
            raise not_registered(adapter_id)
        return version

    def get(self, adapter_id: str) -> AdapterInfo:
        with self._lock:
            return self._registered(adapter_id).info()

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [v.info() for _, v in sorted(self._current.items())]

    def snapshot(self) -> StoreSnapshot:
        with self._lock:
            return StoreSnapshot(
                host_bytes=self._host.bytes,
                host_budget=self.host_budget,
                host_resident=self._host.resident,
                device_resident=self._device.resident,
                device_slots=len(self._device.versions),
                registered=len(self._current),
                counters=dict(self.counters),
                slot_refs=sum(v.slot_refs for v in self._versions.values()),
                holders=sum(v.holders for v in self._versions.values()),
            )

    def device_versions(self) -> list[AdapterVersion | None]:
        with self._lock:
            return list(self._device.versions)
