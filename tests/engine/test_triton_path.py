"""The engine's CUDA LoRA path, wired end to end on the CPU.

The engine gets a TritonLora backend whose kernels are torch stand-ins that follow the
kernels' contract (the kernels themselves are checked against a float64 loop in
test_triton_ops.py), passed through the seam (`Engine(lora_backend=...)`). Each step then
builds one TritonBatch, projections that share their input (q/k/v, gate/up) run one fused
shrink, and every layer runs its own expand; this wiring — batch building, the fused-shrink
cache, projection indices, per-step reset — is checked against PEFT's greedy tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from conftest import TinyModel, make_engine
from loraplex.engine.request import SamplingParams
from loraplex.lora.triton_lora import TritonLora
from loraplex.lora.triton_ops import TritonBatch


def _segments(batch: TritonBatch) -> list[tuple[int, int, int, int]]:
    return list(zip(batch.starts.tolist(), batch.lengths.tolist(), batch.slots.tolist(), batch.ranks.tolist()))


class KernelStandIns:
    """sgmv_shrink_multi / sgmv_expand in torch, on the segment table the kernels read."""

    def __init__(self) -> None:
        self.shrinks: list[int] = []  # number of projections of each shrink launch
        self.expands = 0

    def sgmv_shrink_multi(self, x: torch.Tensor, lora_a: Sequence[torch.Tensor], batch: TritonBatch) -> torch.Tensor:
        v = torch.zeros(len(lora_a), x.shape[0], batch.max_rank)  # [P, T, R] fp32
        for p, a in enumerate(lora_a):
            for start, length, slot, rank in _segments(batch):
                v[p, start : start + length, :rank] = x[start : start + length] @ a[slot, :rank].t()
        self.shrinks.append(len(lora_a))
        return v

    def sgmv_expand(self, y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, batch: TritonBatch) -> None:
        for start, length, slot, rank in _segments(batch):
            y[start : start + length] += v[start : start + length, :rank] @ lora_b[slot, :rank]
        self.expands += 1


def test_triton_path_wiring_gives_peft_tokens(tiny_llama: TinyModel, llama_peft: Any) -> None:
    kernels = KernelStandIns()
    engine = make_engine(tiny_llama, lora_backend=TritonLora(torch.device("cpu"), kernels=kernels))
    assert engine.lora.backend.name == "triton"
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    adapters = ["all-r16-patterns", "qv-r4", None, "all-r8-rslora"]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), adapters)
    for prompt, adapter, result in zip(prompts, adapters, results):
        assert result.token_ids == llama_peft.greedy(prompt, adapter, 6), adapter
    # Per decoder layer and step: q/k/v in one launch (3 projections), gate/up in another (2),
    # o_proj and down_proj alone (1 each); never one launch per sibling.
    assert set(kernels.shrinks) == {1, 2, 3}
    assert kernels.shrinks.count(1) == 2 * kernels.shrinks.count(3) == 2 * kernels.shrinks.count(2)
    assert kernels.expands == sum(kernels.shrinks)  # each step holds an all-linear adapter: every projection expands
    assert all(group._input is None for group in engine.lora.groups)  # reset after every step
    engine.close()
