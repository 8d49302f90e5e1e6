"""The grouped LoRA op (both torch forms) against a per-token loop in float64."""

from __future__ import annotations

import random

import pytest
import torch
from lora_reference import per_token_lora

from loraplex.lora import lora_ops
from loraplex.lora.lora_ops import build_lora_batch, grouped_lora, slot_views


def _case(num_tokens: int, num_slots: int, seed: int, max_rank: int = 16) -> tuple:
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    d_in, d_out = 64, 96
    ranks = [rng.choice([1, 4, 8, max_rank]) for _ in range(num_slots)]
    a = torch.zeros(num_slots, max_rank, d_in)
    b = torch.zeros(num_slots, max_rank, d_out)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in, generator=g)
        b[s, :r] = torch.randn(r, d_out, generator=g)
    # runs of tokens per request, sorted by slot as the runner packs them; -1 = base model
    runs: list[tuple[int, int]] = []
    left = num_tokens
    while left:
        n = min(left, rng.randrange(1, 9))
        runs.append((rng.randrange(-1, num_slots), n))
        left -= n
    runs.sort(key=lambda run: run[0])
    token_slot = [slot for slot, n in runs for _ in range(n)]
    x = torch.randn(num_tokens, d_in, generator=g)
    return x, a, b, runs, token_slot, ranks


@pytest.mark.parametrize("num_tokens", [1, 7, 33, 130])
@pytest.mark.parametrize("num_slots", [1, 3, 8])
@pytest.mark.parametrize("form", ["dense", "segments"])
def test_grouped_lora_matches_per_token_loop(num_tokens: int, num_slots: int, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_ops, "DENSE_MAX_TOKEN_SLOTS", 10**9 if form == "dense" else 0)
    x, a, b, runs, token_slot, ranks = _case(num_tokens, num_slots, seed=num_tokens * 10 + num_slots)
    base = torch.randn(num_tokens, b.shape[-1])
    batch = build_lora_batch(runs, ranks, a.shape[1], num_tokens, torch.float32, torch.device("cpu"))
    y = base.clone()
    grouped_lora(y, x, a, b, batch)
    expected = base.double() + per_token_lora(x, a, b, token_slot, ranks)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    multi_segment = len(batch.segments) > 1
    assert batch.dense == (form == "dense" and multi_segment)


def test_segments_merge_per_slot_and_skip_base() -> None:
    batch = build_lora_batch([(-1, 3), (0, 2), (0, 1), (2, 4)], [4, 0, 8], 16, 10, torch.float32, torch.device("cpu"))
    assert [(s.start, s.end, s.slot, s.rank) for s in batch.segments] == [(3, 6, 0, 4), (6, 10, 2, 8)]
    assert not build_lora_batch([(-1, 5)], [0], 16, 5, torch.float32, torch.device("cpu")).segments
    with pytest.raises(ValueError, match="cover"):
        build_lora_batch([(0, 2)], [4], 16, 3, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("form", ["dense", "segments"])
def test_slots_that_do_not_target_the_layer_add_nothing(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_ops, "DENSE_MAX_TOKEN_SLOTS", 10**9 if form == "dense" else 0)
    x, a, b, runs, token_slot, ranks = _case(40, 4, seed=3)
    skipped = next(s for s in token_slot if s >= 0)
    assert len({s for s in token_slot if s >= 0}) > 1
    batch = build_lora_batch(runs, ranks, a.shape[1], 40, torch.float32, torch.device("cpu"))
    views = slot_views(a, b, ranks)
    views[skipped] = None  # the adapter in this slot does not target this layer
    base = torch.randn(40, b.shape[-1])
    y = base.clone()
    grouped_lora(y, x, a, b, batch, views)
    kept = [s if s != skipped else -1 for s in token_slot]
    expected = base.double() + per_token_lora(x, a, b, kept, ranks)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
