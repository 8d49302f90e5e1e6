"""The LoRA part of one decode step alone, per slot layout: how much a band (one batched
matmul per projection) costs beside the rows it reads.

    python -m benchmarks.band_cost [--rounds 7]

The bench model's projections (d=1024, ffn 2816, 8 layers, every linear layer), a rank-64
slot pool of 16 slots, 16 decode tokens (one per slot), the torch LoRA backend on the CPU:

    distinct          16 adapters of rank 16 (one band)
    hetero as placed  ranks 4..64 in the order the benchmark loads them, where placement puts them
    hetero sorted     the same adapters after the store's exchanges (slots sorted by rank)
    all rank 64       16 adapters of rank 64 (one band)

and the sorted layout planned with other values of BAND_COST_ROWS. For each: the bands,
the rows of A and Bᵀ they read (zero padding included), the milliseconds of the step's LoRA
ops (median over interleaved rounds) and the time the adapters' own bytes take at the
measured memory bandwidth (the floor). Results: benchmarks/results/band_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.models import CPU_BENCH
from benchmarks.report import write
from benchmarks.server_bench import HETERO_RANKS
from benchmarks.serving import memory_bandwidth
from loraplex.lora import lora_ops
from loraplex.lora.lora_backend import PoolSlice, slot_views
from loraplex.lora.lora_ops import TorchLora
from loraplex.lora.slots import next_swap, placement

SLOTS, MAX_RANK, GROUPS = 16, 64, (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


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


def lora_step(backend: TorchLora, layers: list[dict[Any, Any]], ranks: list[int], xs: dict[int, torch.Tensor],
              ys: dict[int, torch.Tensor]) -> float:
    shapes = CPU_BENCH.module_shapes()
    start = time.perf_counter()
    batch = backend.prepare([(s, 1) for s in range(SLOTS)], ranks, MAX_RANK, SLOTS)
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
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--costs", default="16,32,64,128,256", help="BAND_COST_ROWS values tried on the sorted layout")
    args = p.parse_args(argv)
    hetero = placed([HETERO_RANKS[i % len(HETERO_RANKS)] for i in range(SLOTS)])
    layouts = {"distinct": [16] * SLOTS, "hetero as placed": hetero, "hetero sorted": sorted_by_exchanges(hetero),
               "all rank 64": [MAX_RANK] * SLOTS}
    default = lora_ops.BAND_COST_ROWS
    runs = [(name, default) for name in layouts]
    runs += [("hetero sorted", c) for c in map(int, args.costs.split(",")) if c != default]
    backend = TorchLora(torch.float32, torch.device("cpu"))
    d, f = CPU_BENCH.hidden_size, CPU_BENCH.intermediate_size
    xs = {d: torch.randn(SLOTS, d), f: torch.randn(SLOTS, f)}
    ys = {d: torch.zeros(SLOTS, d), f: torch.zeros(SLOTS, f)}
    pools = {name: build(ranks) for name, ranks in layouts.items()}
    times: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    bandwidths = []
    try:
        for _ in range(args.rounds + 1):  # the first round warms up
            bandwidths.append(memory_bandwidth())
            for name, cost in runs:
                lora_ops.BAND_COST_ROWS = cost
                times[(name, cost)].append(lora_step(backend, pools[name], layouts[name], xs, ys))
    finally:
        lora_ops.BAND_COST_ROWS = default
    bandwidth = statistics.median(bandwidths[1:])
    row_bytes = sum(d_in + d_out for d_in, d_out in CPU_BENCH.module_shapes().values()) * CPU_BENCH.num_hidden_layers * 4
    rows: list[dict[str, Any]] = []
    timed: dict[tuple[str, int], tuple[float, float]] = {}  # (layout, cost) -> (LoRA ms, bytes floor ms)
    for name, cost in runs:
        ranks = layouts[name]
        lora_ops.BAND_COST_ROWS = cost
        bands = lora_ops.plan_bands(backend.prepare([(s, 1) for s in range(SLOTS)], ranks, MAX_RANK, SLOTS).segments, True)
        lora_ops.BAND_COST_ROWS = default
        ms = statistics.median(times[(name, cost)][1:]) * 1e3
        floor = sum(ranks) * row_bytes / bandwidth * 1e3
        timed[(name, cost)] = (ms, floor)
        rows.append({
            "layout": name, "BAND_COST_ROWS": cost, "ranks by slot": " ".join(map(str, ranks)),
            "bands (count x rank)": " ".join(f"{b.count}x{b.rank}" for b in bands),
            "rows read": sum(b.count * b.rank for b in bands), "own rows": sum(ranks), "LoRA ms": ms,
            "bytes floor ms": floor, "floor / measured": floor / ms,
        })
    summary = {
        "memory bandwidth GB/s": bandwidth / 1e9,
        "hetero sorted / hetero as placed (time)": timed[("hetero sorted", default)][0] / timed[("hetero as placed", default)][0],
        "hetero sorted: floor / measured": timed[("hetero sorted", default)][1] / timed[("hetero sorted", default)][0],
        "distinct: floor / measured": timed[("distinct", default)][1] / timed[("distinct", default)][0],
    }
    write("band_cost", "LoRA ops of one decode step by slot layout — bench model, 16 slots, rank-64 pool, 16 tokens",
          rows, list(rows[0]), summary, notes=f"{args.rounds} rounds after a warm-up, interleaved, medians; bytes floor = "
          f"the adapters' own rows (fp32 A and Bᵀ of every projection and layer) / memory bandwidth (torch copy, read + "
          f"write); command: python -m benchmarks.band_cost {' '.join(argv or [])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
