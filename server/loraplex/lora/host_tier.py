"""The adapter store's host tier: versions whose weights are in host memory, least recently
used first, within a byte budget. No torch; the store calls these with its lock held.

    reserve(n) / unreserve(n)   bytes of a load in flight (counted from the moment it starts)
    add(version, weights)       a load finished: its reserved bytes now hold these weights
    touch(version)              a request needs it: most recently used
    make_room(n)                evict what may go, oldest first, until n more bytes fit
    evict(version)              drop its weights

A version stays while a pin keeps it, while it loads, or while a waiting request needs it
and it has no device slot yet (its host copy is what the slot will be written from).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.lora.adapter_version import AdapterVersion
    from loraplex.lora.adapter_weights import AdapterWeights


class HostTier:
    def __init__(self, budget: int, on_evict: Callable[[], None]) -> None:
        self.budget = budget
        self.bytes = 0  # resident weights and loads in flight
        self._lru: OrderedDict[str, AdapterVersion] = OrderedDict()  # oldest first
        self._on_evict = on_evict

    def reserve(self, nbytes: int) -> None:
        self.bytes += nbytes

    def unreserve(self, nbytes: int) -> None:
        self.bytes -= nbytes

    def add(self, version: AdapterVersion, weights: AdapterWeights) -> None:
        version.weights = weights
        self._lru[version.key] = version

    def touch(self, version: AdapterVersion) -> None:
        if version.key in self._lru:
            self._lru.move_to_end(version.key)

    @staticmethod
    def evictable(version: AdapterVersion) -> bool:
        if version.pinned or version.loading:
            return False
        return version.holders == 0 or version.slot is not None

    def make_room(self, nbytes: int) -> bool:
        if self.bytes + nbytes <= self.budget:
            return True
        for version in list(self._lru.values()):
            if self.evictable(version):
                self.evict(version)
                if self.bytes + nbytes <= self.budget:
                    return True
        return False

    def evict(self, version: AdapterVersion) -> None:
        self._lru.pop(version.key, None)
        if version.weights is not None:
            self.bytes -= version.host_bytes
            version.weights = None
        self._on_evict()

    @property
    def resident(self) -> int:
        return len(self._lru)
