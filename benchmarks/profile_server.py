"""Where the server's CPU goes at saturation: py-spy samples of a real `loraplex serve` under N SDK streams.

    python -m benchmarks.profile_server [--mode distinct] [--streams 16] [--seconds 30] [--label before]

Starts the server (bench model, --max-lora-rank 64), puts the mode's adapters in slots, then
samples every thread of the server (py-spy, 100 Hz, idle samples dropped) while the streams
run. Writes benchmarks/results/profile_server_<label>.md: each thread's share of the samples
(engine thread, asyncio loop, gRPC's own threads) and the functions with the most samples
(self and inclusive) in each, plus the tokens/s the load saw. Needs `pip install py-spy`.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks import report
from benchmarks.models import CPU_BENCH, make_adapter_set, make_model
from benchmarks.server_bench import mode_adapters, plan, warm
from benchmarks.serving import LoadResult, ServerProcess, stream_load


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
    for t, n in threads.most_common(4):
        out += ["", f"### {t} ({n / total:.1%})", "", "| self | function | | inclusive | function |", "|---|---|---|---|---|"]
        s, i = self_time[t].most_common(top), inclusive[t].most_common(top)
        for k in range(max(len(s), len(i))):
            a = f"{s[k][1] / n:.1%} | `{s[k][0]}`" if k < len(s) else " | "
            b = f"{i[k][1] / n:.1%} | `{i[k][0]}`" if k < len(i) else " | "
            out.append(f"| {a} | | {b} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="distinct", choices=["base", "identical", "uniform", "distinct", "heterogeneous"])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--label", default="after")
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    shape = CPU_BENCH
    root, uniform = make_adapter_set(shape, "uniform", [16] * args.streams)
    _, hetero = make_adapter_set(shape, "hetero", [(4, 8, 16, 32, 64)[i % 5] for i in range(args.streams)])
    server = ServerProcess(["--model", str(make_model(shape)), "--adapter-root", str(root), "--max-loras", str(args.streams),
                            "--max-num-seqs", str(args.streams), "--max-lora-rank", "64"], "profile")
    address = server.start()
    raw = Path(tempfile.mkdtemp()) / "raw.txt"
    try:
        adapters = mode_adapters(args.mode, uniform, hetero, args.streams)
        warm(address, adapters, shape.vocab_size)
        result: list[LoadResult] = []
        load = threading.Thread(target=lambda: result.append(stream_load(address, plan(args.mode, adapters, args, shape.vocab_size, 0))))
        load.start()
        assert server.proc is not None
        subprocess.run([pyspy, "record", "-p", str(server.proc.pid), "--threads", "--rate", "100", "--duration",
                        str(args.seconds), "--format", "raw", "-o", str(raw), "--nonblocking"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        load.join()
    finally:
        server.stop()
    env = report.environment()
    text = (f"# Server profile ({args.label}) — {shape.name}, {args.mode}, {args.streams} streams\n\n"
            f"{env['date']}, commit {env['commit']}, {env['cpu_threads']} threads; load: {result[0].tokens_per_s:.1f} tok/s "
            f"over the whole run\n\ncommand: `python -m benchmarks.profile_server {' '.join(argv or sys.argv[1:])}` "
            f"(py-spy record --threads --rate 100 --nonblocking, idle samples dropped)\n\n{summarize(raw)}\n")
    report.RESULTS.mkdir(parents=True, exist_ok=True)
    (report.RESULTS / f"profile_server_{args.label}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
