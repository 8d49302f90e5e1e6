"""The user's view: a real `loraplex serve`, N concurrent streams through the client SDK.

    modes (N streams, closed loop)     adapters                           served by
    base                               none                               rank-64 server (and in process)
    identical / uniform / distinct     1 / 4 (random per request) / N     rank-64 server and own-rank server
                                       rank-16 all-linear adapters        (--max-lora-rank 16)
    heterogeneous                      N adapters of ranks 4..64 mixed    rank-64 server (= its own max rank)

Each round runs every (server, mode) once plus the in-process engine's base run. Each server
runs its own base before its modes, after every two of them and at the end, and a mode's
ratio is taken over the mean of the two base runs that bracket it: a slow spell of the shared
machine that lasts a minute or two hits a mode and its reference alike, and a drift across the
round cancels. Each server's modes are compared with its own base, so the rank-64 / rank-16
comparison is not one process's luck over another's. The in-process engine runs its base just
before the rank-64 server's first base run and again just after its last: the server / engine
ratio is the mean of the two adjacent pairs. The table gives medians
over rounds. Before each timed run, one short request per adapter of the mode puts its
adapters in device slots (loads are not what is measured). The warm-up round runs every
(server, mode) with a quarter of the new tokens.

Beside each measured ratio it prints the bytes limit: the ratio a decode step would reach
if its LoRA work cost only the time to stream the adapters' bytes at the machine's memory
bandwidth (a large torch copy, read + write):

    limit = base step / (base step + adapter bytes per step / bandwidth)

with the base step from the in-process engine's median decode step, and the adapter bytes
those of the mode's adapters at their own ranks (fp32, every adapter of the mode in every
step). The bandwidth is measured at each round, the median used.

Beside the wall-clock ratios it gives CPU-cost ratios: CPU time per generated token of the
server process and the client (this process) together, base's over the mode's, within a
round. On a machine shared with other work, wall-clock ratios wander (the neighbours' load
changes between runs) while CPU time per token moves much less; on a quiet machine that the
load saturates, the two agree. The in-process engine runs on a thread of its own, as the
server's engine loop does (harness.run_on_thread).

    python -m benchmarks.server_bench            # bench model (d=1024, 8 layers, NF4), 16 streams, ~15 min on a quiet 2-core machine
    python -m benchmarks.server_bench --quick    # tiny model, one round: a smoke run
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import harness, report
from benchmarks.models import CACHE, CPU_BENCH, TINY, ModelShape, adapter_bytes, make_adapter_set, make_model
from benchmarks.serving import Request, ServerProcess, cpu_seconds, memory_bandwidth, stream_load
from benchmarks.workload import WorkItem
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex.engine.engine import Engine

HETERO_RANKS = (4, 8, 16, 32, 64)
MODES = ("base", "identical", "uniform", "distinct", "heterogeneous")
GOALS = {"identical": 0.95, "uniform": 0.90, "distinct": 0.85}
LIMIT_GOAL = 0.90  # measured / bytes limit
OWN_RANK_GOAL = 0.95  # at --max-lora-rank 64 / at the adapters' own max rank
# heterogeneous / the same adapters at their own ranks, estimated from the distinct run of the
# round: a step's LoRA time per adapter byte as in distinct (one rank, one band)
HETERO_GOAL = 0.95
SERVER_GOAL = 0.95  # server base / in-process engine base


@dataclass(frozen=True)
class BenchSet:
    """The model and the modes' adapters, built on first use (bench model, or tiny with --quick)."""

    shape: ModelShape
    model_path: str
    root: Path  # the adapter root of both sets
    uniform: list[str]  # `streams` adapters of rank `rank`
    hetero: list[str]  # `streams` adapters of the ranks in `ranks`
    ranks: list[int]

    @classmethod
    def build(cls, quick: bool, streams: int, rank: int) -> BenchSet:
        shape = TINY if quick else CPU_BENCH
        ranks = [HETERO_RANKS[i % len(HETERO_RANKS)] for i in range(streams)]
        root, uniform = make_adapter_set(shape, "uniform", [rank] * streams)
        _, hetero = make_adapter_set(shape, "hetero", ranks)
        return cls(shape, str(make_model(shape)), root, uniform, hetero, ranks)


