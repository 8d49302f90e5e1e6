"""Prefix caching on vs off, one run: 16 adapters, each with its own long system prompt.

Each request is one adapter's system prompt (512 tokens by default, fixed per adapter) plus
a short user turn of its own, for an adapter drawn by a power law (a few tenants are busy).
Two engines with the same settings, `--prefix-caching` on and off, run the same requests
in turn, round by round (the order alternates), closed loop with `--concurrency` in flight:

    TTFT (arrival at the engine to first token) p50 and p95, generated tokens/s, and the
    cache's hit rate (prompt tokens found cached / prompt tokens looked up).

Before the rounds, each engine serves one request per adapter (its system prompt and a user
turn of its own, not measured): the steady state of a server whose tenants have each been
seen once. With the cache on, the rounds' hits are then the system prompts; a system prompt
evicted for lack of KV space is a miss, as it would be in service.

Ratios are taken within a round (so a slow spell of the machine hits both) and the report
gives their median over rounds. The machine's load average is printed with the results.
Each round drives its engine from a thread of its own, as the server's engine loop does
(benchmarks/harness.py says why that matters to torch on a shared CPU).

    python -m benchmarks.prefix_bench                  # the small model (hidden 256, 4 layers): a few minutes on 2 cores
    python -m benchmarks.prefix_bench --model bench    # the bench model: hidden 1024, 8 layers (much longer on a CPU)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import harness, report
from benchmarks.models import ALL_LINEAR, CPU_BENCH, SMALL, make_adapters, make_model
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams

NUM_ADAPTERS = 16
GOAL_TTFT = 3.0  # TTFT p50 off / on


@dataclass(frozen=True)
class Item:
    adapter: int
    prompt: list[int]
    max_new_tokens: int


@dataclass
class RoundStats:
    ttft_s: list[float] = field(default_factory=list)
    generated: int = 0
    wall_s: float = 0.0
    queried: int = 0
    hit: int = 0

    @property
    def throughput(self) -> float:
        return self.generated / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        return _percentile(self.ttft_s, q)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def workload(args: argparse.Namespace, vocab: int, seed: int) -> list[Item]:
    """The round's requests; the system prompts are the same in every round (seeded by adapter)."""
    systems = _system_prompts(args, vocab)
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** args.alpha for k in range(NUM_ADAPTERS)]
    items = []
    for k in rng.choices(range(NUM_ADAPTERS), weights, k=args.requests):
        user = [rng.randrange(3, vocab) for _ in range(rng.randint(*args.user_len))]
        items.append(Item(k, systems[k] + user, rng.randint(*args.new_tokens)))
    return items


def _system_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """Adapter k's system prompt, the same in every round."""
    return [random.Random(10_000 + k).choices(range(3, vocab), k=args.system_len) for k in range(NUM_ADAPTERS)]


def make_engine(model_path: str, root: Path, ids: list[str], args: argparse.Namespace, prefix_caching: bool) -> Engine:
    engine = Engine(EngineConfig(
        model=ModelConfig(model_path),
        cache=CacheConfig(num_blocks=args.num_blocks, prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.concurrency),
        lora=LoraConfig(max_loras=NUM_ADAPTERS, max_lora_rank=16, adapter_roots=(str(root),)),
    ))
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    engine.generate([[5, 6, 7, 8]] * 2, SamplingParams(max_new_tokens=2), [ids[0], None])  # warm-up
    return engine


def warm_up(engine: Engine, ids: list[str], args: argparse.Namespace, vocab: int) -> None:
    """One unmeasured request per adapter: its system prompt and a user turn no round uses."""
    systems = _system_prompts(args, vocab)
    user = [3] * args.user_len[0]
    prompts = [systems[k] + user for k in range(NUM_ADAPTERS)]
    engine.generate(prompts, SamplingParams(max_new_tokens=1), ids)


def run_round(engine: Engine, ids: list[str], items: list[Item], concurrency: int) -> RoundStats:
    """_run_round on a thread of its own (as the server's engine loop), joined before returning."""
    return harness.on_thread(lambda: _run_round(engine, ids, items, concurrency))


def _run_round(engine: Engine, ids: list[str], items: list[Item], concurrency: int) -> RoundStats:
    """Closed loop: at most `concurrency` requests in the engine; TTFT from each request's usage."""
    stats = RoundStats()
    before = engine.stats().prefix_cache
    queue = list(items)
    in_flight = 0
    start = time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and in_flight < concurrency:
            it = queue.pop(0)
            params = SamplingParams(max_new_tokens=it.max_new_tokens, ignore_eos=True)
            engine.add_request(None, params, ids[it.adapter], prompt_token_ids=it.prompt)
            in_flight += 1
        outputs = engine.step()
        if not outputs and not engine.last_step.num_requests:  # type: ignore[union-attr]
            engine.wait_for_work(0.002)  # an adapter is loading
        for out in outputs:
            stats.generated += len(out.new_token_ids)
            if out.finished:
                in_flight -= 1
                if out.error is not None:
                    raise RuntimeError(out.error)
                assert out.usage is not None and out.usage.time_to_first_token_s is not None
                stats.ttft_s.append(out.usage.time_to_first_token_s)
    stats.wall_s = time.perf_counter() - start
    after = engine.stats().prefix_cache
    stats.queried = after.queried_tokens - before.queried_tokens
    stats.hit = after.hit_tokens - before.hit_tokens
    return stats


