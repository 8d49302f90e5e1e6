"""The torch LoRA backend (both forms) against a per-token loop in float64."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_reference import apply_lora, per_token_lora

from loraplex.lora.lora_backend import PoolSlice, Segment, slot_views, token_segments
from loraplex.lora.lora_ops import BAND_COST_ROWS, PAD_TOKENS_PER_ROW, TorchLora, plan_bands

CPU = torch.device("cpu")


def _backend(form: str) -> TorchLora:
    """The torch backend held to one form: dense whenever there is more than one segment, or never."""
    return TorchLora(torch.float32, CPU, dense_max_token_slots=10**9 if form == "dense" else 0)


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
def test_grouped_lora_matches_per_token_loop(num_tokens: int, num_slots: int, form: str) -> None:
    backend = _backend(form)
    x, a, b, runs, token_slot, ranks = _case(num_tokens, num_slots, seed=num_tokens * 10 + num_slots)
    base = torch.randn(num_tokens, b.shape[-1])
    batch = backend.prepare(runs, ranks, a.shape[1], num_tokens)
    y = base.clone()
    apply_lora(backend, y, x, a, b, batch)
    expected = base.double() + per_token_lora(x, a, b, token_slot, ranks)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    multi_segment = len(batch.segments) > 1
    assert batch.dense == (form == "dense" and multi_segment)


def test_segments_merge_per_slot_and_skip_base() -> None:
    segments = token_segments([(-1, 3), (0, 2), (0, 1), (2, 4)], [4, 0, 8], 10)
    assert [(s.start, s.end, s.slot, s.rank) for s in segments] == [(3, 6, 0, 4), (6, 10, 2, 8)]
    assert not token_segments([(-1, 5)], [0], 5)
    assert not _backend("dense").prepare([(-1, 5)], [0], 16, 5).segments
    with pytest.raises(ValueError, match="cover"):
        token_segments([(0, 2)], [4], 3)


@pytest.mark.parametrize("form", ["dense", "segments"])
def test_slots_that_do_not_target_the_layer_add_nothing(form: str) -> None:
    backend = _backend(form)
    x, a, b, runs, token_slot, ranks = _case(40, 4, seed=3)
    skipped = next(s for s in token_slot if s >= 0)
    assert len({s for s in token_slot if s >= 0}) > 1
    batch = backend.prepare(runs, ranks, a.shape[1], 40)
    views = slot_views(a, b, ranks)
    views[skipped] = None  # the adapter in this slot does not target this layer
    base = torch.randn(40, b.shape[-1])
    y = base.clone()
    apply_lora(backend, y, x, a, b, batch, views)
    kept = [s if s != skipped else -1 for s in token_slot]
    expected = base.double() + per_token_lora(x, a, b, kept, ranks)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("form", ["dense", "segments"])
@pytest.mark.parametrize("all_targeted", [True, False], ids=["fused", "one-not-targeted"])
def test_shrink_multi_matches_per_token_loop(form: str, all_targeted: bool) -> None:
    """q/k/v-like siblings: one shrink for all (or each alone when an adapter skips one)."""
    backend = _backend(form)
    x, a, b, runs, token_slot, ranks = _case(40, 4, seed=5)
    g = torch.Generator().manual_seed(7)
    pool = torch.zeros(a.shape[0], 3, *a.shape[1:])  # [slots, P, r, d_in]
    pool[:, 0] = a
    for p in (1, 2):
        pool[:, p] = torch.randn(a.shape, generator=g) * (a != 0)  # zeros past each rank, as in the pool
    bs = [b, *(torch.randn(b.shape, generator=g) * (b != 0) for _ in (1, 2))]
    views = [slot_views(pool[:, p], bs[p], ranks) for p in range(3)]
    skipped = next(s for s in token_slot if s >= 0)
    if not all_targeted:
        views[1][skipped] = None  # that adapter does not target the second sibling
    layers = [PoolSlice(pool[:, p], bs[p], views[p]) for p in range(3)]
    batch = backend.prepare(runs, ranks, a.shape[1], 40)
    vs = backend.shrink_multi(x, pool, layers, batch)
    for p, layer in enumerate(layers):
        base = torch.randn(40, b.shape[-1], generator=g)
        y = base.clone()
        assert vs[p] is not None
        backend.expand(y, vs[p], layer, batch)
        kept = [s if views[p][max(s, 0)] is not None else -1 for s in token_slot]
        expected = base.double() + per_token_lora(x, pool[:, p], bs[p], kept, ranks)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


def _decode_case(ranks: list[int], max_rank: int, seed: int, past_rank: float) -> tuple:
    """One token per slot, slots 0..n-1 in order (a decode step of distinct adapters); the
    pool holds `past_rank` in the rows past each adapter's rank."""
    g = torch.Generator().manual_seed(seed)
    n, d_in, d_out = len(ranks), 64, 96
    a = torch.full((n, max_rank, d_in), past_rank)
    b = torch.full((n, max_rank, d_out), past_rank)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in, generator=g)
        b[s, :r] = torch.randn(r, d_out, generator=g)
    return torch.randn(n, d_in, generator=g), a, b, [(s, 1) for s in range(n)], list(range(n))


