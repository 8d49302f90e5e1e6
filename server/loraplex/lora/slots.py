"""Device adapter slots as the layers above and below see them: two small interfaces. No torch here.

    Scheduler ──AdapterSlots──> AdapterStore ──SlotWriter──> LoraModel (the slot pool on the device)
    try_acquire / release / ...   (adapter_store.py)   write_slot      (lora_layer.py)

Slots are kept sorted by rank (`next_swap`, applied by AdapterStore.compact_slots between
steps): adapters of one rank side by side decode as one batched matmul in the torch backend.

An adapter slot is one index of the LoRA pool (`max_loras` of them): it holds one adapter
version's A and Bᵀ in every wrapped layer. (Not a KV cache row: those are `kv rows`.)

Who calls what (AdapterSlots, all on the engine thread, from Scheduler):
  try_acquire(adapter)   admission: ACQUIRED (a slot reference is now held), NOT_READY, FAILED
  release(adapter)       a running request finishes or is preempted: drop its slot reference
  on_device(adapter)     aging: does this adapter already have a slot?
  loaded(adapter)        aging: is it in host memory, needing only a slot?
  failure(adapter)       the reason to end a request whose adapter FAILED
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from loraplex.lora.adapter_weights import AdapterWeights


class SlotState(enum.Enum):
    ACQUIRED = "acquired"  # the adapter is on the device; a reference is held
    NOT_READY = "not_ready"  # loading from disk, or every slot is in use: wait
    FAILED = "failed"  # the adapter cannot be served: end the request with its error


class AdapterSlots(Protocol):
    """The device tier as the scheduler sees it (implemented by adapter_store.AdapterStore)."""

    def try_acquire(self, adapter: object) -> SlotState: ...

    def release(self, adapter: object) -> None: ...

    def failure(self, adapter: object) -> str: ...

    def on_device(self, adapter: object) -> bool: ...

    def loaded(self, adapter: object) -> bool:
        """In host memory (or on the device): a slot is all it still needs."""
        ...


def next_swap(ranks: list[int | None]) -> tuple[int, int] | None:
    """The next exchange of two occupied slots that sorts the occupied slots by rank (None: sorted).

    The target keeps the set of occupied slots and lays their ranks on it in ascending order;
    the first slot whose rank is off takes one of the rank it should hold, preferably from a
    slot that wants this slot's rank (one exchange then puts both right). Equal ranks are never
    exchanged, so a sorted pool stays still. Each exchange puts at least one slot right.
    """
    occupied = [s for s, r in enumerate(ranks) if r is not None]
    target = dict(zip(occupied, sorted(ranks[s] for s in occupied)))  # type: ignore[type-var]
    for i, slot in enumerate(occupied):
        if ranks[slot] == target[slot]:
            continue
        later = [s for s in occupied[i + 1 :] if ranks[s] == target[slot] and ranks[s] != target[s]]
        both = [s for s in later if target[s] == ranks[slot]]
        return slot, (both or later)[0]
    return None


class SlotWriter(Protocol):
    """The slot pool as the adapter store sees it (implemented by lora_layer.LoraModel)."""

    max_loras: int

    def write_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter's host tensors into slot `slot` of every layer (store lock held)."""
        ...

    def swap_slots(self, a: int, b: int) -> None:
        """Exchange the contents of slots a and b (either may be empty), between steps (store lock held)."""
        ...


def placement(empty: list[int], ranks: list[int | None], rank: int) -> int:
    """Which empty slot an adapter of `rank` takes: beside one of its rank if it can, else the
    middle of the longest run of empty slots (room on both sides for more of its rank).

    Adapters of one rank in adjacent slots decode as one batched matmul in the torch LoRA
    backend (lora_ops.py: a band is adjacent slots); scattered, each is its own launch (and
    the store's exchanges, `next_swap`, sort them later).
    """

    def beside(slot: int) -> int:
        return sum(1 for s in (slot - 1, slot + 1) if 0 <= s < len(ranks) and ranks[s] == rank)

    best = max(empty, key=beside)  # the first such slot on ties
    if beside(best):
        return best
    runs: list[tuple[int, int]] = []  # [start, end) of each run of empty slots
    for slot in empty:
        if runs and runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], slot + 1)
        else:
            runs.append((slot, slot + 1))
    start, end = max(runs, key=lambda run: run[1] - run[0])
    return (start + end) // 2 if end - start > 2 else start
