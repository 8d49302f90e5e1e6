"""The LoRA part of one decode step alone, per slot layout: how much a band (one batched
matmul per projection) costs beside the rows it reads.

    python -m benchmarks.band_cost [--rounds 7]

The bench model's projections (d=1024, ffn 2816, 8 layers, every linear layer), a rank-64
slot pool of 16 slots, 16 decode tokens (one per slot), the torch LoRA backend on the CPU:

    distinct          16 adapters of rank 16 (one band)
    hetero as placed  ranks 4..64 in the order the benchmark loads them, where placement puts them
    hetero sorted     the same adapters after the store's exchanges (slots sorted by rank)
    all rank 64       16 adapters of rank 64 (one band)
    uniform           4 rank-16 adapters shared by 16 requests (6, 3, 4, 3 tokens): one ragged
                      band, and the equal-length bands the planner made before (one per adapter)

and the sorted layout planned with other values of BAND_COST_ROWS. For each: the bands,
the rows of A and Bᵀ they read (zero padding included), the milliseconds of the step's LoRA
ops (median over interleaved rounds) and the time the adapters' own bytes take at the
measured memory bandwidth (the floor). Results: benchmarks/results/band_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.models import CPU_BENCH
from benchmarks.report import write
from benchmarks.server_bench import HETERO_RANKS
from benchmarks.serving import memory_bandwidth
from loraplex.lora import lora_ops
from loraplex.lora.lora_backend import PoolSlice, Segment, slot_views
from loraplex.lora.lora_ops import TorchLora
from loraplex.lora.slots import next_swap, placement

SLOTS, MAX_RANK, TOKENS = 16, 64, 16
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass
class Layout:
    """The adapters' ranks in slots 0, 1, ... and each one's tokens in the step (default: one each)."""

    ranks: list[int]
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = self.tokens or [1] * len(self.ranks)
        assert sum(self.tokens) == TOKENS


def placed(ranks: list[int]) -> list[int]:
    """The slots the store's placement gives adapters loaded in this order into an empty pool."""
    device: list[int | None] = [None] * SLOTS
    for rank in ranks:
        device[placement([s for s, r in enumerate(device) if r is None], device, rank)] = rank
    return [r for r in device if r is not None]


def sorted_by_exchanges(ranks: list[int]) -> list[int]:
    device: list[int | None] = list(ranks)
    while (swap := next_swap(device)) is not None:
        a, b = swap
        device[a], device[b] = device[b], device[a]
    return [r for r in device if r is not None]


def build(ranks: list[int]) -> list[dict[Any, Any]]:
    """Per layer: a PoolSlice per projection, and each sibling group's shared A pool."""
    shapes = CPU_BENCH.module_shapes()
    layers = []
    g = torch.Generator().manual_seed(0)
    for _ in range(CPU_BENCH.num_hidden_layers):
        layer: dict[Any, Any] = {}
        for group in GROUPS:
            pool = torch.zeros(SLOTS, len(group), MAX_RANK, shapes[group[0]][0])
            for s, r in enumerate(ranks):
                pool[s, :, :r] = torch.randn(len(group), r, pool.shape[-1], generator=g) * 0.01
            for p, name in enumerate(group):
                b = torch.zeros(SLOTS, MAX_RANK, shapes[name][1])
                for s, r in enumerate(ranks):
                    b[s, :r] = torch.randn(r, shapes[name][1], generator=g) * 0.01
                layer[name] = PoolSlice(pool[:, p], b, slot_views(pool[:, p], b, ranks))
            layer[group] = pool
        layers.append(layer)
    return layers


def equal_length_bands(segments: list[Segment]) -> list[lora_ops.Band]:
    """The bands of the planner before ragged bands: segments of different lengths never join."""
    bands: list[lora_ops.Band] = []
    group: list[Segment] = []
    for s in segments:
        if group and (group[-1].end - group[-1].start) != (s.end - s.start):
            bands += lora_ops.plan_bands(group, True)
            group = []
        group.append(s)
    return bands + lora_ops.plan_bands(group, True)


