"""The torch LoRA backend (CPU and CUDA): the grouped LoRA op on each adapter's own rank.

The op and the interface are in lora_backend.py. Every matmul reads an adapter's A and Bᵀ
through rank-trimmed views of the pool (A[slot, :rank]), so a rank-8 adapter costs rank 8
whatever `--max-lora-rank` is. The views are made once per (pool, band) and kept (`_weight`),
and a band that covers every token of the step reads x and y as they are: between the base's
NF4 matmuls, each torch call of the LoRA path starts with cold caches, so a view costs a
good part of what the small matmul it feeds costs (benchmarks/step_cost.py). The step's
segments are grouped into *bands*, once per step (in `prepare`), and each band is one GEMM:

    band = segments of adjacent slots (s, s+1, ...), L tokens each
    shrink  v[n, L, r] = x[band].view(n, L, d_in) @ A[s:s+n, :r]ᵀ        (bmm; mm when n = 1)
    expand  y[band].view(n, L, d_out) += v @ Bᵀ[s:s+n, :r]               (baddbmm; addmm)

Segments of different lengths (4 adapters shared by 16 decoding requests: 6, 3, 4, 3 tokens)
join a *ragged* band: their tokens are gathered into [n, L_max, d_in] (padding repeats a
real row), and expand adds back only the real positions' rows (index_select + add_).

r is the band's largest rank. Where slots of different ranks sit side by side, the split into
bands is the cheapest one under a cost model (a band's launch = BAND_COST_ROWS rows read; the
zero rows read for a smaller rank count as read): a few padded rows beat a launch, many do not.
The adapter store keeps the slots sorted by rank (AdapterStore.compact_slots) so that adapters
of one rank sit side by side.

At decode every segment is one token, so a batch of distinct adapters in adjacent slots is
one bmm per layer: the adapters' bytes read once, no FLOP spent on another adapter's rows
(the dense masked form this replaced multiplied every token by every slot's A).

Two forms, picked once per step:
- stacked (`batch.dense`, kept as the name the tests know): bands as above, while tokens ×
  slots in use stays under `dense_max_token_slots` (decode and short chunks).
- segments: one band per segment (mm / addmm on views), for long prefill segments.

A layer that some adapter of the step does not target gets its own bands over the segments
it serves (cached per step by the layer's target mask), so an adapter on q and v costs
nothing in the other layers. Siblings fed one input (q/k/v, gate/up) share one shrink
(`shrink_multi`: one bmm over [slots × P] weight matrices) when every adapter of the step
targets all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loraplex.lora.lora_backend import LayerPool, LoraBatch, Segment, slot_mask, token_segments

# Stacked form while tokens × slots in use stays below this (prefill-sized steps: segments).
DENSE_MAX_TOKEN_SLOTS = 4096
# What one more band costs, in rows of a weight matrix read (a band reads count × rank rows of
# A and of Bᵀ per projection): a batched matmul's launch, its Python, and the ramp-up of a
# new stream from memory. Measured on the CPU (python -m benchmarks.band_cost: 16 adapters of
# ranks 4-64 sorted by rank, the step's LoRA ops), three runs, ms: 16 -> 33.6 / 35.6 / 33.7
# (5 bands, no padding), 32 -> 30.6 / 32.5 / 30.9, 64 -> 28.7 / 33.6 / 29.9 (3 bands),
# 128 -> 27.4 / 28.2 / 30.9 (2 bands), 256 -> 27.1 / 28.1 / 29.0 (the same 2 bands). Past
# 32 the runs are within each other's noise; 128 has the lowest median but one.
BAND_COST_ROWS = 128
# Segments of different lengths join a band padded to the longest (their tokens gathered
# into [count, longest, d_in]); a padded token costs rank × d FLOPs where a row read costs d
# × 4 bytes: at the CPU's FLOP and byte rates, four padded tokens cost about one row read.
PAD_TOKENS_PER_ROW = 4
# Segments a band may span in the planner's search (bounds its quadratic cost per step).
MAX_BAND_SEGMENTS = 64
# Weight views kept across steps (TorchLora._weight); past this the cache starts again.
MAX_CACHED_VIEWS = 65536
A_T, B_T, AP_T = 0, 1, 2  # the kinds of weight view: Aᵀ, Bᵀ, Aᵀ of P siblings


@dataclass(slots=True)
class Band:
    start: int  # first token
    end: int
    slot: int  # first slot; the band covers slots [slot, slot + count)
    count: int
    length: int  # tokens per slot: the longest segment's
    rank: int  # rows read per slot: the band's largest rank
    pad: int = 0  # zero rows read beyond the slots' own ranks
    lengths: tuple[int, ...] | None = None  # each segment's tokens, when they differ (ragged)
    gather: torch.Tensor | None = None  # ragged: token row of each padded position [count × length]
    real: torch.Tensor | None = None  # ragged: padded position of each token of the band, in order

    def index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A ragged band's (gather, real) indexes, made once per step on first use."""
        if self.gather is None or self.real is None:
            assert self.lengths is not None
            gather, real, start = [], [], self.start
            for i, n in enumerate(self.lengths):
                gather += [start + min(j, n - 1) for j in range(self.length)]  # padding repeats a real row
                real += [i * self.length + j for j in range(n)]
                start += n
            self.gather = torch.tensor(gather, device=device)
            self.real = torch.tensor(real, device=device)
        return self.gather, self.real


