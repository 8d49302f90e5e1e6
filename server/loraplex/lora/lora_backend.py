"""The LoRA backend seam: one implementation of the grouped LoRA op, chosen once at start-up.

    y[t] += (x[t] @ A[slot(t)]ᵀ) @ Bᵀ[slot(t)]        for each token t with an adapter
             └──── shrink ─────┘  └─ expand ─┘

A: [slots, r_max, d_in], Bᵀ: [slots, r_max, d_out] with the adapter's scale folded in;
rows past an adapter's rank, and layers it does not target, hold zeros (so a backend may read
a few padded rows when that saves a launch, never needs to). `--max-lora-rank` (r_max) only
bounds what may be loaded: backends read each adapter at its own rank. The step's tokens
are packed with the requests ordered by adapter slot, so the tokens of one adapter form one
contiguous segment.

Who calls what:
  prepare(token runs, slot ranks)   the model runner, once per step -> LoraBatch, read by every layer
  shrink(x, layer, batch) -> v      LoraLinear, for a layer that shares its input with no sibling
  shrink_multi(x, pool, layers)     ProjectionGroup (q/k/v, gate/up): the first sibling to run,
                                    one v per sibling
  expand(y, v, layer, batch)        every layer whose v is not None: y += v @ Bᵀ, in place

A shrink result `v` is the backend's own value, handed back unchanged to its expand; None
means no token of the step has an adapter that targets the layer (nothing to add).

Backends (backends.select_lora_backend picks one when the LoraModel is built):
- TorchLora (lora_ops.py): torch ops, on the CPU and CUDA; the reference in the kernel tests.
- TritonLora (triton_lora.py): the SGMV kernels of triton_ops.py, on CUDA when triton imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch


@dataclass(slots=True)
class Segment:
    start: int
    end: int
    slot: int
    rank: int  # the adapter's largest rank; rows above it are zero


@dataclass(slots=True)
class LoraBatch:
    """Per-step LoRA metadata shared by every LoRA layer (a backend adds its own fields)."""

    num_tokens: int = 0
    segments: list[Segment] = field(default_factory=list)
    slots: int = 0  # bit s set: slot s has tokens in this step

    def targeted(self, layer: LayerPool) -> int:
        """The step's slots whose adapter targets `layer` (a bitmask; 0: nothing to add)."""
        return self.slots & layer.targets


EMPTY_BATCH = LoraBatch()


def token_segments(token_runs: list[tuple[int, int]], slot_ranks: list[int], num_tokens: int) -> list[Segment]:
    """Segments from (adapter slot, num_tokens) runs in packing order (slot -1 = base model)."""
    segments: list[Segment] = []
    start = 0
    for slot, n in token_runs:
        if slot >= 0 and n > 0:
            if segments and segments[-1].slot == slot and segments[-1].end == start:
                segments[-1].end += n
            else:
                segments.append(Segment(start, start + n, slot, slot_ranks[slot]))
        start += n
    if start != num_tokens:
        raise ValueError(f"token runs cover {start} tokens, the batch has {num_tokens}")
    return segments


def slot_mask(segments: list[Segment]) -> int:
    """Bit s set for every slot with tokens in `segments`."""
    mask = 0
    for s in segments:
        mask |= 1 << s.slot
    return mask


# Per-slot views of one layer's pool: (Aᵀ [d_in, rank], Bᵀ [rank, d_out]) over the rank the
# adapter has in that layer; None for an empty slot or an adapter that does not target it.
SlotViews = list[tuple[torch.Tensor, torch.Tensor] | None]


def slot_views(lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: list[int]) -> SlotViews:
    return [(lora_a[s, :r].t(), lora_b[s, :r]) if r else None for s, r in enumerate(ranks)]


class LayerPool(Protocol):
    """One layer's slice of the adapter-slot pool, as a backend reads it (lora_layer.LoraLinear)."""

    @property
    def lora_a(self) -> torch.Tensor: ...  # [slots, r_max, d_in]

    @property
    def lora_b(self) -> torch.Tensor: ...  # [slots, r_max, d_out]

    @property
    def views(self) -> SlotViews: ...

    @property
    def targets(self) -> int: ...  # bit s set: slot s holds an adapter that targets this layer


def targets_mask(views: SlotViews) -> int:
    return sum(1 << s for s, v in enumerate(views) if v is not None)


@dataclass(frozen=True, slots=True)
class PoolSlice:
    """A LayerPool as a plain value (kernel tests, benchmarks)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    views: SlotViews

    @property
    def targets(self) -> int:
        return targets_mask(self.views)


B = TypeVar("B", bound=LoraBatch)


class LoraBackend(Protocol[B]):
    name: str

    def prepare(self, token_runs: list[tuple[int, int]], slot_ranks: list[int], max_rank: int, num_tokens: int) -> B:
        """The step's batch from (adapter slot, num_tokens) runs in packing order (slot -1 = base)."""
        ...

    def shrink(self, x: torch.Tensor, layer: LayerPool, batch: B) -> Any:
        """v = x @ A[slot]ᵀ for the tokens of the adapters that target this layer. x: [T, d_in]."""
        ...

    def shrink_multi(self, x: torch.Tensor, pool: torch.Tensor, layers: Sequence[LayerPool], batch: B) -> list[Any]:
        """shrink for P layers fed the same x; pool: their A pools in one tensor [slots, P, r_max, d_in]."""
        ...

    def expand(self, y: torch.Tensor, v: Any, layer: LayerPool, batch: B) -> None:
        """y += v @ Bᵀ[slot] for the tokens of v, in place. y: [T, d_out]."""
        ...
