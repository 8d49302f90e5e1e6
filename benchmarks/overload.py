"""Overload: a closed loop at 3x the admission bound against a real `loraplex serve`, timed.

    this process (asyncio, one AsyncClient)                 `loraplex serve --model demo`
    phase "before": 1x bound clients ──gRPC──>               --max-num-seqs S --max-waiting W
    phase "burst":  3x bound clients (rejected ones retry)   bound = S + W requests admitted
    phase "after":  1x bound clients

Each client runs greedy requests back to back over the demo adapters and the base; a
RESOURCE_EXHAUSTED (OverloadedError) is timed and retried at once (or after --retry-after-ms). Reported per phase:
rejection latency p50/p99, admitted latency p50/p99, completed requests and tokens per
second; the ratio of throughput after the burst to before it; every admitted result checked
against its reference run (taken on the idle server first); and the server idle at the end
(no running or waiting request, every KV block free, no slot reference or holder).
The correctness half is a test (tests/api/test_overload.py); the timings live here.

    .venv/bin/python -m benchmarks.overload            # writes benchmarks/results/overload.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.soak import PROMPTS, RESULTS, STABLE, Server
from loraplex_client import AsyncClient, OverloadedError

ADAPTERS: list[str | None] = [*STABLE, None]


@dataclass
class Phase:
    name: str
    clients: int
    seconds: float
    admitted_s: list[float] = field(default_factory=list)
    rejected_s: list[float] = field(default_factory=list)
    tokens: int = 0
    wrong: int = 0
    rejection_messages: set[str] = field(default_factory=set)

    def row(self) -> dict[str, float | int | str]:
        return {
            "phase": self.name, "clients": self.clients, "seconds": self.seconds,
            "completed": len(self.admitted_s), "rejected": len(self.rejected_s), "wrong": self.wrong,
            "requests_per_s": len(self.admitted_s) / self.seconds, "tokens_per_s": self.tokens / self.seconds,
            "admitted_p50_ms": _ms(self.admitted_s, 0.5), "admitted_p99_ms": _ms(self.admitted_s, 0.99),
            "rejection_p50_ms": _ms(self.rejected_s, 0.5), "rejection_p99_ms": _ms(self.rejected_s, 0.99),
        }


def _ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _client_loop(
    client: AsyncClient, phase: Phase, index: int, end: float, max_new: int, reference: dict[tuple[int, str | None], list[int]],
    retry_after: float,
) -> None:
    i = index
    while time.monotonic() < end:
        key = (i % len(PROMPTS), ADAPTERS[i % len(ADAPTERS)])
        t0 = time.perf_counter()
        try:
            result = await client.generate(prompt_token_ids=PROMPTS[key[0]], adapter_id=key[1], max_new_tokens=max_new, ignore_eos=True)
        except OverloadedError as e:
            phase.rejected_s.append(time.perf_counter() - t0)
            phase.rejection_messages.add(e.details)
            await asyncio.sleep(retry_after)  # closed loop: retry at once, or after a pause
            continue
        phase.admitted_s.append(time.perf_counter() - t0)
        phase.tokens += len(result.token_ids)
        phase.wrong += list(result.token_ids) != reference[key]
        i += 1


async def _run(
    address: str, bound: int, seconds: float, max_new: int, retry_after: float
) -> tuple[list[Phase], dict[tuple[int, str | None], list[int]]]:
    async with AsyncClient(address, timeout=300) as client:
        reference = {
            (p, a): list((await client.generate(prompt_token_ids=PROMPTS[p], adapter_id=a, max_new_tokens=max_new, ignore_eos=True)).token_ids)
            for p in range(len(PROMPTS)) for a in ADAPTERS
        }
        phases = [Phase("before", bound, seconds), Phase("burst", 3 * bound, seconds), Phase("after", bound, seconds)]
        for phase in phases:
            end = time.monotonic() + seconds
            await asyncio.gather(*(_client_loop(client, phase, i, end, max_new, reference, retry_after) for i in range(phase.clients)))
        return phases, reference


def _table(rows: list[dict[str, float | int | str]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--max-waiting", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase (default 30)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--retry-after-ms", type=float, default=0.0, help="a refused client's pause before it retries (default 0)")
    parser.add_argument("--out", default=str(RESULTS / "overload"), help="report path without extension")
    args = parser.parse_args(argv)

    from loraplex.model.demo import demo_dir, make_demo

    demo = make_demo(demo_dir())
    work = Path(tempfile.mkdtemp(prefix="loraplex-overload-"))
    for name in STABLE:
        shutil.copytree(demo / "adapters" / name, work / "adapters" / name)
    options = ("--max-loras", str(len(STABLE)), "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.max_waiting))
    server = Server(work / "adapters", work / "server.log", options=options)
    bound = args.max_num_seqs + args.max_waiting
    try:
        phases, _ = asyncio.run(_run(server.address or "", bound, args.seconds, args.max_new_tokens, args.retry_after_ms / 1000))
        time.sleep(1.0)  # the engine ends the last requests at its next step
        m = server.metrics()
    finally:
        exit_code = server.stop()
    idle = {k: m.get(k, -1) for k in (
        "loraplex_requests_running", "loraplex_requests_waiting", "loraplex_kv_blocks_used",
        "loraplex_adapter_slot_references", "loraplex_adapter_holders",
    )}
    rows = [p.row() for p in phases]
    before, after = rows[0]["tokens_per_s"], rows[2]["tokens_per_s"]
    report = {
        "command": " ".join(["python -m benchmarks.overload", *(sys.argv[1:] if argv is None else argv)]),
        "bound": bound, "max_num_seqs": args.max_num_seqs, "max_waiting": args.max_waiting,
        "max_new_tokens": args.max_new_tokens, "retry_after_ms": args.retry_after_ms, "phases": rows,
        "after_over_before_tokens_per_s": float(after) / float(before) if before else float("nan"),
        "rejection_messages": sorted({m for p in phases for m in p.rejection_messages}),
        "idle_after": idle, "server_exit_code": exit_code,
    }
    ok = all(p.wrong == 0 for p in phases) and all(v == 0 for v in idle.values()) and exit_code == 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    summary = (
        f"bound {bound} (max_num_seqs {args.max_num_seqs} + max_waiting {args.max_waiting}); {args.seconds:.0f} s per phase; "
        f"greedy, {args.max_new_tokens} new tokens; a refused client retries after {args.retry_after_ms:.0f} ms; tokens/s after / before the burst: {report['after_over_before_tokens_per_s']:.2f}; "
        f"idle after: {idle}; wrong results: {sum(p.wrong for p in phases)}\n\nrejection message(s): {report['rejection_messages']}"
    )
    out.with_suffix(".md").write_text(f"# Overload ({report['command'].strip()})\n\n{_table(rows)}\n\n{summary}\n")
    print(_table(rows))
    print(summary)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
