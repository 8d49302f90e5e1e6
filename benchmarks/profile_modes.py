"""Where a mode's decode step spends more than base's: torch profiler, op by op (and by shape
for the base layers' dequantize and matmul), the in-process engine, rounds interleaved.

    python -m benchmarks.profile_modes [--mode identical] [--name NAME]

16 decode streams on the bench model (d=1024, 8 layers, NF4), `--max-lora-rank 64`; `identical`
= every stream on one rank-16 adapter, `distinct` = 16 adapters. Prints and writes
benchmarks/results/<name>.md: per op, milliseconds a step for base and the mode and the
difference, the ops that differ most first. Between runs the host's noise is about ±20 ms a
step on this 2-core machine: compare differences within one run.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from benchmarks.models import CPU_BENCH, make_adapters, make_model
from benchmarks.report import RESULTS, environment
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams

BATCH = 16
SHAPED = ("aten::mm", "bitsandbytes::dequantize_4bit")  # the base layers' ops, split by shape


def profile_steps(engine: Engine, adapters: list[str | None], steps: int) -> dict[str, float]:
    """ms a decode step per op (and per shape for SHAPED), all BATCH requests decoding."""
    rng = random.Random(0)
    for i in range(BATCH):
        engine.add_request(
            None, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True), adapters[i % len(adapters)],
            prompt_token_ids=[rng.randrange(3, CPU_BENCH.vocab_size) for _ in range(64)],
        )
    while True:  # past the prefill and the adapter loads
        engine.step()
        engine.store.wait_idle()
        last = engine.last_step
        if last is not None and last.pure_decode and last.num_requests == BATCH:
            break
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    per_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        key = f"{event.key} {event.input_shapes[:2]}" if event.key in SHAPED else event.key
        per_op[key] += event.self_cpu_time_total / steps / 1e3
    return per_op


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["identical", "distinct"], default="identical")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="profiled rounds after a warm-up round (medians)")
    p.add_argument("--name", default=None, help="results file name (default: profile_<mode>)")
    args = p.parse_args(argv)
    path = make_model(CPU_BENCH)
    root, ids = make_adapters(CPU_BENCH, 16)
    engine = Engine(EngineConfig(
        model=ModelConfig(str(path)), cache=CacheConfig(num_blocks=1024),
        lora=LoraConfig(max_loras=16, max_lora_rank=64, adapter_roots=(str(root),)),
    ))
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    modes: dict[str, list[str | None]] = {"base": [None], args.mode: [ids[0]] if args.mode == "identical" else list(ids)}
    samples: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
    try:
        for rnd in range(args.rounds + 1):
            for mode, adapters in modes.items():
                per_op = profile_steps(engine, adapters, args.steps)
                if rnd > 0:
                    for op, value in per_op.items():
                        samples[mode][op].append(value)
    finally:
        engine.close()

    def ms(mode: str, op: str) -> float:
        values = samples[mode].get(op, [])
        return statistics.median(values) if values else 0.0

    ops = set(samples["base"]) | set(samples[args.mode])
    rows = sorted(((ms(args.mode, op) - ms("base", op), op) for op in ops), reverse=True)
    totals = {m: sum(ms(m, op) for op in ops) for m in modes}
    lines = [f"| op | base ms | {args.mode} ms | difference |", "|---|---|---|---|"]
    lines += [f"| `{op}` | {ms('base', op):.2f} | {ms(args.mode, op):.2f} | {diff:+.2f} |" for diff, op in rows[:14]]
    lines.append(f"| all ops | {totals['base']:.1f} | {totals[args.mode]:.1f} | {totals[args.mode] - totals['base']:+.1f} |")
    env = environment()
    name = args.name or f"profile_{args.mode}"
    text = (
        f"# Decode step op time, base vs {args.mode} — {CPU_BENCH.name}, batch {BATCH}, --max-lora-rank 64\n\n"
        f"{env['date']}, commit {env['commit']}, {env['cpu_threads']} threads; "
        f"{args.steps} steps a round, medians of {args.rounds} rounds after a warm-up; ms a step (self CPU time "
        f"of each op); command: python -m benchmarks.profile_modes {' '.join(argv or [])}\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