def plan_bands(segments: Sequence[Segment], stacked: bool) -> list[Band]:
    """The cheapest split of the segments into bands (one GEMM each): dynamic programming over
    the runs of mergeable segments (adjacent slots, contiguous tokens), with cost, in rows read,
    BAND_COST_ROWS per band + count × rank + padded tokens × rank / PAD_TOKENS_PER_ROW. The
    segments form separate bands when not stacked."""
    bands: list[Band] = []
    run: list[Segment] = []
    for s in segments:
        if run and not (stacked and _mergeable(run[-1], s)):
            bands.extend(_split_run(run))
            run = []
        run.append(s)
    bands.extend(_split_run(run))
    return bands


def _mergeable(last: Segment, s: Segment) -> bool:
    return last.slot + 1 == s.slot and last.end == s.start


def band_cost(count: int, rank: int, longest: int, tokens: int) -> int:
    """A band's cost in rows read × PAD_TOKENS_PER_ROW (integers, so splits compare exactly)."""
    return PAD_TOKENS_PER_ROW * (BAND_COST_ROWS + count * rank) + (count * longest - tokens) * rank


def _split_run(run: list[Segment]) -> list[Band]:
    """Optimal bands over one run of mergeable segments: best[j] = cheapest cover of run[:j]."""
    n = len(run)
    if len({(s.rank, s.end - s.start) for s in run}) == 1:  # the usual decode step: one band, no search
        first = run[0]
        return [Band(first.start, run[-1].end, first.slot, n, first.end - first.start, first.rank)]
    best = [0] * (n + 1)
    cut = [0] * (n + 1)  # run[cut[j]:j] is the last band of the best cover of run[:j]
    for j in range(1, n + 1):
        rank, longest, tokens, best[j] = 0, 0, 0, -1
        for i in range(j - 1, max(-1, j - 1 - MAX_BAND_SEGMENTS), -1):
            length = run[i].end - run[i].start
            rank, longest, tokens = max(rank, run[i].rank), max(longest, length), tokens + length
            cost = best[i] + band_cost(j - i, rank, longest, tokens)
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    bands: list[Band] = []
    j = n
    while j > 0:
        i = cut[j]
        part = run[i:j]
        rank = max(s.rank for s in part)
        lengths = tuple(s.end - s.start for s in part)
        bands.append(Band(part[0].start, part[-1].end, part[0].slot, j - i, max(lengths), rank,
                          sum(rank - s.rank for s in part), lengths if len(set(lengths)) > 1 else None))
        j = i
    bands.reverse()
    return bands


# A shrink result: the bands it was computed for, and per band v [count, length, rank].
TorchShrunk = tuple[list[Band], list[torch.Tensor]]


@dataclass(slots=True)
class TorchBatch(LoraBatch):
    dense: bool = False  # the stacked form (bands across slots), see the module note
    bands: dict[int, list[Band]] = field(default_factory=dict)  # targeted slot mask -> bands