def mode_adapters(mode: str, uniform: list[str], hetero: list[str], streams: int) -> list[str]:
    return {"base": [], "identical": uniform[:1], "uniform": uniform[:4], "distinct": uniform[:streams],
            "heterogeneous": hetero[:streams]}[mode]


def plan(mode: str, adapters: list[str], args: argparse.Namespace, vocab: int, seed: int, new_tokens: int) -> list[list[Request]]:
    """One list of requests per stream: stream i uses adapter i (distinct, heterogeneous) or a random one."""
    rng = random.Random(seed)

    def adapter(stream: int) -> str | None:
        if not adapters:
            return None
        return rng.choice(adapters) if mode == "uniform" else adapters[stream % len(adapters)]

    return [
        [Request([rng.randrange(3, vocab) for _ in range(args.prompt_len)], adapter(i), new_tokens)
         for _ in range(args.requests)]
        for i in range(args.streams)
    ]


def warm(address: str, adapters: list[str], vocab: int) -> None:
    """One short request per adapter, all at once: the mode's adapters are in device slots after it."""
    if adapters:
        stream_load(address, [[Request([3 + i % (vocab - 3)] * 4, a, 2)] for i, a in enumerate(adapters)])


def engine_base(engine: Engine, args: argparse.Namespace, vocab: int, seed: int, new_tokens: int) -> tuple[float, float, float]:
    """(tokens/s, median decode step s, CPU s per token) of the base workload in process, closed loop of N."""
    items = [WorkItem(0.0, r.prompt_token_ids, r.max_new_tokens, None)
             for stream in plan("base", [], args, vocab, seed, new_tokens) for r in stream]
    cpu = cpu_seconds()
    stats = harness.run_on_thread(engine, items, [], concurrency=args.streams)
    return stats.throughput, stats.median_decode_step_ms / 1e3, (cpu_seconds() - cpu) / stats.total_tokens


def engine_round(engine: Engine, args: argparse.Namespace, vocab: int, seed: int, new_tokens: int, label: str) -> tuple[float, float, float]:
    """engine_base, printed: (tokens/s, CPU s per token, median decode step s)."""
    rate, step, per_token = engine_base(engine, args, vocab, seed, new_tokens)
    print(f"  {label} [engine   base         ] {rate:7.1f} tok/s, {per_token * 1e3:6.2f} CPU ms/token, decode step "
          f"{step * 1e3:.1f} ms", flush=True)
    return rate, per_token, step


def bracketed(modes: list[str]) -> list[str]:
    """A server's runs in a round: base, then two modes and base again, to the end."""
    order = ["base"]
    for i in range(0, len(modes), 2):
        order += [*modes[i : i + 2], "base"]
    return order


