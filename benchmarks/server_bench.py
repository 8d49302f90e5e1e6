"""The user's view: a real `loraplex serve`, N concurrent streams through the client SDK.

    modes (N streams, closed loop)     adapters                           served by
    base                               none                               rank-64 server (and in process)
    identical / uniform / distinct     1 / 4 (random per request) / N     rank-64 server and own-rank server
                                       rank-16 all-linear adapters        (--max-lora-rank 16)
    heterogeneous                      N adapters of ranks 4..64 mixed    rank-64 server (= its own max rank)

Each round runs every (server, mode) once, in turn, plus the in-process engine's base run;
ratios are taken within a round (a slow spell of the shared machine hits both sides) and the
table gives medians over rounds. Before each timed run, one short request per adapter of
the mode puts its adapters in device slots (loads are not what is measured).

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
from pathlib import Path
from typing import Any

from benchmarks import harness, report
from benchmarks.models import CACHE, CPU_BENCH, TINY, adapter_bytes, make_adapter_set, make_model
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


def mode_adapters(mode: str, uniform: list[str], hetero: list[str], streams: int) -> list[str]:
    return {"base": [], "identical": uniform[:1], "uniform": uniform[:4], "distinct": uniform[:streams],
            "heterogeneous": hetero[:streams]}[mode]


def plan(mode: str, adapters: list[str], args: argparse.Namespace, vocab: int, seed: int) -> list[list[Request]]:
    """One list of requests per stream: stream i uses adapter i (distinct, heterogeneous) or a random one."""
    rng = random.Random(seed)

    def adapter(stream: int) -> str | None:
        if not adapters:
            return None
        return rng.choice(adapters) if mode == "uniform" else adapters[stream % len(adapters)]

    return [
        [Request([rng.randrange(3, vocab) for _ in range(args.prompt_len)], adapter(i), args.new_tokens)
         for _ in range(args.requests)]
        for i in range(args.streams)
    ]


def warm(address: str, adapters: list[str], vocab: int) -> None:
    """One short request per adapter, all at once: the mode's adapters are in device slots after it."""
    if adapters:
        stream_load(address, [[Request([3 + i % (vocab - 3)] * 4, a, 2)] for i, a in enumerate(adapters)])


