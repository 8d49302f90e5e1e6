"""What the LoRA work of a decode step costs in the engine, measured step by step.

    python -m benchmarks.step_cost [--rounds 3] [--pairs 20]
    python -m benchmarks.step_cost --quick        # tiny model, one round: a smoke run
    python -m benchmarks.step_cost --cold         # small torch calls back to back vs after a 64 MB read

The in-process engine (bench model d=1024 × 8 layers NF4, `--max-lora-rank 64`) decodes 16
requests of one mode (identical / uniform / distinct / heterogeneous, as in server_bench), and
its LoRA backend is switched off and on between steps: off, on, off, on, ..., off. Off, the
step's batch is empty and the base model alone runs (the requests keep their adapters; the
tokens of that step are the base's, which does not change what a step costs). Each step with
LoRA is compared with the mean of the two steps without it on either side, a second apart:
this host's slow spells last a minute or more and move a whole run by up to 15%, but hit
three adjacent steps alike. Medians over every pair of every round. (A step that opens a
new KV block for every request, one in 16, falls on steps of one parity within a run; the
median over the pairs keeps it from moving the figure.)

It gives the LoRA work's cost in milliseconds a step, in situ: its matmuls, the Python that
feeds them and the cache misses that each small op takes after the base's NF4 matmuls have
streamed megabytes through the caches (none of which a micro-benchmark of the LoRA ops alone,
such as band_cost, sees), and the step ratio it implies, base step / (base step + cost), next
to the bytes limit (base step / (base step + adapter bytes / memory bandwidth)).
Results: benchmarks/results/<name>.{md,json}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.models import CACHE, adapter_bytes
from benchmarks.server_bench import BenchSet, mode_adapters
from benchmarks.serving import memory_bandwidth
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams
from loraplex.lora.lora_backend import LoraBackend, LoraBatch

MODES = ("identical", "uniform", "distinct", "heterogeneous")


class Switch:
    """The engine's LoRA backend with an off switch: off, `prepare` hands the step an empty
    batch, and the LoRA layers add nothing. The backend's own methods are bound once, so the
    switch adds no call to the path it measures."""

    def __init__(self, backend: LoraBackend[Any]) -> None:
        self.backend = backend
        self.name = backend.name
        self.on = True
        self.shrink = backend.shrink
        self.shrink_multi = backend.shrink_multi
        self.expand = backend.expand

    def prepare(self, token_runs: list[tuple[int, int]], slot_ranks: list[int], max_rank: int, num_tokens: int) -> LoraBatch:
        if self.on:
            return self.backend.prepare(token_runs, slot_ranks, max_rank, num_tokens)
        return LoraBatch(num_tokens=num_tokens)


def paired_costs(steps: Sequence[tuple[bool, float]]) -> tuple[list[float], list[float]]:
    """(each LoRA step minus the mean of the steps without LoRA on either side, those means)
    from (LoRA on, seconds) in the order run; an on step without an off step on both sides is
    left out."""
    costs, bases = [], []
    for i in range(1, len(steps) - 1):
        (before_on, before), (on, step), (after_on, after) = steps[i - 1], steps[i], steps[i + 1]
        if on and not before_on and not after_on:
            base = (before + after) / 2
            costs.append(step - base)
            bases.append(base)
    return costs, bases


def run_mode(engine: Engine, switch: Switch, adapters: list[str], streams: int, prompt_len: int, pairs: int,
             vocab: int, seed: int) -> list[tuple[bool, float]]:
    """Decode `streams` requests of the mode, switching LoRA off and on between steps once all
    of them decode; (LoRA on, seconds) of each step, in order."""
    rng = random.Random(seed)
    for i in range(streams):
        adapter = rng.choice(adapters) if len(adapters) == 4 else adapters[i % len(adapters)]  # uniform: random of 4
        engine.add_request(None, SamplingParams(max_new_tokens=2 * pairs + 16, ignore_eos=True), adapter,
                           prompt_token_ids=[rng.randrange(3, vocab) for _ in range(prompt_len)])
    switch.on = True
    while True:  # prefill, adapter loads: until every request decodes
        engine.step()
        engine.store.wait_idle()
        last = engine.last_step
        if last is not None and last.pure_decode and last.num_requests == streams:
            break
    steps = []
    for k in range(2 * pairs + 1):
        switch.on = k % 2 == 1
        start = time.perf_counter()
        engine.step()
        steps.append((switch.on, time.perf_counter() - start))
    switch.on = True
    while engine.has_unfinished():
        engine.step()
    return steps


def cold_calls(trials: int = 100) -> list[dict[str, Any]]:
    """Microseconds of small torch calls back to back and right after a 64 MB read (the state a
    LoRA call finds between the base's matmuls): median over `trials`."""
    flush = torch.ones(16 * 2**20)
    x, a, small, y16 = torch.randn(16, 1024), torch.randn(16, 1024), torch.randn(16, 16), torch.randn(4096)
    calls = {
        "16x16 matmul": lambda: torch.mm(small, small),
        "[16, 1024] @ [1024, 16] matmul": lambda: torch.mm(x, a.t()),
        "sum of 16 KB": lambda: y16.sum(),
    }
    rows = []
    for name, call in calls.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(trials):
            for cold in (False, True):
                if cold:
                    flush.sum()
                else:
                    call()
                start = time.perf_counter()
                call()
                times[cold].append(time.perf_counter() - start)
        rows.append({"call": name, "back to back us": round(statistics.median(times[False]) * 1e6, 1),
                     "after a 64 MB read us": round(statistics.median(times[True]) * 1e6, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cold", action="store_true", help="only time small torch calls warm and after a 64 MB read")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 round, few pairs: a smoke run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every mode, after a warm-up round")
    p.add_argument("--pairs", type=int, default=20, help="steps with LoRA per mode and round")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="rank of the identical / uniform / distinct adapters")
    p.add_argument("--cpu-nf4-kernel", choices=["fused", "exact"], default="fused")
    p.add_argument("--name", default="step_cost")
    p.add_argument("--results", type=Path, default=None, help="default: benchmarks/results (.cache/bench/results with --quick)")
    args = p.parse_args(argv)
    if args.cold:
        report.write(f"{args.name}_cold", "Small torch calls, back to back and after a 64 MB read", cold_calls(),
                     ["call", "back to back us", "after a 64 MB read us"], {},
                     notes="median of 100; command: python -m benchmarks.step_cost --cold",
                     results=args.results or report.RESULTS)
        return 0
    if args.quick:
        args.rounds, args.pairs, args.prompt_len = 1, 3, 8
    if args.results is None:
        args.results = CACHE / "results" if args.quick else report.RESULTS
    bench = BenchSet.build(args.quick, args.streams, args.rank)
    shape, uniform, hetero, ranks = bench.shape, bench.uniform, bench.hetero, bench.ranks
    engine = Engine(EngineConfig(
        model=ModelConfig(bench.model_path, cpu_nf4_kernel=args.cpu_nf4_kernel),
        cache=CacheConfig(num_blocks=max(256, args.streams * (args.prompt_len + 2 * args.pairs + 16) // 16 + 2 * args.streams)),
        scheduler=SchedulerConfig(max_num_seqs=args.streams),
        lora=LoraConfig(max_loras=args.streams, max_lora_rank=args.max_lora_rank, adapter_roots=(str(bench.root),)),
    ))
    try:
        for adapter in uniform + hetero:
            engine.register_adapter(adapter, adapter)
        switch = Switch(engine.lora.context.backend)
        engine.lora.context.backend = switch
        print(f"[step_cost] {shape.name}, {args.streams} requests, --max-lora-rank {args.max_lora_rank}, "
              f"{args.pairs} steps with LoRA per mode and round, {args.rounds} rounds after a warm-up", flush=True)
        measured: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in MODES}
        bandwidths = []
        for rnd in range(args.rounds + 1):
            bandwidths.append(memory_bandwidth())
            for i, mode in enumerate(MODES):
                adapters = mode_adapters(mode, uniform, hetero, args.streams)
                steps = run_mode(engine, switch, adapters, args.streams, args.prompt_len,
                                 args.pairs if rnd else max(2, args.pairs // 4), shape.vocab_size, 100 * rnd + i)
                costs, bases = paired_costs(steps)
                print(f"  round {rnd} [{mode:13s}] base step {statistics.median(bases) * 1e3:6.1f} ms, "
                      f"LoRA {statistics.median(costs) * 1e3:+6.1f} ms", flush=True)
                if rnd:
                    measured[mode][0].extend(costs)
                    measured[mode][1].extend(bases)
    finally:
        engine.close()
    bandwidth = statistics.median(bandwidths[1:] or bandwidths)
    rows, summary = [], {}
    for mode in MODES:
        costs, bases = measured[mode] if args.rounds else ([0.0], [1.0])
        cost, base = statistics.median(costs), statistics.median(bases)
        ids = mode_adapters(mode, uniform, hetero, args.streams)
        nbytes = sum(adapter_bytes(shape, ranks[i] if mode == "heterogeneous" else args.rank) for i in range(len(ids)))
        floor = nbytes / bandwidth
        rows.append({
            "mode": mode, "adapters": len(ids), "base step ms": round(base * 1e3, 1), "LoRA ms a step": round(cost * 1e3, 2),
            "LoRA ms, 25-75%": f"{statistics.quantiles(costs, n=4)[0] * 1e3:.1f} - {statistics.quantiles(costs, n=4)[2] * 1e3:.1f}"
            if len(costs) > 1 else "",
            "step ratio": round(base / (base + cost), 3), "adapter MB/step": round(nbytes / 1e6, 1),
            "bytes floor ms": round(floor * 1e3, 2), "bytes limit": round(base / (base + floor), 3),
            "pairs": len(costs),
        })
        summary[f"{mode}: step ratio"] = base / (base + cost)
    summary["memory bandwidth GB/s"] = bandwidth / 1e9
    columns = ["mode", "adapters", "base step ms", "LoRA ms a step", "LoRA ms, 25-75%", "step ratio", "adapter MB/step",
               "bytes floor ms", "bytes limit", "pairs"]
    notes = (f"{args.streams} decoding requests (prompt {args.prompt_len}) per mode, LoRA switched off and on between "
             f"steps; each step with LoRA against the mean of the two steps without it around it; medians over "
             f"{args.rounds} rounds of {args.pairs} such steps per mode, after a warm-up round; step ratio = base step / "
             f"(base step + LoRA ms); bytes limit as in server_bench, memory bandwidth {bandwidth / 1e9:.1f} GB/s; "
             f"CPU NF4 kernel {args.cpu_nf4_kernel}; command: python -m benchmarks.step_cost "
             + " ".join(sys.argv[1:] if argv is None else argv))
    report.write(args.name, f"LoRA cost of a decode step, in the engine, step by step — {shape.name}, {args.streams} requests, "
                 f"--max-lora-rank {args.max_lora_rank}", rows, columns, summary, notes=notes, results=args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