@dataclass
class Measured:
    """Per (server, mode), one value a round: tok/s, and the mode's tok/s and CPU cost over its base."""

    tps: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    vs_base: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    cost_vs_base: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))  # base CPU/token over the run's
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))  # CPU s per token
    base_step: list[float] = field(default_factory=list)
    bandwidths: list[float] = field(default_factory=list)

    def add_round(self, sequences: dict[str, list[tuple[str, float, float]]], engine: list[tuple[float, float]],
                  step: float, bandwidth: float) -> None:
        """sequences: per server, (mode, tok/s, CPU s per token) in the order run; engine: its two base runs
        (tok/s, CPU s per token), just before the rank-64 server's first base run and just after its last."""
        self.base_step.append(step)
        self.bandwidths.append(bandwidth)
        self.tps[("engine", "base")].append(statistics.fmean(e[0] for e in engine))
        self.cpu[("engine", "base")].append(statistics.fmean(e[1] for e in engine))
        for server, seq in sequences.items():
            bases = [i for i, (mode, _, _) in enumerate(seq) if mode == "base"]
            if server == "r64":  # each engine run with the server base run next to it
                pairs = list(zip((seq[bases[0]], seq[bases[-1]]), engine))
                self.vs_base[(server, "engine")].append(statistics.fmean(s[1] / e[0] for s, e in pairs))
                self.cost_vs_base[(server, "engine")].append(statistics.fmean(e[1] / s[2] for s, e in pairs))
            self.tps[(server, "base")].append(statistics.fmean(seq[i][1] for i in bases))
            self.cpu[(server, "base")].append(statistics.fmean(seq[i][2] for i in bases))
            for i, (mode, rate, per_token) in enumerate(seq):
                if mode == "base":
                    continue
                around = [seq[max(j for j in bases if j < i)], seq[min(j for j in bases if j > i)]]
                self.tps[(server, mode)].append(rate)
                self.cpu[(server, mode)].append(per_token)
                self.vs_base[(server, mode)].append(rate / statistics.fmean(b[1] for b in around))
                self.cost_vs_base[(server, mode)].append(statistics.fmean(b[2] for b in around) / per_token)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 round, few tokens: a smoke run")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests per stream, one after another")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="timed rounds, after one warm-up round")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="rank of the identical / uniform / distinct adapters")
    p.add_argument("--cpu-nf4-kernel", choices=["fused", "exact"], default="fused")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES) + " (base always runs)")
    p.add_argument("--name", default="server_bench")
    p.add_argument("--results", type=Path, default=None, help="default: benchmarks/results (.cache/bench/results with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.new_tokens, args.prompt_len = 1, 1, 8, 8
    if args.results is None:
        args.results = CACHE / "results" if args.quick else report.RESULTS
    bench = BenchSet.build(args.quick, args.streams, args.rank)
    shape, model_path, root, uniform, hetero, ranks = (
        bench.shape, bench.model_path, bench.root, bench.uniform, bench.hetero, bench.ranks)
    common = ["--model", model_path, "--adapter-root", str(root), "--max-loras", str(args.streams),
              "--max-num-seqs", str(args.streams), "--cpu-nf4-kernel", args.cpu_nf4_kernel, "--log-level", "info"]
    own_rank = args.rank  # the uniform adapters' own max rank; the heterogeneous ones' is max(ranks)
    servers = {"r64": ServerProcess([*common, "--max-lora-rank", str(args.max_lora_rank)], "r64")}
    if own_rank != args.max_lora_rank:
        servers["own"] = ServerProcess([*common, "--max-lora-rank", str(own_rank)], "own")
    modes = ["base", *(m for m in args.modes.split(",") if m in MODES and m != "base")]
    if unknown := [m for m in args.modes.split(",") if m not in MODES]:
        p.error(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    own_modes = [m for m in ("identical", "uniform", "distinct") if m in modes]
    order = {"r64": bracketed(modes[1:]), **{s: bracketed(own_modes) for s in servers if s != "r64"}}
    runs = [(s, m) for s, seq in order.items() for m in seq if m != "base"]
    print(f"[server_bench] {shape.name}, {args.streams} streams x {args.requests} requests, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, --max-lora-rank {args.max_lora_rank}")
    engine = Engine(EngineConfig(
        model=ModelConfig(model_path, cpu_nf4_kernel=args.cpu_nf4_kernel),
        cache=CacheConfig(num_blocks=max(256, args.streams * (args.prompt_len + args.new_tokens) // 16 + 2 * args.streams)),
        scheduler=SchedulerConfig(max_num_seqs=args.streams),
        lora=LoraConfig(max_loras=args.streams, max_lora_rank=args.max_lora_rank, adapter_roots=(str(root),)),
    ))
    m = Measured()
    try:
        addresses = {label: s.start() for label, s in servers.items()}
        for rnd in range(args.rounds + (0 if args.quick else 1)):  # round 0 warms up (not with --quick)
            timed = args.quick or rnd > 0
            seed = 100 + rnd
            new_tokens = args.new_tokens if timed else max(4, args.new_tokens // 4)
            bandwidth = memory_bandwidth()
            # before the rank-64 server's first base run, and again after its last
            engine_runs = [engine_round(engine, args, shape.vocab_size, seed, new_tokens, f"round {rnd}")]
            sequences: dict[str, list[tuple[str, float, float]]] = {}
            for server, seq in order.items():
                sequences[server] = []
                for mode in seq:
                    adapters = mode_adapters(mode, uniform, hetero, args.streams)
                    warm(addresses[server], adapters, shape.vocab_size)
                    pid = servers[server].pid
                    before = cpu_seconds(pid) + cpu_seconds()
                    result = stream_load(addresses[server], plan(mode, adapters, args, shape.vocab_size, seed, new_tokens))
                    cpu_per_token = (cpu_seconds(pid) + cpu_seconds() - before) / result.tokens
                    sequences[server].append((mode, result.tokens_per_s, cpu_per_token))
                    print(f"  round {rnd} [{server:8s} {mode:13s}] {result.tokens_per_s:7.1f} tok/s, "
                          f"{cpu_per_token * 1e3:6.2f} CPU ms/token", flush=True)
                if server == "r64":
                    engine_runs.append(engine_round(engine, args, shape.vocab_size, seed, new_tokens, f"round {rnd}"))
            print(f"  round {rnd} memory bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
            if timed:
                m.add_round(sequences, [(r, c) for r, c, _ in engine_runs], statistics.fmean(s for _, _, s in engine_runs), bandwidth)
    finally:
        for s in servers.values():
            s.stop()
        engine.close()

    bandwidth = statistics.median(m.bandwidths)
    rows, summary = results(args, shape, runs, m, bandwidth, uniform, hetero, ranks)
    columns = ["run", "max-lora-rank", "adapters", "tok/s", "vs base", "range", "adapter MB/step", "bytes limit",
               "vs limit", "vs own-rank server", "CPU ms/token", "CPU cost: base / run"]
    report.write(
        args.name, f"through the server — {shape.name}, {args.streams} streams, --max-lora-rank {args.max_lora_rank}",
        rows, columns, summary, plot=("run", "tok/s"), results=args.results,
        notes=f"{args.streams} SDK streams (AsyncClient), each {args.requests} requests of prompt {args.prompt_len} + "
              f"{args.new_tokens} new tokens, one after another; {args.rounds} rounds after a warm-up round; each mode over the "
              f"mean of its server's two base runs that bracket it (base, 2 modes, base, ...), median over rounds (range = min-max); CPU ms/token = server process + client process; memory "
              f"bandwidth {bandwidth / 1e9:.1f} GB/s (torch copy, read + write, median of rounds); bytes limit = base step / (base step + adapter bytes / bandwidth), base step "
              f"{statistics.median(m.base_step) * 1e3:.1f} ms (in process); heterogeneous ranks {ranks}; CPU NF4 kernel "
              f"{args.cpu_nf4_kernel}; command: python -m benchmarks.server_bench {' '.join(argv or [])}",
    )
    return 0


def results(
    args: argparse.Namespace, shape: Any, runs: list[tuple[str, str]], m: Measured, bandwidth: float, uniform: list[str],
    hetero: list[str], ranks: list[int],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    step = statistics.median(m.base_step)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    mode_bytes = {
        "base": 0, "identical": adapter_bytes(shape, args.rank), "uniform": 4 * adapter_bytes(shape, args.rank),
        "distinct": args.streams * adapter_bytes(shape, args.rank), "heterogeneous": sum(adapter_bytes(shape, r) for r in ranks),
    }
    rows.append({"run": "in-process engine base", "max-lora-rank": args.max_lora_rank, "adapters": 0,
                 "tok/s": statistics.median(m.tps[("engine", "base")]),
                 "CPU ms/token": statistics.median(m.cpu[("engine", "base")]) * 1e3})
    rows.append({"run": "server base", "max-lora-rank": args.max_lora_rank, "adapters": 0,
                 "tok/s": statistics.median(m.tps[("r64", "base")]), "vs base": 1.0, "adapter MB/step": 0.0,
                 "bytes limit": 1.0, "vs limit": 1.0, "CPU ms/token": statistics.median(m.cpu[("r64", "base")]) * 1e3,
                 "CPU cost: base / run": 1.0})
    for server, mode in runs:
        r = m.vs_base[(server, mode)]
        limit = step / (step + mode_bytes[mode] / bandwidth)
        row: dict[str, Any] = {
            "run": f"server {mode}", "max-lora-rank": args.max_lora_rank if server == "r64" else args.rank,
            "adapters": len(mode_adapters(mode, uniform, hetero, args.streams)), "tok/s": statistics.median(m.tps[(server, mode)]),
            "vs base": statistics.median(r), "range": f"{min(r):.2f}-{max(r):.2f}", "adapter MB/step": mode_bytes[mode] / 1e6,
            "bytes limit": limit, "vs limit": statistics.median(r) / limit,
            "CPU ms/token": statistics.median(m.cpu[(server, mode)]) * 1e3,
            "CPU cost: base / run": statistics.median(m.cost_vs_base[(server, mode)]),
        }
        if server == "r64" and ("own", mode) in m.vs_base:  # each over its own server's base
            row["vs own-rank server"] = statistics.median(a / b for a, b in zip(r, m.vs_base[("own", mode)]))
        rows.append(row)
        if server != "r64":
            row["run"] += f" (--max-lora-rank {args.rank})"
            continue
        if mode in GOALS:
            summary[f"{mode} / base (goal >= {GOALS[mode]})"] = row["vs base"]
            summary[f"{mode} / base, CPU cost"] = row["CPU cost: base / run"]
        # heterogeneous has its own goal (below): its cost against the same adapters at their own ranks
        summary[f"{mode} / bytes limit" + ("" if mode == "heterogeneous" else f" (goal >= {LIMIT_GOAL})")] = row["vs limit"]
        if "vs own-rank server" in row:
            summary[f"{mode}: rank-64 server / rank-{args.rank} server (goal >= {OWN_RANK_GOAL})"] = row["vs own-rank server"]
    if ("r64", "heterogeneous") in m.vs_base and ("r64", "distinct") in m.vs_base:
        per_byte = mode_bytes["heterogeneous"] / mode_bytes["distinct"]
        # the ratio predicted for the heterogeneous adapters' bytes at distinct's LoRA time per byte, round by round
        own = [1 / (1 + (1 / d - 1) * per_byte) for d in m.vs_base[("r64", "distinct")]]
        h = statistics.median(h / o for h, o in zip(m.vs_base[("r64", "heterogeneous")], own))
        summary[f"heterogeneous / same bytes at distinct's cost per byte (goal >= {HETERO_GOAL})"] = h
    summary[f"server base / in-process engine base (goal >= {SERVER_GOAL})"] = statistics.median(m.vs_base[("r64", "engine")])
    summary["server base / in-process engine base, CPU cost"] = statistics.median(m.cost_vs_base[("r64", "engine")])
    summary["memory bandwidth GB/s"] = bandwidth / 1e9
    summary["base decode step ms (in process)"] = step * 1e3
    summary["goals met"] = all(
        v >= float(k.rsplit(">= ", 1)[1].rstrip(")")) for k, v in summary.items() if "goal >=" in k
    )
    return rows, summary


if __name__ == "__main__":
    raise SystemExit(main())
