"""Where the server's CPU goes at saturation: a real `loraplex serve` under N SDK streams.

    python -m benchmarks.profile_server [--modes base,distinct] [--pyspy distinct] [--label before]
    python -m benchmarks.profile_server --model tiny      # engine work small: the serving cost shows

Two views, both of the same load (each mode's adapters put in slots first):
- CPU milliseconds per generated token, by thread (read from /proc before and after each
  run): the engine thread, the asyncio event loop (gRPC handlers, MainThread), gRPC's own
  C threads, torch's OpenMP workers, and the client process; beside them, the in-process
  engine on the same requests. CPU time, unlike wall time, holds up on a loaded machine:
  the serving cost per token is server + client - the in-process engine's.
- py-spy samples of every Python thread during one mode's run (100 Hz, idle samples
  dropped): each thread's share and the functions with the most samples.

Writes benchmarks/results/profile_server_<label>.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks import harness, report
from benchmarks.models import CPU_BENCH, TINY, make_adapter_set, make_model
from benchmarks.server_bench import mode_adapters, plan, warm
from benchmarks.serving import LoadResult, Request, ServerProcess, stream_load
from benchmarks.workload import WorkItem
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex.engine.engine import Engine

TICK = os.sysconf("SC_CLK_TCK")
MODES = ["base", "identical", "uniform", "distinct", "heterogeneous"]


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of each thread of `pid`: tid -> (comm, seconds)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def python_thread_names(pyspy: str, pid: int) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` ("Thread 22560 (idle): "engine-loop"")."""
    text = subprocess.run([pyspy, "dump", "-p", str(pid)], capture_output=True, text=True, check=True).stdout
    return {int(tid): name for tid, name in re.findall(r'^Thread (\d+) \(\w+\): "([^"]*)"', text, re.M)}


def thread_group(comm: str, name: str | None) -> str:
    if name == "MainThread":
        return "event loop"
    if name is not None:
        return name  # engine-loop, adapter-loader, asyncio_0 (to_thread), ...
    # Not a Python thread: gRPC's C threads name themselves; torch's OpenMP workers keep the process's name.
    return "torch workers" if comm in ("loraplex", "python", "python3") else "gRPC C threads"


def summarize(raw: Path, top: int = 12) -> str:
    """py-spy's raw (collapsed) stacks -> per-thread sample shares and top functions."""
    threads: collections.Counter[str] = collections.Counter()
    self_time: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread, n = frames[0], int(count)
        threads[thread] += n
        funcs = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")" for f in frames[1:]]
        if funcs:
            self_time[thread][funcs[-1]] += n
            for f in set(funcs):
                inclusive[thread][f] += n
    total = sum(threads.values()) or 1
    out = ["| thread | share of samples |", "|---|---|"]
    out += [f"| {t} | {n / total:.1%} |" for t, n in threads.most_common()]
    for t, n in threads.most_common(3):
        out += ["", f"#### {t} ({n / total:.1%})", "", "| self | function | | inclusive | function |", "|---|---|---|---|---|"]
        s, i = self_time[t].most_common(top), inclusive[t].most_common(top)
        for k in range(max(len(s), len(i))):
            a = f"{s[k][1] / n:.1%} | `{s[k][0]}`" if k < len(s) else " | "
            b = f"{i[k][1] / n:.1%} | `{i[k][0]}`" if k < len(i) else " | "
            out.append(f"| {a} | | {b} |")
    return "\n".join(out)


def cpu_run(address: str, pid: int, names: dict[int, str], requests: list[list[Request]]) -> tuple[LoadResult, dict[str, float]]:
    """One load; CPU seconds of each server thread group and of this (client) process."""
    before, c0 = thread_cpu(pid), resource.getrusage(resource.RUSAGE_SELF)
    result = stream_load(address, requests)
    after, c1 = thread_cpu(pid), resource.getrusage(resource.RUSAGE_SELF)
    groups: dict[str, float] = collections.defaultdict(float)
    for tid, (comm, seconds) in after.items():
        groups[thread_group(comm, names.get(tid))] += seconds - before.get(tid, (comm, 0.0))[1]
    groups["client"] = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    return result, dict(groups)