def test_decode_of_equal_ranks_reads_only_their_rows_in_one_band() -> None:
    """Rank 8 adapters in a rank-64 pool: one bmm over A[0:6, :8]; NaN past rank 8 proves no more is read."""
    ranks = [8] * 6
    x, a, b, runs, token_slot = _decode_case(ranks, 64, seed=11, past_rank=float("nan"))
    backend = TorchLora(torch.float32, CPU)
    batch = backend.prepare(runs, ranks, 64, len(runs))
    (band,) = batch.bands[batch.slots]
    assert (band.slot, band.count, band.length, band.rank, band.pad) == (0, 6, 1, 8, 0)
    y = torch.zeros(len(runs), b.shape[-1])
    apply_lora(backend, y, x, a, b, batch)
    torch.testing.assert_close(y.double(), per_token_lora(x, a, b, token_slot, ranks), rtol=1e-5, atol=1e-4)


def test_mixed_ranks_split_into_bands_when_padding_costs_more_than_a_launch() -> None:
    ranks = [4, 8, 8, 64, 64, 16, 4, 4]
    x, a, b, runs, token_slot = _decode_case(ranks, 64, seed=12, past_rank=0.0)  # the pool's zeros past rank
    backend = TorchLora(torch.float32, CPU)
    batch = backend.prepare(runs, ranks, 64, len(runs))
    bands = [(bd.slot, bd.count, bd.rank, bd.pad) for bd in batch.bands[batch.slots]]
    # cost (rows + 128 a band): 152 + 256 + 176 = 584; one band at rank 64 would be 640, the
    # five of equal ranks 4 + 16 + 128 + 16 + 8 + 5 × 128 = 812
    assert bands == [(0, 3, 8, 4), (3, 2, 64, 0), (5, 3, 16, 24)]
    y = torch.zeros(len(runs), b.shape[-1])
    apply_lora(backend, y, x, a, b, batch)
    torch.testing.assert_close(y.double(), per_token_lora(x, a, b, token_slot, ranks), rtol=1e-5, atol=1e-4)


def _partitions(n: int) -> Iterator[list[tuple[int, int]]]:
    """Every split of range(n) into consecutive parts [(i, j), ...]."""
    for cuts in itertools.product((False, True), repeat=max(0, n - 1)):
        parts, start = [], 0
        for k, cut in enumerate(cuts, start=1):
            if cut:
                parts.append((start, k))
                start = k
        yield [*parts, (start, n)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 4, 8, 16, 32, 64, 128]), st.sampled_from([1, 1, 2, 3, 7, 40])), min_size=1, max_size=9))
def test_band_plan_is_the_cheapest_split_of_adjacent_slots(slots: list[tuple[int, int]]) -> None:
    """The planner against every split there is, under the cost it states: per band
    BAND_COST_ROWS + rows read + padded tokens × rank / PAD_TOKENS_PER_ROW."""
    ranks = [r for r, _ in slots]
    lengths = [n for _, n in slots]
    starts = list(itertools.accumulate(lengths, initial=0))
    segments = [Segment(starts[i], starts[i + 1], i, r) for i, r in enumerate(ranks)]
    bands = plan_bands(segments, stacked=True)

    def cost(i: int, j: int) -> float:
        longest, tokens = max(lengths[i:j]), sum(lengths[i:j])
        return BAND_COST_ROWS + (j - i) * max(ranks[i:j]) + ((j - i) * longest - tokens) * max(ranks[i:j]) / PAD_TOKENS_PER_ROW

    planned = sum(cost(bd.slot, bd.slot + bd.count) for bd in bands)
    assert planned == min(sum(cost(i, j) for i, j in parts) for parts in _partitions(len(ranks)))
    covered = [(s, bd.rank) for bd in bands for s in range(bd.slot, bd.slot + bd.count)]
    assert [s for s, _ in covered] == list(range(len(ranks)))
    assert all(r >= ranks[s] for s, r in covered)
    for bd in bands:
        own = lengths[bd.slot : bd.slot + bd.count]
        assert (bd.start, bd.end, bd.length) == (starts[bd.slot], starts[bd.slot + bd.count], max(own))
        assert bd.lengths == (tuple(own) if len(set(own)) > 1 else None)
        assert bd.pad == sum(bd.rank - ranks[s] for s in range(bd.slot, bd.slot + bd.count))


