"""The grouped LoRA op: every token gets its own adapter's low-rank update, in one pass.

    y[t] += (x[t] @ A[slot(t)]ᵀ) @ Bᵀ[slot(t)]        for each token t with an adapter
             └──── shrink ─────┘  └─ expand ─┘

A: [slots, r_max, d_in], Bᵀ: [slots, r_max, d_out] with the adapter's scale folded in;
rows past an adapter's rank, and layers it does not target, hold zeros.

The step's tokens are packed with the requests ordered by slot, so the tokens of one
adapter form one contiguous segment. Two torch forms compute the same thing:

- segments (SGMV-like): one shrink + expand per segment on views, no gather. Best when
  segments are long (prefill).
- dense: shrink every token against the stacked A of all slots in use, zero the blocks of
  other slots with a per-step mask, expand against the stacked Bᵀ. Two matmuls per layer
  whatever the number of adapters; the extra compute is T·n_slots·r, tiny at decode.

The batch metadata (`LoraBatch`) is built once per step and read by every layer. On CUDA
the Triton kernels in triton_ops.py implement the segment form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraplex.lora.triton_ops import TritonBatch

# Dense form while tokens × slots in use stays below this (tuned on the CPU bench model).
DENSE_MAX_TOKEN_SLOTS = 2048


@dataclass(slots=True)
class Segment:
    start: int
    end: int
    slot: int
    rank: int  # the adapter's largest rank; rows above it are zero


@dataclass(slots=True)
class LoraBatch:
    """Per-step LoRA metadata shared by every LoRA layer."""

    num_tokens: int = 0
    segments: list[Segment] = field(default_factory=list)
    dense: bool = False
    num_slots: int = 0  # dense: slots [0, num_slots) are stacked
    token_mask: torch.Tensor | None = None  # dense: [T, num_slots * r_max], 1 on the token's slot block
    triton: TritonBatch | None = None  # CUDA: kernel metadata


EMPTY_BATCH = LoraBatch()


def build_lora_batch(
    token_slots: list[tuple[int, int]],
    slot_ranks: list[int],
    max_rank: int,
    num_tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    use_triton: bool = False,
) -> LoraBatch:
    """Build the step's metadata from (slot, num_tokens) runs in packing order (slot -1 = base)."""
    segments: list[Segment] = []
    start = 0
    for slot, n in token_slots:
        if slot >= 0 and n > 0:
            if segments and segments[-1].slot == slot and segments[-1].end == start:
                segments[-1].end += n
            else:
                segments.append(Segment(start, start + n, slot, slot_ranks[slot]))
        start += n
    if start != num_tokens:
        raise ValueError(f"token runs cover {start} tokens, the batch has {num_tokens}")
    batch = LoraBatch(num_tokens=num_tokens, segments=segments)
    if not segments:
        return batch
    if use_triton:
        from loraplex.lora.triton_ops import build_triton_batch

        batch.triton = build_triton_batch(segments, num_tokens, device)
        return batch
    num_slots = max(s.slot for s in segments) + 1
    if len(segments) > 1 and num_tokens * num_slots <= DENSE_MAX_TOKEN_SLOTS:
        mask = torch.zeros(num_tokens, num_slots, max_rank, dtype=dtype)
        for s in segments:
            mask[s.start : s.end, s.slot, : s.rank] = 1
        batch.dense = True
        batch.num_slots = num_slots
        batch.token_mask = mask.view(num_tokens, num_slots * max_rank).to(device)
    return batch


# Per-slot views of one layer's pool: (Aᵀ [d_in, rank], Bᵀ [rank, d_out]); None for an empty slot.
SlotViews = list[tuple[torch.Tensor, torch.Tensor] | None]


def slot_views(lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: list[int]) -> SlotViews:
    return [(lora_a[s, :r].t(), lora_b[s, :r]) if r else None for s, r in enumerate(ranks)]


def grouped_lora(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch,
    views: SlotViews | None = None,
) -> None:
    """Add each token's adapter update to y, in place.

    y: [T, d_out], x: [T, d_in], lora_a: [slots, r, d_in], lora_b: [slots, r, d_out].
    views: the layer's per-slot views, kept by the layer so a step does not rebuild them; None
        for a slot whose adapter does not target this layer, whose tokens are then skipped
        (an adapter on q and v costs nothing in the other layers).
    """
    if views is None:
        ranks = [0] * lora_a.shape[0]
        for s in batch.segments:
            ranks[s.slot] = s.rank
        views = slot_views(lora_a, lora_b, ranks)
    segments = [s for s in batch.segments if views[s.slot] is not None]  # this layer's
    if not segments:
        return
    if batch.triton is not None:
        from loraplex.lora.triton_ops import sgmv_lora

        sgmv_lora(y, x, lora_a, lora_b, batch.triton)
    elif batch.dense and len(segments) == len(batch.segments):
        lora_dense(y, x, lora_a, lora_b, batch)
    else:
        lora_segments(y, x, views, segments, batch.num_tokens)


def lora_segments(y: torch.Tensor, x: torch.Tensor, views: SlotViews, segments: list[Segment], num_tokens: int) -> None:
    for s in segments:
        view = views[s.slot]
        if view is None:
            continue  # the adapter does not target this layer
        a_t, b = view
        if s.end - s.start == num_tokens:  # one adapter for the whole step: no slicing
            y.addmm_(torch.mm(x, a_t), b)
        else:
            y[s.start : s.end].addmm_(torch.mm(x[s.start : s.end], a_t), b)  # shrink [n, r], expand [n, d_out]


def lora_dense(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch) -> None:
    n, r, mask = batch.num_slots, lora_a.shape[1], batch.token_mask
    if mask is None:
        raise ValueError("a dense LoRA batch needs its token mask")
    v = x @ lora_a[:n].reshape(n * r, -1).t()  # shrink against all slots: [T, n*r]
    v.mul_(mask)  # keep each token's own slot block
    y.addmm_(v, lora_b[:n].reshape(n * r, -1))  # expand: [T, d_out]