def engine_base(engine: Engine, args: argparse.Namespace, vocab: int, seed: int) -> tuple[float, float, float]:
    """(tokens/s, median decode step s, CPU s per token) of the base workload in process, closed loop of N."""
    items = [WorkItem(0.0, r.prompt_token_ids, r.max_new_tokens, None) for stream in plan("base", [], args, vocab, seed) for r in stream]
    cpu = cpu_seconds()
    stats = harness.run_on_thread(engine, items, [], concurrency=args.streams)
    return stats.throughput, stats.median_decode_step_ms / 1e3, (cpu_seconds() - cpu) / stats.total_tokens


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
    shape = TINY if args.quick else CPU_BENCH
    model_path = str(make_model(shape))
    ranks = [HETERO_RANKS[i % len(HETERO_RANKS)] for i in range(args.streams)]
    root, uniform = make_adapter_set(shape, "uniform", [args.rank] * args.streams)
    _, hetero = make_adapter_set(shape, "hetero", ranks)
    common = ["--model", model_path, "--adapter-root", str(root), "--max-loras", str(args.streams),
              "--max-num-seqs", str(args.streams), "--cpu-nf4-kernel", args.cpu_nf4_kernel, "--log-level", "info"]
    own_rank = args.rank  # the uniform adapters' own max rank; the heterogeneous ones' is max(ranks)
    servers = {"r64": ServerProcess([*common, "--max-lora-rank", str(args.max_lora_rank)], "r64")}
    if own_rank != args.max_lora_rank:
        servers["own"] = ServerProcess([*common, "--max-lora-rank", str(own_rank)], "own")
    modes = ["base", *(m for m in args.modes.split(",") if m in MODES and m != "base")]
    if unknown := [m for m in args.modes.split(",") if m not in MODES]:
        p.error(f"--modes: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    runs: list[tuple[str, str]] = [("r64", m) for m in modes]
    runs += [(s, m) for s in servers if s != "r64" for m in ("identical", "uniform", "distinct") if m in modes]
    print(f"[server_bench] {shape.name}, {args.streams} streams x {args.requests} requests, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, --max-lora-rank {args.max_lora_rank}")
    engine = Engine(EngineConfig(
        model=ModelConfig(model_path, cpu_nf4_kernel=args.cpu_nf4_kernel),
        cache=CacheConfig(num_blocks=max(256, args.streams * (args.prompt_len + args.new_tokens) // 16 + 2 * args.streams)),
        scheduler=SchedulerConfig(max_num_seqs=args.streams),
        lora=LoraConfig(max_loras=args.streams, max_lora_rank=args.max_lora_rank, adapter_roots=(str(root),)),
    ))
    tps: dict[tuple[str, str], list[float]] = {k: [] for k in [*runs, ("engine", "base")]}
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in tps}  # CPU s per token (server + client)
    base_step: list[float] = []
    bandwidths: list[float] = []
    try:
        addresses = {label: s.start() for label, s in servers.items()}
        for rnd in range(args.rounds + (0 if args.quick else 1)):  # round 0 warms up (not with --quick)
            timed = args.quick or rnd > 0
            seed = 100 + rnd
            bandwidth = memory_bandwidth()
            rate, step, per_token = engine_base(engine, args, shape.vocab_size, seed)
            if timed:
                bandwidths.append(bandwidth)
                tps[("engine", "base")].append(rate)
                cpu[("engine", "base")].append(per_token)
                base_step.append(step)
            print(f"  round {rnd} [engine   base         ] {rate:7.1f} tok/s, {per_token * 1e3:6.2f} CPU ms/token, decode step "
                  f"{step * 1e3:.1f} ms; memory bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
            for server, mode in runs:
                adapters = mode_adapters(mode, uniform, hetero, args.streams)
                warm(addresses[server], adapters, shape.vocab_size)
                pid = servers[server].pid
                before = cpu_seconds(pid) + cpu_seconds()
                result = stream_load(addresses[server], plan(mode, adapters, args, shape.vocab_size, seed))
                per_token = (cpu_seconds(pid) + cpu_seconds() - before) / result.tokens
                if timed:
                    tps[(server, mode)].append(result.tokens_per_s)
                    cpu[(server, mode)].append(per_token)
                print(f"  round {rnd} [{server:8s} {mode:13s}] {result.tokens_per_s:7.1f} tok/s, {per_token * 1e3:6.2f} CPU ms/token",
                      flush=True)
    finally:
        for s in servers.values():
            s.stop()
        engine.close()

    bandwidth = statistics.median(bandwidths)
    rows, summary = results(args, shape, runs, tps, cpu, base_step, bandwidth, uniform, hetero, ranks)
    columns = ["run", "max-lora-rank", "adapters", "tok/s", "vs base", "range", "adapter MB/step", "bytes limit",
               "vs limit", "vs own-rank server", "CPU ms/token", "CPU cost: base / run"]
    report.write(
        args.name, f"through the server — {shape.name}, {args.streams} streams, --max-lora-rank {args.max_lora_rank}",
        rows, columns, summary, plot=("run", "tok/s"), results=args.results,
        notes=f"{args.streams} SDK streams (AsyncClient), each {args.requests} requests of prompt {args.prompt_len} + "
              f"{args.new_tokens} new tokens, one after another; {args.rounds} rounds after a warm-up round; ratios within "
              f"a round, median over rounds (range = min-max); CPU ms/token = server process + client process; memory "
              f"bandwidth {bandwidth / 1e9:.1f} GB/s (torch copy, read + write, median of rounds); bytes limit = base step / (base step + adapter bytes / bandwidth), base step "
              f"{statistics.median(base_step) * 1e3:.1f} ms (in process); heterogeneous ranks {ranks}; CPU NF4 kernel "
              f"{args.cpu_nf4_kernel}; command: python -m benchmarks.server_bench {' '.join(argv or [])}",
    )
    return 0


def results(
    args: argparse.Namespace, shape: Any, runs: list[tuple[str, str]], tps: dict[tuple[str, str], list[float]],
    cpu: dict[tuple[str, str], list[float]], base_step: list[float], bandwidth: float, uniform: list[str],
    hetero: list[str], ranks: list[int],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    def ratio(a: tuple[str, str], b: tuple[str, str]) -> list[float]:
        return [x / y for x, y in zip(tps[a], tps[b])]

    def cost_ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        """b's CPU per token over a's, median over rounds: like a throughput ratio a / b."""
        return statistics.median(y / x for x, y in zip(cpu[a], cpu[b]))

    step = statistics.median(base_step)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    mode_bytes = {
        "base": 0, "identical": adapter_bytes(shape, args.rank), "uniform": 4 * adapter_bytes(shape, args.rank),
        "distinct": args.streams * adapter_bytes(shape, args.rank), "heterogeneous": sum(adapter_bytes(shape, r) for r in ranks),
    }
    server_vs_engine = ratio(("r64", "base"), ("engine", "base"))
    rows.append({"run": "in-process engine base", "max-lora-rank": args.max_lora_rank, "adapters": 0,
                 "tok/s": statistics.median(tps[("engine", "base")]),
                 "CPU ms/token": statistics.median(cpu[("engine", "base")]) * 1e3})
    for server, mode in runs:
        base = ("r64", "base")
        r = ratio((server, mode), base)
        limit = step / (step + mode_bytes[mode] / bandwidth)
        row: dict[str, Any] = {
            "run": f"server {mode}", "max-lora-rank": args.max_lora_rank if server == "r64" else args.rank,
            "adapters": len(mode_adapters(mode, uniform, hetero, args.streams)), "tok/s": statistics.median(tps[(server, mode)]),
            "vs base": statistics.median(r), "range": f"{min(r):.2f}-{max(r):.2f}", "adapter MB/step": mode_bytes[mode] / 1e6,
            "bytes limit": limit, "vs limit": statistics.median(r) / limit,
            "CPU ms/token": statistics.median(cpu[(server, mode)]) * 1e3, "CPU cost: base / run": cost_ratio((server, mode), base),
        }
        if server == "r64" and ("own", mode) in tps:
            row["vs own-rank server"] = statistics.median(ratio(("r64", mode), ("own", mode)))
        rows.append(row)
        if server != "r64":
            row["run"] += f" (--max-lora-rank {args.rank})"
            continue
        if mode in GOALS:
            summary[f"{mode} / base (goal >= {GOALS[mode]})"] = row["vs base"]
            summary[f"{mode} / base, CPU cost"] = row["CPU cost: base / run"]
        if mode != "base":
            summary[f"{mode} / bytes limit (goal >= {LIMIT_GOAL})"] = row["vs limit"]
        if "vs own-rank server" in row:
            summary[f"{mode}: rank-64 server / rank-{args.rank} server (goal >= {OWN_RANK_GOAL})"] = row["vs own-rank server"]
    if ("r64", "heterogeneous") in tps and ("r64", "distinct") in tps:
        per_byte = mode_bytes["heterogeneous"] / mode_bytes["distinct"]
        own = [1 / (1 / b + (1 / d - 1 / b) * per_byte) for b, d in zip(tps[("r64", "base")], tps[("r64", "distinct")])]
        h = statistics.median(h / o for h, o in zip(tps[("r64", "heterogeneous")], own))
        summary[f"heterogeneous / same bytes at distinct's cost per byte (goal >= {HETERO_GOAL})"] = h
    summary[f"server base / in-process engine base (goal >= {SERVER_GOAL})"] = statistics.median(server_vs_engine)
    summary["server base / in-process engine base, CPU cost"] = cost_ratio(("r64", "base"), ("engine", "base"))
    summary["memory bandwidth GB/s"] = bandwidth / 1e9
    summary["base decode step ms (in process)"] = step * 1e3
    summary["goals met"] = all(
        v >= float(k.rsplit(">= ", 1)[1].rstrip(")")) for k, v in summary.items() if "goal >=" in k
    )
    return rows, summary


if __name__ == "__main__":
    raise SystemExit(main())