class TorchLora:
    name = "torch"

    def __init__(self, dtype: torch.dtype, device: torch.device, dense_max_token_slots: int = DENSE_MAX_TOKEN_SLOTS) -> None:
        self.dtype = dtype
        self.device = device
        self.dense_max_token_slots = dense_max_token_slots
        # (id(pool), slot, count, rank, kind) -> (pool, the band's weight view): see _weight.
        self._weights: dict[tuple[int, int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, token_runs: list[tuple[int, int]], slot_ranks: list[int], max_rank: int, num_tokens: int) -> TorchBatch:
        segments = token_segments(token_runs, slot_ranks, num_tokens)
        batch = TorchBatch(num_tokens=num_tokens, segments=segments, slots=slot_mask(segments))
        if segments:
            num_slots = max(s.slot for s in segments) - min(s.slot for s in segments) + 1
            batch.dense = len(segments) > 1 and num_tokens * num_slots <= self.dense_max_token_slots
            batch.bands[batch.slots] = plan_bands(segments, batch.dense)
        return batch

    def _bands(self, layer: LayerPool, batch: TorchBatch) -> list[Band]:
        """The step's bands over the segments whose adapter targets this layer (built once per mask)."""
        mask = batch.slots & layer.targets
        bands = batch.bands.get(mask)
        if bands is None:
            bands = plan_bands([s for s in batch.segments if mask >> s.slot & 1], batch.dense)
            batch.bands[mask] = bands
        return bands

    def _weight(self, pool: torch.Tensor, b: Band, kind: int) -> torch.Tensor:
        """The band's weights as its matmul reads them: a view of the pool, made once and kept.
        A decode step reuses the last step's bands, and making the views cost as much as the
        small matmuls they feed. The pools are written in place, never reallocated, so a view
        stays true; the pool is kept beside it so that its id is not reused.

            A_T:  pool [slots, r_max, d_in]    -> Aᵀ [d_in, r] (count 1) or [count, d_in, r]
            B_T:  pool [slots, r_max, d_out]   -> Bᵀ [r, d_out] (count 1) or [count, r, d_out]
            AP_T: pool [slots, P, r_max, d_in] -> Aᵀ of P siblings [count·P, d_in, r]
        """
        key = (id(pool), b.slot, b.count, b.rank, kind)
        hit = self._weights.get(key)
        if hit is not None:
            return hit[1]
        if len(self._weights) >= MAX_CACHED_VIEWS:
            self._weights.clear()
        s, n, r = b.slot, b.count, b.rank
        if kind == AP_T:
            view = pool[s : s + n, :, :r].reshape(n * pool.shape[1], r, -1).transpose(1, 2)
        else:
            view = pool[s : s + n, :r] if n > 1 else pool[s, :r]
            if kind == A_T:
                view = view.transpose(-1, -2)
        self._weights[key] = (pool, view)
        return view

    def shrink(self, x: torch.Tensor, layer: LayerPool, batch: TorchBatch) -> TorchShrunk | None:
        bands = self._bands(layer, batch)
        if not bands:
            return None
        a = layer.lora_a  # [slots, r_max, d_in]
        out = []
        for b in bands:
            w = self._weight(a, b, A_T)
            if b.count == 1:
                out.append(torch.mm(_rows(x, b), w))  # [L, r]
            else:
                out.append(torch.bmm(_band_x(x, b), w))  # [n, L, r]
        return bands, out

    def shrink_multi(
        self, x: torch.Tensor, pool: torch.Tensor, layers: Sequence[LayerPool], batch: TorchBatch
    ) -> list[TorchShrunk | None]:
        # Fusing pays only when every adapter of the step targets every sibling (else it reads zeros).
        slots = batch.slots
        if any(slots & m.targets != slots for m in layers):
            return [self.shrink(x, m, batch) for m in layers]
        bands = self._bands(layers[0], batch)
        num_proj = len(layers)
        per_proj: list[list[torch.Tensor]] = [[] for _ in layers]
        for b in bands:
            w = self._weight(pool, b, AP_T)  # [n*P, d_in, r]
            if b.count == 1:  # [P, L, d_in] (a view) @ w -> one [L, r] per sibling
                vs = torch.bmm(_rows(x, b).expand(num_proj, b.length, x.shape[1]), w).unbind(0)
            else:  # each slot's tokens once per sibling: [n*P, L, d_in] @ w -> one [n, L, r] per sibling
                xs = _band_x(x, b).repeat_interleave(num_proj, dim=0)
                vs = torch.bmm(xs, w).view(b.count, num_proj, b.length, -1).unbind(1)
            for p in range(num_proj):
                per_proj[p].append(vs[p])
        return [(bands, vs) for vs in per_proj]

    def expand(self, y: torch.Tensor, v: TorchShrunk, layer: LayerPool, batch: TorchBatch) -> None:
        bands, vs = v
        lora_b = layer.lora_b  # [slots, r_max, d_out]
        for b, vb in zip(bands, vs):
            w = self._weight(lora_b, b, B_T)
            ys = _rows(y, b)  # [n * L, d_out]
            if b.count == 1:
                ys.addmm_(vb, w)
            elif b.lengths is None:
                ys.view(b.count, b.length, -1).baddbmm_(vb, w)
            else:  # ragged: the padded positions' rows are computed and dropped
                out = torch.bmm(vb, w).view(-1, ys.shape[1])
                ys.add_(out.index_select(0, b.index(y.device)[1]))


def _rows(t: torch.Tensor, b: Band) -> torch.Tensor:
    """The band's rows of a [T, d] tensor: t itself when the band covers every token (a decode
    step of one adapter, or of adjacent slots), else a slice."""
    if b.start == 0 and b.end == t.shape[0]:
        return t
    return t[b.start : b.end]


def _band_x(x: torch.Tensor, b: Band) -> torch.Tensor:
    """The band's tokens as [count, length, d_in]: a view, or gathered and padded when ragged."""
    if b.lengths is None:
        return _rows(x, b).view(b.count, b.length, -1)
    return x.index_select(0, b.index(x.device)[0]).view(b.count, b.length, -1)
