"""Adapter-count sweep: the same power-law workload with 5 and with 1,000 registered adapters.

S-LoRA's scenario: far more adapters than device slots, popularity following a power law.
Both run in one process with one engine configuration (16 device slots, a host budget of
64 adapters), taking turns round by round; the report gives both throughputs and the
median of the per-round ratios (goal >= 0.9).

    python -m benchmarks.adapter_sweep [--model bench|small] [--counts 5 1000] [--requests 256]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from benchmarks import harness, report
from benchmarks.models import ATTENTION, CPU_BENCH, SMALL, make_adapters, make_model
from benchmarks.workload import WorkloadSpec, generate
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex.engine.engine import Engine

TARGETS = ATTENTION[:1] + ATTENTION[2:3]  # q_proj, v_proj
GOAL = 0.9


def make_engine(model_path: str, shape: Any, count: int, args: argparse.Namespace) -> tuple[Engine, list[str]]:
    root, ids = make_adapters(shape, count, rank=args.rank, targets=TARGETS, dtype=torch.float16)
    one_adapter = args.rank * sum(sum(shape.module_shapes()[t]) for t in TARGETS) * 4 * shape.num_hidden_layers
    engine = Engine(EngineConfig(
        model=ModelConfig(model_path),
        cache=CacheConfig(num_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=args.concurrency),
        lora=LoraConfig(max_loras=16, max_lora_rank=args.rank, max_host_adapter_bytes=64 * one_adapter, adapter_roots=(str(root),)),
    ))
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    warm_up = generate(WorkloadSpec(num_requests=8, prompt_len=(32, 32), output_len=(4, 4)), shape.vocab_size)
    harness.run(engine, warm_up, ids)
    return engine, ids


def run_round(engine: Engine, ids: list[str], shape: Any, count: int, args: argparse.Namespace, seed: int) -> harness.RunStats:
    spec = WorkloadSpec(
        num_requests=args.requests, num_adapters=count, popularity="powerlaw", alpha=args.alpha,
        prompt_len=(32, 96), output_len=(16, 48), seed=seed,
    )
    return harness.run(engine, generate(spec, shape.vocab_size), ids, concurrency=args.concurrency)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bench", "small"], default="bench")
    p.add_argument("--counts", type=int, nargs="+", default=[5, 1000])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default="adapter_sweep")
    args = p.parse_args(argv)

    shape = CPU_BENCH if args.model == "bench" else SMALL
    model_path = str(make_model(shape))
    engines = {count: make_engine(model_path, shape, count, args) for count in args.counts}
    stats: dict[int, list[harness.RunStats]] = {count: [] for count in args.counts}
    for rnd in range(args.rounds):  # the counts take turns, so a slow spell of the machine hits both
        for count, (engine, ids) in engines.items():
            stats[count].append(run_round(engine, ids, shape, count, args, seed=rnd))
            print(f"  round {rnd} [{count} adapters] {stats[count][-1].throughput:.1f} tok/s")
    rows = []
    for count, (engine, _) in engines.items():
        snap = engine.stats().adapters
        merged = harness.RunStats()
        for s in stats[count]:
            merged.merge(s)
        rows.append({
            "registered adapters": count, "tokens/s": merged.throughput, "decode tok/s": merged.decode_tps,
            "host loads": snap.counters.get(("host", "loads"), 0), "device loads": snap.counters.get(("device", "loads"), 0),
            "device evictions": snap.counters.get(("device", "evictions"), 0),
            "mean adapters/step": statistics.fmean(merged.adapters_per_step or [0]),
            "mean requests/step": statistics.fmean(merged.requests_per_step or [0]), "idle steps": merged.idle_steps,
        })
        engine.close()
    low, high = min(args.counts), max(args.counts)
    ratios = [h.throughput / lo.throughput for h, lo in zip(stats[high], stats[low])]
    ratio = statistics.median(ratios)
    summary = {
        f"throughput {high} / {low} adapters, median of rounds (goal >= {GOAL})": ratio,
        "range over rounds": f"{min(ratios):.3f}-{max(ratios):.3f}",
        "goal met": ratio >= GOAL,
    }
    columns = ["registered adapters", "tokens/s", "decode tok/s", "host loads", "device loads",
               "device evictions", "mean adapters/step", "mean requests/step", "idle steps"]
    report.write(args.name, f"adapter-count sweep — {shape.name}, power law alpha={args.alpha}, 16 device slots, rank {args.rank} q,v",
                 rows, columns, summary, plot=("registered adapters", "tokens/s"),
                 notes=f"{args.requests} requests per round, {args.concurrency} in flight (closed loop), {args.rounds} rounds taking turns; command: python -m benchmarks.adapter_sweep "
                 + " ".join(argv or []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
