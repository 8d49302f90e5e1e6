"""The independent reference for the grouped LoRA op (a per-token loop in float64), and a
helper that runs one layer through a LoRA backend."""

from __future__ import annotations

from typing import Any

import torch

from loraplex.lora.lora_backend import PoolSlice, SlotViews, slot_views


def per_token_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slot: list[int], ranks: list[int]) -> torch.Tensor:
    """out[t] = (x[t] @ A[slot]ᵀ[:, :r]) @ Bᵀ[slot][:r] for every token with a slot (>= 0), else 0."""
    out = torch.zeros(x.shape[0], b.shape[-1], dtype=torch.float64)
    for t, slot in enumerate(token_slot):
        if slot >= 0:
            r = ranks[slot]
            out[t] = (x[t].double().cpu() @ a[slot, :r].double().cpu().t()) @ b[slot, :r].double().cpu()
    return out


def apply_lora(
    backend: Any, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: Any,
    views: SlotViews | None = None,
) -> None:
    """One layer's update through a backend, as LoraLinear runs it: shrink, then expand.

    views: the layer's per-slot views (None for a slot whose adapter does not target it); by
    default every slot used by the batch, at its segment's rank.
    """
    if views is None:
        ranks = [0] * a.shape[0]
        for s in batch.segments:
            ranks[s.slot] = s.rank
        views = slot_views(a, b, ranks)
    layer = PoolSlice(a, b, views)
    v = backend.shrink(x, layer, batch)
    if v is not None:
        backend.expand(y, v, layer, batch)
