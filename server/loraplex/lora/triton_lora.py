"""The Triton LoRA backend (CUDA): the LoraBackend interface over the SGMV kernels of triton_ops.py.

    prepare       segments ──> one TritonBatch (segment table on the device), once per step
    shrink        one launch: v [T, R] fp32 for one layer
    shrink_multi  one launch for all siblings (q/k/v, gate/up): v [P, T, R], one view per sibling
    expand        one launch per layer: y += v @ Bᵀ[slot], fp32 accumulate, in place

Every segment of the step is computed in each launch (an adapter that does not target a
layer has zeros there); a layer no adapter of the step targets launches nothing.

The kernels come in through `kernels` (the triton_ops module by default): tests pass torch
stand-ins that keep the kernels' contract, to check this wiring on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from loraplex.lora import triton_ops
from loraplex.lora.lora_backend import LayerPool, LoraBatch, slot_mask, token_segments
from loraplex.lora.triton_ops import TritonBatch, build_triton_batch


class SgmvKernels(Protocol):
    def sgmv_shrink_multi(self, x: torch.Tensor, lora_a: Sequence[torch.Tensor], batch: TritonBatch) -> torch.Tensor:
        """x: [T, d_in], P pools [slots, r, d_in] -> v: [P, T, R] fp32."""
        ...

    def sgmv_expand(self, y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, batch: TritonBatch) -> None:
        """y: [T, d_out] += v: [T, R] @ Bᵀ[slot], in place."""
        ...


@dataclass(slots=True)
class TritonLoraBatch(LoraBatch):
    table: TritonBatch | None = None  # None when no token has an adapter


class TritonLora:
    name = "triton"

    def __init__(self, device: torch.device, kernels: SgmvKernels = triton_ops) -> None:
        self.device = device
        self.kernels = kernels

    def prepare(
        self, token_runs: list[tuple[int, int]], slot_ranks: list[int], max_rank: int, num_tokens: int
    ) -> TritonLoraBatch:
        segments = token_segments(token_runs, slot_ranks, num_tokens)
        table = build_triton_batch(segments, num_tokens, self.device) if segments else None
        return TritonLoraBatch(num_tokens=num_tokens, segments=segments, slots=slot_mask(segments), table=table)

    def shrink(self, x: torch.Tensor, layer: LayerPool, batch: TritonLoraBatch) -> torch.Tensor | None:
        if batch.table is None or not _targets(layer, batch):
            return None
        return self.kernels.sgmv_shrink_multi(x, [layer.lora_a], batch.table)[0]  # [T, R]

    def shrink_multi(
        self, x: torch.Tensor, pool: torch.Tensor, layers: Sequence[LayerPool], batch: TritonLoraBatch
    ) -> list[torch.Tensor | None]:
        targeted = [_targets(m, batch) for m in layers]
        if batch.table is None or not any(targeted):
            return [None] * len(layers)
        v = self.kernels.sgmv_shrink_multi(x, [m.lora_a for m in layers], batch.table)  # [P, T, R]
        return [v[p] if t else None for p, t in enumerate(targeted)]

    def expand(self, y: torch.Tensor, v: torch.Tensor, layer: LayerPool, batch: TritonLoraBatch) -> None:
        assert batch.table is not None
        self.kernels.sgmv_expand(y, v, layer.lora_b, batch.table)


def _targets(layer: LayerPool, batch: LoraBatch) -> bool:
    return batch.targeted(layer) != 0
