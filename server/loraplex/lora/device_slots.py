"""The adapter store's device tier: which adapter version holds which slot of the LoRA pool,
their recency, and the slots' order by rank. No torch: the pool is written through SlotWriter.

    put(slot, version)   copy a version's host weights into a slot (AdapterStore.try_acquire)
    remove(version)      forget its slot (eviction, retirement); the rows stay until overwritten
    touch(version)       a request acquired it: most recently used
    slot_for(rank)       an empty slot (slots.placement) or None
    victim()             the least recently used version no request holds and no pin keeps
    compact()            one exchange towards rank order (slots.next_swap), between steps

The store calls these with its lock held; every write happens on the engine thread.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from loraplex.lora.slots import SlotWriter, next_swap, placement

if TYPE_CHECKING:
    from loraplex.lora.adapter_version import AdapterVersion


class DeviceSlots:
    def __init__(self, writer: SlotWriter) -> None:
        self.writer = writer
        self.versions: list[AdapterVersion | None] = [None] * writer.max_loras
        self._lru: OrderedDict[int, None] = OrderedDict()  # slots, least recently used first
        self._sorted = True  # occupied slots in rank order; False after a put

    def _ranks(self) -> list[int | None]:
        return [None if v is None else v.spec.rank for v in self.versions]

    def put(self, slot: int, version: AdapterVersion) -> None:
        assert version.weights is not None and self.versions[slot] is None
        self.writer.write_slot(slot, version.weights)
        self.versions[slot] = version
        self._lru[slot] = None
        self._sorted = False
        version.slot = slot

    def remove(self, version: AdapterVersion) -> None:
        if version.slot is not None:
            self.versions[version.slot] = None
            self._lru.pop(version.slot, None)
            version.slot = None

    def touch(self, version: AdapterVersion) -> None:
        assert version.slot is not None
        self._lru.move_to_end(version.slot)

    def slot_for(self, rank: int) -> int | None:
        empty = [slot for slot, occupant in enumerate(self.versions) if occupant is None]
        return placement(empty, self._ranks(), rank) if empty else None

    def victim(self) -> AdapterVersion | None:
        for slot in self._lru:
            occupant = self.versions[slot]
            if occupant is not None and occupant.slot_refs == 0 and not occupant.pinned:
                return occupant
        return None

    def compact(self) -> bool:
        """One exchange of two slots towards rank order, so adapters of one rank sit side by
        side (one batched matmul at decode); False when the slots are sorted already."""
        if self._sorted:
            return False
        swap = next_swap(self._ranks())
        if swap is None:
            self._sorted = True
            return False
        a, b = swap
        self.writer.swap_slots(a, b)
        first, second = self.versions[a], self.versions[b]
        self.versions[a], self.versions[b] = second, first
        for slot, version in ((a, second), (b, first)):
            if version is not None:
                version.slot = slot
        # Recency belongs to the adapters: each keeps its place in the LRU.
        self._lru = OrderedDict(({a: b, b: a}.get(s, s), None) for s in self._lru)
        return True

    @property
    def resident(self) -> int:
        return sum(1 for v in self.versions if v is not None)