def engine_cpu(engine: Engine, requests: list[list[Request]]) -> tuple[float, float]:
    """(tokens/s, CPU seconds per token) of the same requests on the in-process engine (base only)."""
    items = [WorkItem(0.0, r.prompt_token_ids, r.max_new_tokens, None) for stream in requests for r in stream]
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    stats = harness.run_on_thread(engine, items, [], concurrency=len(requests))
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    return stats.throughput, (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / stats.total_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bench", "tiny"], default="bench")
    p.add_argument("--modes", default="base,distinct", help="comma-separated, of " + ", ".join(MODES))
    p.add_argument("--pyspy", default="distinct", help="the mode py-spy samples ('' for none)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--requests", type=int, default=1, help="requests per stream, one after another")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="CPU accounting rounds (the table gives the median)")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--label", default="after")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown modes {sorted(unknown)}")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    shape = TINY if args.model == "tiny" else CPU_BENCH
    model_path = str(make_model(shape))
    root, uniform = make_adapter_set(shape, "uniform", [16] * args.streams)
    _, hetero = make_adapter_set(shape, "hetero", [(4, 8, 16, 32, 64)[i % 5] for i in range(args.streams)])
    server = ServerProcess(["--model", model_path, "--adapter-root", str(root), "--max-loras", str(args.streams),
                            "--max-num-seqs", str(args.streams), "--max-lora-rank", str(args.max_lora_rank)], "profile")
    engine = Engine(EngineConfig(
        model=ModelConfig(model_path), cache=CacheConfig(num_blocks=max(256, args.streams * 8)),
        scheduler=SchedulerConfig(max_num_seqs=args.streams),
        lora=LoraConfig(max_loras=args.streams, max_lora_rank=args.max_lora_rank),
    ))
    cpu: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    rates: dict[str, list[float]] = collections.defaultdict(list)
    raw = Path(tempfile.mkdtemp()) / "raw.txt"
    address = server.start()
    assert server.proc is not None
    pid = server.proc.pid
    try:
        names = python_thread_names(pyspy, pid)
        for rnd in range(args.rounds):
            requests = plan("base", [], args, shape.vocab_size, rnd, args.new_tokens)
            rate, per_token = engine_cpu(engine, requests)
            rates["in-process engine base"].append(rate)
            cpu["in-process engine base"].append({"engine (in process)": per_token})
            for mode in modes:
                adapters = mode_adapters(mode, uniform, hetero, args.streams)
                warm(address, adapters, shape.vocab_size)
                result, groups = cpu_run(address, pid, names, plan(mode, adapters, args, shape.vocab_size, rnd, args.new_tokens))
                rates[f"server {mode}"].append(result.tokens_per_s)
                cpu[f"server {mode}"].append({k: v / result.tokens for k, v in groups.items()})
                print(f"  round {rnd} [{mode:13s}] {result.tokens_per_s:7.1f} tok/s", flush=True)
        if args.pyspy:
            adapters = mode_adapters(args.pyspy, uniform, hetero, args.streams)
            warm(address, adapters, shape.vocab_size)
            load = threading.Thread(target=stream_load, args=(address, plan(args.pyspy, adapters, args, shape.vocab_size, 99, args.new_tokens)))
            load.start()
            # py-spy until the load ends (SIGINT makes it write what it sampled).
            spy = subprocess.Popen([pyspy, "record", "-p", str(pid), "--threads", "--rate", "100", "--format", "raw",
                                    "-o", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            load.join()
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        server.stop()
        engine.close()
    text = render(args, argv, shape.name, cpu, rates, raw if args.pyspy else None)
    report.RESULTS.mkdir(parents=True, exist_ok=True)
    (report.RESULTS / f"profile_server_{args.label}.md").write_text(text)
    print(text)
    return 0


GROUPS = ["engine-loop", "event loop", "gRPC C threads", "torch workers", "client"]


def render(args: argparse.Namespace, argv: list[str] | None, model: str, cpu: dict[str, list[dict[str, float]]],
           rates: dict[str, list[float]], raw: Path | None) -> str:
    env = report.environment()
    rows: list[dict[str, Any]] = []
    for run, samples in cpu.items():
        keys = sorted({k for s in samples for k in s}, key=lambda k: (k not in GROUPS, GROUPS.index(k) if k in GROUPS else 0, k))
        row: dict[str, Any] = {"run": run, "tok/s": statistics.median(rates[run])}
        for k in keys:
            row[k] = statistics.median(s.get(k, 0.0) for s in samples) * 1e3
        row["total"] = sum(v for k, v in row.items() if k not in ("run", "tok/s"))
        rows.append(row)
    columns = ["run", "tok/s", *dict.fromkeys(k for r in rows for k in r if k not in ("run", "tok/s", "total")), "total"]
    command = f"python -m benchmarks.profile_server {' '.join(argv if argv is not None else sys.argv[1:])}"
    text = [
        f"# Server profile ({args.label}) — {model}, {args.streams} streams, --max-lora-rank {args.max_lora_rank}", "",
        f"{env['date']}, commit {env['commit']}, {env['cpu_threads']} torch threads; command: `{command}`", "",
        f"## CPU ms per generated token (median of {args.rounds} rounds; {args.requests} request(s) per stream of prompt "
        f"{args.prompt_len} + {args.new_tokens} new tokens)", "", report.table(rows, columns), "",
        "engine-loop: the engine thread (steps, sampling, detokenizing); event loop: the asyncio thread (gRPC handlers); "
        "torch workers: OpenMP threads of the step's ops; client: the SDK streams (this process).",
    ]
    if raw is not None:
        text += ["", f"## py-spy, {args.pyspy} (record --threads --rate 100 --nonblocking, idle samples dropped)", "", summarize(raw)]
    return "\n".join(text) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
