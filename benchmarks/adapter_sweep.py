"""Adapter-count sweep: the same power-law workload with 5 and with 1,000 registered adapters.

S-LoRA's scenario: far more adapters than device slots, popularity following a power law.
Both runs happen in one process on one engine configuration (16 device slots, a host budget
of 64 adapters); the report gives both throughputs and their ratio (goal >= 0.9).

    python -m benchmarks.adapter_sweep [--model bench|small] [--counts 5 1000] [--requests 256]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks import harness, report
from benchmarks.models import ATTENTION, CPU_BENCH, SMALL, make_adapters, make_model
from benchmarks.workload import WorkloadSpec, generate
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex.engine.engine import Engine

TARGETS = ATTENTION[:1] + ATTENTION[2:3]  # q_proj, v_proj
GOAL = 0.9


def run_count(model_path: str, shape: Any, count: int, args: argparse.Namespace) -> tuple[harness.RunStats, dict[str, Any]]:
    root, ids = make_adapters(shape, count, rank=args.rank, targets=TARGETS, dtype=torch.float16)
    probe_bytes = args.rank * sum(shape.module_shapes()[t][0] + shape.module_shapes()[t][1] for t in TARGETS) * 4 * shape.num_hidden_layers
    engine = Engine(EngineConfig(
        model=ModelConfig(model_path),
        cache=CacheConfig(num_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=args.concurrency),
        lora=LoraConfig(max_loras=16, max_lora_rank=args.rank, max_host_adapter_bytes=64 * probe_bytes, adapter_roots=(str(root),)),
    ))
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    spec = WorkloadSpec(
        num_requests=args.requests, num_adapters=count, popularity="powerlaw", alpha=args.alpha,
        prompt_len=(32, 96), output_len=(16, 48), seed=1,
    )
    items = generate(spec, shape.vocab_size)
    harness.run(engine, generate(WorkloadSpec(num_requests=8, prompt_len=(32, 32), output_len=(4, 4)), shape.vocab_size), ids)
    stats = harness.run(engine, items, ids, concurrency=args.concurrency)
    snap = engine.store.snapshot()
    extra = {
        "distinct adapters used": len({it.adapter for it in items}),
        "host loads": snap.counters.get(("host", "loads"), 0),
        "device loads": snap.counters.get(("device", "loads"), 0),
        "device evictions": snap.counters.get(("device", "evictions"), 0),
        "mean adapters/step": sum(stats.adapters_per_step) / max(1, len(stats.adapters_per_step)),
        "mean requests/step": sum(stats.requests_per_step) / max(1, len(stats.requests_per_step)),
        "idle steps": stats.idle_steps,
    }
    engine.close()
    return stats, extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bench", "small"], default="bench")
    p.add_argument("--counts", type=int, nargs="+", default=[5, 1000])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--name", default="adapter_sweep")
    args = p.parse_args(argv)

    shape = CPU_BENCH if args.model == "bench" else SMALL
    model_path = str(make_model(shape))
    rows = []
    results = {}
    for count in args.counts:
        stats, extra = run_count(model_path, shape, count, args)
        results[count] = stats
        rows.append({"registered adapters": count, "tokens/s": stats.throughput, "decode tok/s": stats.decode_tps, **extra})
        print(f"  [{count} adapters] {stats.throughput:.1f} tok/s")
    low, high = min(args.counts), max(args.counts)
    ratio = results[high].throughput / results[low].throughput
    summary = {f"throughput {high} / {low} adapters (goal >= {GOAL})": ratio, "goal met": ratio >= GOAL}
    columns = ["registered adapters", "tokens/s", "decode tok/s", "distinct adapters used", "host loads", "device loads",
               "device evictions", "mean adapters/step", "mean requests/step", "idle steps"]
    report.write(args.name, f"adapter-count sweep — {shape.name}, power law alpha={args.alpha}, 16 device slots, rank {args.rank} q,v",
                 rows, columns, summary, plot=("registered adapters", "tokens/s"),
                 notes=f"{args.requests} requests, {args.concurrency} in flight (closed loop); command: python -m benchmarks.adapter_sweep "
                 + " ".join(argv or []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
