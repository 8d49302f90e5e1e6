"""The independent reference for the grouped LoRA op: a per-token loop in float64."""

from __future__ import annotations

import torch


def per_token_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slot: list[int], ranks: list[int]) -> torch.Tensor:
    """out[t] = (x[t] @ A[slot]ᵀ[:, :r]) @ Bᵀ[slot][:r] for every token with a slot (>= 0), else 0."""
    out = torch.zeros(x.shape[0], b.shape[-1], dtype=torch.float64)
    for t, slot in enumerate(token_slot):
        if slot >= 0:
            r = ranks[slot]
            out[t] = (x[t].double().cpu() @ a[slot, :r].double().cpu().t()) @ b[slot, :r].double().cpu()
    return out
