"""The torch LoRA backend (CPU and CUDA): the grouped LoRA op in two forms, and the reference.

The op and the interface are in lora_backend.py. Two torch forms compute the same thing:

- segments (SGMV-like): one shrink + expand per segment on views, no gather. Best when
  segments are long (prefill).
- dense: shrink every token against the stacked A of all slots in use, zero the blocks of
  other slots with a per-step mask, expand against the stacked Bᵀ. Two matmuls per layer
  whatever the number of adapters; the extra compute is T·n_slots·r, tiny at decode.

`prepare` picks the form once per step (and builds the dense mask once); a layer that some
adapter of the step does not target takes the segment form over the segments it serves, so
an adapter on q and v costs nothing in the other layers. Siblings fed one input (q/k/v,
gate/up) share one shrink (`shrink_multi`: one GEMM streams the weights ~30% faster than P
small ones) when every adapter of the step targets all of them; otherwise each shrinks alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.lora.lora_backend import LayerPool, LoraBatch, Segment, token_segments

# Dense form while tokens × slots in use stays below this (tuned on the CPU bench model).
DENSE_MAX_TOKEN_SLOTS = 2048

# A shrink result: dense [T, n_slots * r_max] (masked), or per segment its tokens' [len, rank].
TorchShrunk = torch.Tensor | list[tuple[Segment, torch.Tensor]]


@dataclass(slots=True)
class TorchBatch(LoraBatch):
    dense: bool = False
    num_slots: int = 0  # dense: slots [0, num_slots) are stacked
    token_mask: torch.Tensor | None = None  # dense: [T, num_slots * r_max], 1 on the token's slot block


class TorchLora:
    name = "torch"

    def __init__(self, dtype: torch.dtype, device: torch.device, dense_max_token_slots: int = DENSE_MAX_TOKEN_SLOTS) -> None:
        self.dtype = dtype
        self.device = device
        self.dense_max_token_slots = dense_max_token_slots

    def prepare(self, token_runs: list[tuple[int, int]], slot_ranks: list[int], max_rank: int, num_tokens: int) -> TorchBatch:
        segments = token_segments(token_runs, slot_ranks, num_tokens)
        batch = TorchBatch(num_tokens=num_tokens, segments=segments)
        if not segments:
            return batch
        num_slots = max(s.slot for s in segments) + 1
        if len(segments) > 1 and num_tokens * num_slots <= self.dense_max_token_slots:
            mask = torch.zeros(num_tokens, num_slots, max_rank, dtype=self.dtype)
            for s in segments:
                mask[s.start : s.end, s.slot, : s.rank] = 1
            batch.dense = True
            batch.num_slots = num_slots
            batch.token_mask = mask.view(num_tokens, num_slots * max_rank).to(self.device)
        return batch

    def shrink(self, x: torch.Tensor, layer: LayerPool, batch: TorchBatch) -> TorchShrunk | None:
        views = layer.views
        segments = [s for s in batch.segments if views[s.slot] is not None]  # this layer's
        if not segments:
            return None
        if batch.dense and len(segments) == len(batch.segments):
            n, r, mask = batch.num_slots, layer.lora_a.shape[1], batch.token_mask
            assert mask is not None
            v = x @ layer.lora_a[:n].reshape(n * r, -1).t()  # shrink against all slots: [T, n*r]
            return v.mul_(mask)  # keep each token's own slot block
        out = []
        for s in segments:
            a_t = views[s.slot][0]  # type: ignore[index]  # [d_in, rank]
            xs = x if s.end - s.start == batch.num_tokens else x[s.start : s.end]  # one adapter: no slicing
            out.append((s, torch.mm(xs, a_t)))  # [len, rank]
        return out

    def shrink_multi(
        self, x: torch.Tensor, pool: torch.Tensor, layers: Sequence[LayerPool], batch: TorchBatch
    ) -> list[TorchShrunk | None]:
        # Fusing pays only when every adapter of the step targets every sibling (else it reads zeros).
        if not all(m.views[s.slot] is not None for m in layers for s in batch.segments):
            return [self.shrink(x, m, batch) for m in layers]
        num_proj, r = len(layers), pool.shape[2]
        if batch.dense:
            n, mask = batch.num_slots, batch.token_mask
            assert mask is not None
            v = x @ pool[:n].reshape(n * num_proj * r, -1).t()  # [T, n*P*r]
            v = v.view(x.shape[0], n, num_proj, r).mul_(mask.view(x.shape[0], n, 1, r))  # each token keeps its slot
            return [v[:, :, p, :].reshape(x.shape[0], n * r) for p in range(num_proj)]
        per_segment = [  # [len, P, r]
            (s, (x[s.start : s.end] @ pool[s.slot].reshape(num_proj * r, -1).t()).view(-1, num_proj, r))
            for s in batch.segments
        ]
        return [
            [(s, v[:, p, : m.views[s.slot][1].shape[0]]) for s, v in per_segment]  # type: ignore[index]
            for p, m in enumerate(layers)
        ]

    def expand(self, y: torch.Tensor, v: TorchShrunk, layer: LayerPool, batch: TorchBatch) -> None:
        if isinstance(v, torch.Tensor):  # dense: [T, n*r]
            n = batch.num_slots
            y.addmm_(v, layer.lora_b[:n].reshape(n * layer.lora_b.shape[1], -1))  # expand: [T, d_out]
            return
        for s, vs in v:
            b = layer.views[s.slot][1]  # type: ignore[index]  # [rank, d_out]
            if s.end - s.start == batch.num_tokens:
                y.addmm_(vs, b)
            else:
                y[s.start : s.end].addmm_(vs, b)
