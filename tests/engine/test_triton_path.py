"""The engine's CUDA LoRA path, wired end to end on the CPU.

With `use_triton`, each step builds one TritonBatch, projections that share their input
(q/k/v, gate/up) run one fused shrink, and every layer runs its own expand. Here the three
kernel entry points are replaced by torch stand-ins that follow the kernels' contract
(the kernels themselves are checked against a float64 loop in test_triton_ops.py), so the
wiring — batch building, the fused-shrink cache, projection indices, per-step reset — is
checked against PEFT's greedy tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from conftest import TinyModel, make_engine
from loraplex.engine.request import SamplingParams
from loraplex.lora import triton_ops


def _segments(batch: triton_ops.TritonBatch) -> list[tuple[int, int, int, int]]:
    return list(zip(batch.starts.tolist(), batch.lengths.tolist(), batch.slots.tolist(), batch.ranks.tolist()))


class KernelStandIns:
    def __init__(self) -> None:
        self.fused_shrinks: list[int] = []  # number of projections of each fused launch
        self.expands = 0
        self.single = 0

    def shrink_multi(self, x: torch.Tensor, lora_as: Sequence[torch.Tensor], batch: Any, **_: Any) -> torch.Tensor:
        v = torch.zeros(len(lora_as), x.shape[0], batch.max_rank)  # [P, T, R] fp32
        for p, a in enumerate(lora_as):
            for start, length, slot, rank in _segments(batch):
                v[p, start : start + length, :rank] = x[start : start + length] @ a[slot, :rank].t()
        self.fused_shrinks.append(len(lora_as))
        return v

    def expand(self, y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, batch: Any) -> None:
        for start, length, slot, rank in _segments(batch):
            y[start : start + length] += v[start : start + length, :rank] @ lora_b[slot, :rank]
        self.expands += 1

    def lora(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: Any) -> None:
        self.single += 1
        self.expand(y, self.shrink_multi(x, [lora_a], batch)[0], lora_b, batch)
        self.fused_shrinks.pop()


def test_triton_path_wiring_gives_peft_tokens(tiny_llama: TinyModel, llama_peft: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = KernelStandIns()
    monkeypatch.setattr(triton_ops, "sgmv_shrink_multi", kernels.shrink_multi)
    monkeypatch.setattr(triton_ops, "sgmv_expand", kernels.expand)
    monkeypatch.setattr(triton_ops, "sgmv_lora", kernels.lora)
    engine = make_engine(tiny_llama)
    engine.runner.use_triton = True
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    adapters = ["all-r16-patterns", "qv-r4", None, "all-r8-rslora"]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), adapters)
    for prompt, adapter, result in zip(prompts, adapters, results):
        assert result.token_ids == llama_peft.greedy(prompt, adapter, 6), adapter
    # q/k/v fused in one launch (3 projections), gate/up in another (2): never per projection
    assert set(kernels.fused_shrinks) == {2, 3}
    assert kernels.single > 0 and kernels.expands > kernels.single  # o_proj / down_proj alone
    assert all(group._input is None for group in engine.lora.groups)  # reset after every step
    engine.close()
