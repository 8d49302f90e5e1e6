"""Where a decode step's time goes: torch profiler tables for base-only and mixed-adapter steps.

    python -m benchmarks.profile_step [--model bench|small] [--adapters 16] [--steps 5]

Prints, for each mode, the ops by self time over `--steps` decode steps of a batch of 16,
and writes them to benchmarks/results/profile_step.md.
"""

from __future__ import annotations

import argparse
import random

from torch.profiler import ProfilerActivity, profile

from benchmarks.models import CPU_BENCH, SMALL, make_adapters, make_model
from benchmarks.report import RESULTS, environment
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams


def profile_mode(engine: Engine, adapters: list[str | None], vocab: int, steps: int, batch: int) -> str:
    rng = random.Random(0)
    for i in range(batch):
        engine.add_request(
            None, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True), adapters[i % len(adapters)],
            prompt_token_ids=[rng.randrange(3, vocab) for _ in range(64)],
        )
    while True:  # past the prefill and the adapter loads: every request decoding
        engine.step()
        engine.store.wait_idle()
        step = engine.last_step
        if step is not None and step.pure_decode and step.num_requests == batch:
            break
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return f"op time per step: {total_ms:.1f} ms\n\n```\n{table}\n```"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bench", "small"], default="bench")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    shape = CPU_BENCH if args.model == "bench" else SMALL
    path = make_model(shape)
    root, ids = make_adapters(shape, args.adapters)
    engine = Engine(EngineConfig(
        model=ModelConfig(str(path)), cache=CacheConfig(num_blocks=1024),
        lora=LoraConfig(max_loras=max(1, args.adapters), max_lora_rank=16, adapter_roots=(str(root),)),
    ))
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    sections = []
    modes: list[tuple[str, list[str | None]]] = [("base only", [None]), (f"{args.adapters} distinct adapters", list(ids))]
    for label, adapters in modes:
        text = profile_mode(engine, adapters, shape.vocab_size, args.steps, args.batch)
        print(f"\n== {label} ==\n{text}")
        sections.append(f"## {label}\n\n{text}\n")
    engine.close()
    env = environment()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_step.md").write_text(
        f"# Decode step profile — {shape.name}, batch {args.batch}\n\n{env['date']}, commit {env['commit']}, "
        f"{env['cpu_threads']} threads\n\n" + "\n".join(sections)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