def test_bands_never_join_slots_that_are_not_adjacent() -> None:
    segments = [Segment(0, 1, 0, 8), Segment(1, 2, 2, 8), Segment(2, 4, 3, 8), Segment(4, 6, 4, 8)]
    assert [(bd.slot, bd.count) for bd in plan_bands(segments, stacked=True)] == [(0, 1), (2, 3)]
    assert [(bd.slot, bd.count) for bd in plan_bands(segments, stacked=False)] == [(0, 1), (2, 1), (3, 1), (4, 1)]


@pytest.mark.parametrize("fused", [False, True], ids=["shrink", "shrink_multi"])
def test_segments_of_different_lengths_decode_as_one_ragged_band(fused: bool) -> None:
    """4 adapters shared by 16 decoding requests (6, 3, 4, 3 tokens): one band padded to 6
    tokens a slot; NaN in the pool past each rank proves no more rows are read, and only the
    real tokens' rows change y."""
    ranks, lengths = [8, 8, 4, 8], [6, 3, 4, 3]
    g = torch.Generator().manual_seed(21)
    a = torch.full((4, 16, 64), float("nan"))
    b = torch.full((4, 16, 96), float("nan"))
    for s, r in enumerate(ranks):
        a[s, :8] = 0.0  # the pool's zeros up to the band's rank 8
        b[s, :8] = 0.0
        a[s, :r] = torch.randn(r, 64, generator=g)
        b[s, :r] = torch.randn(r, 96, generator=g)
    runs = [(-1, 2), *((s, n) for s, n in enumerate(lengths)), (-1, 1)]
    token_slot = [slot for slot, n in runs for _ in range(n)]
    x = torch.randn(len(token_slot), 64, generator=g)
    backend = TorchLora(torch.float32, CPU)
    batch = backend.prepare(runs, ranks, 16, len(token_slot))
    (band,) = batch.bands[batch.slots]
    assert (band.start, band.end, band.count, band.length, band.rank, band.lengths) == (2, 18, 4, 6, 8, (6, 3, 4, 3))
    base = torch.randn(len(token_slot), 96, generator=g)
    y = base.clone()
    if fused:
        layer = PoolSlice(a, b, slot_views(a, b, ranks))
        (v,) = backend.shrink_multi(x, a.unsqueeze(1), [layer], batch)
        assert v is not None
        backend.expand(y, v, layer, batch)
    else:
        apply_lora(backend, y, x, a, b, batch)
    expected = base.double() + per_token_lora(x, a, b, token_slot, ranks)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[:2], base[:2]) and torch.equal(y[-1], base[-1])  # base-model tokens untouched


def test_segment_form_reads_only_each_adapters_rank() -> None:
    """Long (prefill) segments: one mm per segment on the rank view; NaN past rank is never read."""
    ranks = [4, 16, 1]
    g = torch.Generator().manual_seed(13)
    a = torch.full((3, 32, 40), float("nan"))
    b = torch.full((3, 32, 24), float("nan"))
    for s, r in enumerate(ranks):
        a[s, :r], b[s, :r] = torch.randn(r, 40, generator=g), torch.randn(r, 24, generator=g)
    runs = [(-1, 5), (0, 70), (1, 90), (2, 65)]
    token_slot = [slot for slot, n in runs for _ in range(n)]
    x = torch.randn(len(token_slot), 40, generator=g)
    backend = _backend("segments")  # held to the segment form (stacked, these would join one ragged band)
    batch = backend.prepare(runs, ranks, 32, len(token_slot))
    assert [(bd.count, bd.rank) for bd in batch.bands[batch.slots]] == [(1, 4), (1, 16), (1, 1)]
    y = torch.zeros(len(token_slot), 24)
    apply_lora(backend, y, x, a, b, batch)
    torch.testing.assert_close(y.double(), per_token_lora(x, a, b, token_slot, ranks), rtol=1e-5, atol=1e-4)