def lora_step(backend: TorchLora, layers: list[dict[Any, Any]], layout: Layout, xs: dict[int, torch.Tensor],
              ys: dict[int, torch.Tensor], ragged: bool) -> tuple[float, list[lora_ops.Band]]:
    shapes = CPU_BENCH.module_shapes()
    start = time.perf_counter()
    ranks = layout.ranks + [0] * (SLOTS - len(layout.ranks))
    batch = backend.prepare(list(enumerate(layout.tokens)), ranks, MAX_RANK, TOKENS)
    if not ragged:
        batch.bands[batch.slots] = equal_length_bands(batch.segments)
    for layer in layers:
        for group in GROUPS:
            x = xs[shapes[group[0]][0]]
            if len(group) > 1:
                vs = backend.shrink_multi(x, layer[group], [layer[n] for n in group], batch)
            else:
                vs = [backend.shrink(x, layer[group[0]], batch)]
            for name, v in zip(group, vs):
                assert v is not None  # every slot's adapter targets every projection
                backend.expand(ys[shapes[name][1]], v, layer[name], batch)
    return time.perf_counter() - start, batch.bands[batch.slots]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--costs", default="16,32,64,128,256", help="BAND_COST_ROWS values tried on the sorted layout")
    args = p.parse_args(argv)
    hetero = placed([HETERO_RANKS[i % len(HETERO_RANKS)] for i in range(SLOTS)])
    layouts = {
        "distinct": Layout([16] * SLOTS), "hetero as placed": Layout(hetero), "hetero sorted": Layout(sorted_by_exchanges(hetero)),
        "all rank 64": Layout([MAX_RANK] * SLOTS), "uniform (4 adapters: 6, 3, 4, 3 tokens)": Layout([16] * 4, [6, 3, 4, 3]),
    }
    default = lora_ops.BAND_COST_ROWS
    runs = [(name, default, True) for name in layouts]
    runs += [("uniform (4 adapters: 6, 3, 4, 3 tokens)", default, False)]
    runs += [("hetero sorted", c, True) for c in map(int, args.costs.split(",")) if c != default]
    backend = TorchLora(torch.float32, torch.device("cpu"))
    d, f = CPU_BENCH.hidden_size, CPU_BENCH.intermediate_size
    xs = {d: torch.randn(TOKENS, d), f: torch.randn(TOKENS, f)}
    ys = {d: torch.zeros(TOKENS, d), f: torch.zeros(TOKENS, f)}
    pools = {name: build(layout.ranks + [0] * (SLOTS - len(layout.ranks))) for name, layout in layouts.items()}
    times: dict[tuple[str, int, bool], list[float]] = {run: [] for run in runs}
    planned: dict[tuple[str, int, bool], list[lora_ops.Band]] = {}
    bandwidths = []
    try:
        for _ in range(args.rounds + 1):  # the first round warms up
            bandwidths.append(memory_bandwidth())
            for name, cost, ragged in runs:
                lora_ops.BAND_COST_ROWS = cost
                seconds, planned[(name, cost, ragged)] = lora_step(backend, pools[name], layouts[name], xs, ys, ragged)
                times[(name, cost, ragged)].append(seconds)
    finally:
        lora_ops.BAND_COST_ROWS = default
    bandwidth = statistics.median(bandwidths[1:])
    row_bytes = sum(d_in + d_out for d_in, d_out in CPU_BENCH.module_shapes().values()) * CPU_BENCH.num_hidden_layers * 4
    rows: list[dict[str, Any]] = []
    timed: dict[tuple[str, int, bool], tuple[float, float]] = {}  # run -> (LoRA ms, bytes floor ms)
    for run in runs:
        name, cost, ragged = run
        layout, bands = layouts[name], planned[run]
        ms = statistics.median(times[run][1:]) * 1e3
        floor = sum(layout.ranks) * row_bytes / bandwidth * 1e3
        timed[run] = (ms, floor)
        rows.append({
            "layout": name, "BAND_COST_ROWS": cost, "ragged bands": "yes" if ragged else "no",
            "ranks by slot": " ".join(map(str, layout.ranks)),
            "bands (count x rank)": " ".join(f"{b.count}x{b.rank}" for b in bands),
            "rows read": sum(b.count * b.rank for b in bands), "own rows": sum(layout.ranks), "LoRA ms": ms,
            "bytes floor ms": floor, "floor / measured": floor / ms,
        })
    sorted_run, placed_run = ("hetero sorted", default, True), ("hetero as placed", default, True)
    uniform = "uniform (4 adapters: 6, 3, 4, 3 tokens)"
    summary = {
        "memory bandwidth GB/s": bandwidth / 1e9,
        "hetero sorted / hetero as placed (time)": timed[sorted_run][0] / timed[placed_run][0],
        "uniform: ragged / equal-length bands (time)": timed[(uniform, default, True)][0] / timed[(uniform, default, False)][0],
        "hetero sorted: floor / measured": timed[sorted_run][1] / timed[sorted_run][0],
        "distinct: floor / measured": timed[("distinct", default, True)][1] / timed[("distinct", default, True)][0],
    }
    write("band_cost", f"LoRA ops of one decode step by slot layout — bench model, {SLOTS} slots, rank-{MAX_RANK} pool, {TOKENS} tokens",
          rows, list(rows[0]), summary, notes=f"{args.rounds} rounds after a warm-up, interleaved, medians; bytes floor = "
          f"the adapters' own rows (fp32 A and Bᵀ of every projection and layer) / memory bandwidth (torch copy, read + "
          f"write); command: python -m benchmarks.band_cost {' '.join(argv or [])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