def _plot(path: Path, title: str, on: RoundStats, off: RoundStats) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib missing: no PNG)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.6))
    labels, x = ["p50", "p95"], [0, 1]
    left.bar([i - 0.2 for i in x], [off.pct(0.5) * 1e3, off.pct(0.95) * 1e3], 0.4, label="cache off", color="#c44e52")
    left.bar([i + 0.2 for i in x], [on.pct(0.5) * 1e3, on.pct(0.95) * 1e3], 0.4, label="cache on", color="#4c72b0")
    left.set_xticks(x, labels)
    left.set_ylabel("TTFT ms")
    left.legend()
    right.bar(["cache off", "cache on"], [off.throughput, on.throughput], color=["#c44e52", "#4c72b0"])
    right.set_ylabel("generated tokens/s")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bench", "small"], default="small")
    p.add_argument("--requests", type=int, default=48, help="per round and configuration")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    p.add_argument("--system-len", type=int, default=512)
    p.add_argument("--user-len", type=int, nargs=2, default=[16, 48])
    p.add_argument("--new-tokens", type=int, nargs=2, default=[16, 32])
    p.add_argument("--num-blocks", type=int, default=1024, help="KV blocks of 16 tokens per engine")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a shared machine")
    p.add_argument("--name", default="prefix_bench")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # spin-waiting OpenMP threads crawl on a CPU shared with other jobs

    shape = CPU_BENCH if args.model == "bench" else SMALL
    model_path = str(make_model(shape))
    root, ids = make_adapters(shape, NUM_ADAPTERS, rank=16, targets=ALL_LINEAR)
    load_before = os.getloadavg()
    engines = {on: make_engine(model_path, root, ids, args, on) for on in (True, False)}
    for engine in engines.values():
        warm_up(engine, ids, args, shape.vocab_size)
    rounds: dict[bool, list[RoundStats]] = {True: [], False: []}
    for rnd in range(args.rounds):
        items = workload(args, shape.vocab_size, seed=rnd)
        for on in (True, False) if rnd % 2 == 0 else (False, True):  # alternate who goes first
            rounds[on].append(run_round(engines[on], ids, items, args.concurrency))
            s = rounds[on][-1]
            print(f"  round {rnd} cache {'on ' if on else 'off'}: TTFT p50 {s.pct(0.5) * 1e3:.0f} ms, "
                  f"p95 {s.pct(0.95) * 1e3:.0f} ms, {s.throughput:.1f} tok/s, hits {s.hit}/{s.queried} tokens")
    load_after = os.getloadavg()
    for engine in engines.values():
        engine.close()

    merged = {on: RoundStats() for on in (True, False)}
    for on, stats in rounds.items():
        for s in stats:
            m = merged[on]
            m.ttft_s += s.ttft_s
            m.generated += s.generated
            m.wall_s += s.wall_s
            m.queried += s.queried
            m.hit += s.hit
    ttft_ratio = statistics.median(off.pct(0.5) / on.pct(0.5) for on, off in zip(rounds[True], rounds[False]))
    p95_ratio = statistics.median(off.pct(0.95) / on.pct(0.95) for on, off in zip(rounds[True], rounds[False]))
    tput_ratio = statistics.median(on.throughput / off.throughput for on, off in zip(rounds[True], rounds[False]))
    rows = [
        {
            "prefix cache": "on" if on else "off", "requests": len(m.ttft_s),
            "TTFT p50 ms": m.pct(0.5) * 1e3, "TTFT p95 ms": m.pct(0.95) * 1e3, "generated tok/s": m.throughput,
            "hit rate": m.hit / m.queried if m.queried else 0.0,
        }
        for on, m in merged.items()
    ]
    summary = {
        f"TTFT p50 off / on, median of rounds (goal >= {GOAL_TTFT})": ttft_ratio,
        "TTFT p95 off / on, median of rounds": p95_ratio,
        "throughput on / off, median of rounds (goal >= 1)": tput_ratio,
        "hit rate with the cache (prompt tokens)": merged[True].hit / max(1, merged[True].queried),
        "goal met": ttft_ratio >= GOAL_TTFT and tput_ratio >= 1.0,
        "load average before / after (1 min)": f"{load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs",
    }
    title = (f"prefix caching on vs off — {shape.name}, {NUM_ADAPTERS} adapters r=16 all-linear, "
             f"{args.system_len}-token system prompts, power law alpha={args.alpha}")
    columns = ["prefix cache", "requests", "TTFT p50 ms", "TTFT p95 ms", "generated tok/s", "hit rate"]
    out = report.write(
        args.name, title, rows, columns, summary,
        notes=(f"{args.requests} requests per round and configuration, user turns {args.user_len[0]}-{args.user_len[1]} "
               f"tokens, {args.new_tokens[0]}-{args.new_tokens[1]} new tokens, {args.concurrency} in flight (closed loop), "
               f"{args.rounds} rounds alternating which configuration goes first, after one unmeasured request per adapter "
               f"(the steady state: every tenant seen once); model {shape.name}"
               + (" (small, to run on 2 CPU cores in minutes: the ratios are the result, not the times)" if shape is SMALL else "")
               + "; TTFT = arrival at the engine to first "
               f"token; {torch.get_num_threads()} torch threads; command: python -m benchmarks.prefix_bench "
               + " ".join(argv if argv is not None else sys.argv[1:])),
    )
    _plot(out.with_suffix(".png"), title, merged[True], merged[False])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
