"""Which dtype the adapter slot pool should hold on this CPU: the LoRA ops of one decode step
with fp32 pools against bf16 pools (the performance issue's "a LoRA weight dtype that matches
the kernel's precision, measured, not assumed").

    python -m benchmarks.lora_dtype [--rounds 7]

The bench model's projections, 16 slots of a rank-64 pool, 16 decode tokens, the torch LoRA
backend: identical (1 rank-16 adapter), uniform (4, with 6 / 3 / 4 / 3 tokens) and distinct
(16). In the bf16 runs the activations and outputs are bf16 too, so the casts a bf16 pool
would add to an fp32 model are not counted: the bf16 figure is a lower bound. bf16 halves
the bytes read; whether it is faster depends on the CPU's bf16 matmul (AVX512-BF16 / AMX).
Results: benchmarks/results/lora_dtype.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from benchmarks.band_cost import GROUPS, SLOTS, TOKENS, Layout, build, lora_step
from benchmarks.models import CPU_BENCH
from benchmarks.report import write
from loraplex.lora.lora_backend import PoolSlice, slot_views
from loraplex.lora.lora_ops import TorchLora

LAYOUTS = {"identical": Layout([16], [TOKENS]), "uniform": Layout([16] * 4, [6, 3, 4, 3]), "distinct": Layout([16] * SLOTS)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def in_dtype(layers: list[dict[Any, Any]], dtype: torch.dtype) -> list[dict[Any, Any]]:
    """band_cost's pools cast to `dtype`, the per-projection views rebuilt over the cast pools."""
    out = []
    for layer in layers:
        cast: dict[Any, Any] = {}
        for group in GROUPS:
            pool = layer[group].to(dtype)
            cast[group] = pool
            for p, name in enumerate(group):
                b = layer[name].lora_b.to(dtype)
                ranks = [0 if v is None else v[1].shape[0] for v in layer[name].views]
                cast[name] = PoolSlice(pool[:, p], b, slot_views(pool[:, p], b, ranks))
        out.append(cast)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    d, f = CPU_BENCH.hidden_size, CPU_BENCH.intermediate_size
    runs: dict[tuple[str, str], Any] = {}
    for label, dtype in DTYPES.items():
        backend = TorchLora(dtype, torch.device("cpu"))
        xs = {d: torch.randn(TOKENS, d, dtype=dtype), f: torch.randn(TOKENS, f, dtype=dtype)}
        ys = {d: torch.zeros(TOKENS, d, dtype=dtype), f: torch.zeros(TOKENS, f, dtype=dtype)}
        for name, layout in LAYOUTS.items():
            pools = in_dtype(build(layout.ranks + [0] * (SLOTS - len(layout.ranks))), dtype)
            runs[(name, label)] = (backend, pools, layout, xs, ys)
    flush = torch.empty(64 << 18)  # 64 MiB, written between runs: each starts with cold caches, as in a model step
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for rnd in range(args.rounds + 1):  # the first round warms up
        for run, (backend, pools, layout, xs, ys) in runs.items():
            flush.add_(1.0)
            seconds, _ = lora_step(backend, pools, layout, xs, ys, True)
            if rnd:
                times[run].append(seconds * 1e3)
    rows = []
    for name in LAYOUTS:
        fp32, bf16 = (statistics.median(times[(name, label)]) for label in DTYPES)
        rows.append({"layout": name, "fp32 LoRA ms": fp32, "bf16 LoRA ms": bf16, "bf16 / fp32 (time)": bf16 / fp32})
    summary = {f"{r['layout']}: bf16 / fp32 (time)": r["bf16 / fp32 (time)"] for r in rows}
    write("lora_dtype", f"LoRA ops of one decode step, fp32 vs bf16 slot pools — bench model, {SLOTS} slots, rank-64 pool",
          rows, list(rows[0]), summary, notes=f"{args.rounds} rounds after a warm-up, interleaved, medians; bf16 runs with "
          f"bf16 activations (casts not counted); command: python -m benchmarks.lora_dtype {' '.join(argv or [])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
