"""Fair share under overload: FCFS against VTC, through real servers (issue 12).

    scenario      tenants (weight)               arrival rates (C: the server's capacity, requests/s)
    two 4:1       heavy (1), light (1)           heavy 2.2 C, light 0.55 C
    four 4:1:1:1  heavy4, l1, l2, l3 (1 each)    heavy4 1.2 C, each light 0.3 C
    weights 2:1   gold (2), silver (1)           1.0 C each

Every tenant asks for a little more than its fair share, so all stay backlogged, and the
server is overloaded 2-2.75x. Two `loraplex serve` processes run side by side, `--fairness
fcfs` and `--fairness vtc`, same flags and tenants file otherwise; each round runs every
scenario on one and then the other while the other idles, and the table gives medians over
rounds (ratios are taken within a round). Arrivals are open loop (Poisson, one SDK stream
per request: 16 prompt tokens, 16 generated, ignore_eos); C comes from a closed-loop
calibration on the VTC server first.

A scenario sends for `--duration` seconds, then cancels what is still in flight (the server
aborts it) instead of draining a queue that only grows. Measured in the window from 20% of
the duration to its end: each tenant's share of the generated tokens, the total tokens per
second, and time to first token (send → first token) of the requests sent in the window;
a request still without a token at the end counts with the time it had waited (a lower
bound, so FCFS's long waits are understated, never overstated). The plot shows each
tenant's share of generated tokens in 2-second bins (the first round).

    python -m benchmarks.fairness_bench            # small model (d=256, 4 layers), 2 rounds, ~6 min
    python -m benchmarks.fairness_bench --quick    # tiny model, short phases: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.models import CACHE, SMALL, TINY, make_model
from benchmarks.serving import ServerProcess
from loraplex_client import AsyncClient

SCENARIOS: dict[str, dict[str, tuple[float, float]]] = {  # tenant -> (arrival rate in C, weight)
    "two 4:1": {"heavy": (2.2, 1.0), "light": (0.55, 1.0)},
    "four 4:1:1:1": {"heavy4": (1.2, 1.0), "l1": (0.3, 1.0), "l2": (0.3, 1.0), "l3": (0.3, 1.0)},
    "weights 2:1": {"gold": (1.0, 2.0), "silver": (1.0, 1.0)},
}
CALIBRATION_TENANT = "calib"
BIN_S = 2.0


def token_of(tenant: str) -> str:
    return f"fairness-bench-{tenant}-token"


def tenants_file(path: Path) -> Path:
    """Every tenant of every scenario, no limits (max_requests = 0), with its weight."""
    weights = {t: w for scenario in SCENARIOS.values() for t, (_, w) in scenario.items()} | {CALIBRATION_TENANT: 1.0}
    entries = [
        f'[[tenant]]\nname = "{t}"\ntoken_sha256 = "{hashlib.sha256(token_of(t).encode()).hexdigest()}"\n'
        f'namespaces = ["{t}"]\nmax_requests = 0\nmax_adapters = 0\nweight = {w}\n'
        for t, w in weights.items()
    ]
    path.write_text("\n".join(entries))
    return path


@dataclass
class Sent:
    tenant: str
    sent: float
    first: float | None = None
    tokens: list[tuple[float, int]] = field(default_factory=list)  # (time received, tokens)


async def _one(client: AsyncClient, record: Sent, prompt: list[int], new_tokens: int) -> None:
    stream = client.generate_stream(prompt_token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)
    async for chunk in stream:
        now = time.perf_counter()
        if record.first is None:
            record.first = now
        record.tokens.append((now, len(chunk.token_ids)))


async def _open_loop(
    address: str, rates: dict[str, float], duration: float, prompt_len: int, new_tokens: int, vocab: int, seed: int
) -> tuple[float, list[Sent]]:
    """Poisson arrivals per tenant for `duration` s; then everything in flight is cancelled."""
    clients = {t: AsyncClient(address, token=token_of(t), timeout=duration + 120) for t in rates}
    records: list[Sent] = []
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()

    async def arrivals(tenant: str, rate: float, rng: random.Random) -> None:
        due = start
        while True:
            due += rng.expovariate(rate)
            if due - start >= duration:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            record = Sent(tenant, time.perf_counter())
            records.append(record)
            prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
            tasks.append(asyncio.create_task(_one(clients[tenant], record, prompt, new_tokens)))

    await asyncio.gather(*(arrivals(t, r, random.Random(seed * 1000 + i)) for i, (t, r) in enumerate(rates.items())))
    end = time.perf_counter()
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [r for r in results if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, the first: {failures[0]!r}")
    for client in clients.values():
        await client.close()
    return end - start, records


async def _closed_loop(address: str, streams: int, duration: float, prompt_len: int, new_tokens: int, vocab: int) -> float:
    """Requests per second with `streams` back-to-back streams (the server saturated)."""
    done = 0
    async with AsyncClient(address, token=token_of(CALIBRATION_TENANT), timeout=duration + 120) as client:
        rng = random.Random(0)
        start = time.perf_counter()

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() - start < duration:
                record = Sent(CALIBRATION_TENANT, time.perf_counter())
                await _one(client, record, [rng.randrange(3, vocab) for _ in range(prompt_len)], new_tokens)
                done += 1

        await asyncio.gather(*(loop() for _ in range(streams)))
        return done / (time.perf_counter() - start)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(records: list[Sent], tenants: list[str], start: float, warm: float, end: float) -> dict[str, Any]:
    """Shares, throughput and TTFT in the window [start + warm, start + end)."""
    lo, hi = start + warm, start + end
    tokens = {t: 0 for t in tenants}
    bins = int((end) // BIN_S)
    per_bin = [{t: 0 for t in tenants} for _ in range(bins)]
    ttft: dict[str, list[float]] = {t: [] for t in tenants}
    censored = {t: 0 for t in tenants}
    for r in records:
        for when, n in r.tokens:
            if lo <= when < hi:
                tokens[r.tenant] += n
            b = int((when - start) // BIN_S)
            if 0 <= b < bins:
                per_bin[b][r.tenant] += n
        if lo <= r.sent < hi:
            if r.first is not None and r.first < hi:
                ttft[r.tenant].append(r.first - r.sent)
            else:
                ttft[r.tenant].append(hi - r.sent)
                censored[r.tenant] += 1
    total = sum(tokens.values())
    return {
        "share": {t: tokens[t] / total if total else 0.0 for t in tenants},
        "tokens_per_s": total / (hi - lo),
        "ttft_p50": {t: _percentile(v, 0.5) for t, v in ttft.items()},
        "ttft_p95": {t: _percentile(v, 0.95) for t, v in ttft.items()},
        "requests": {t: len(v) for t, v in ttft.items()},
        "censored": censored,
        "bins": [{t: (b[t] / s if (s := sum(b.values())) else 0.0) for t in tenants} for b in per_bin],
    }


def median_of(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number the median over rounds (per tenant where it is per tenant); bins: the first round's."""
    first = summaries[0]
    out: dict[str, Any] = {"bins": first["bins"]}
    for key, value in first.items():
        if key == "bins":
            continue
        if isinstance(value, dict):
            out[key] = {t: statistics.median(s[key][t] for s in summaries) for t in value}
        else:
            out[key] = statistics.median(s[key] for s in summaries)
    return out


def plot(path: Path, results: dict[str, dict[str, dict[str, Any]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib missing: no PNG)")
        return
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), sharey=True, squeeze=False)
    for row, (scenario, by_policy) in enumerate(results.items()):
        for col, policy in enumerate(("fcfs", "vtc")):
            ax = axes[row][col]
            bins = by_policy[policy]["bins"]
            xs = [BIN_S * (i + 0.5) for i in range(len(bins))]
            for tenant in SCENARIOS[scenario]:
                ax.plot(xs, [b[tenant] for b in bins], label=f"{tenant} (w={SCENARIOS[scenario][tenant][1]:g})")
            ax.set_title(f"{scenario}: {policy.upper()}")
            ax.set_ylim(0, 1)
            ax.set_xlabel("seconds")
            ax.set_ylabel("share of generated tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, short phases (a smoke run)")
    p.add_argument("--duration", type=float, default=25.0, help="seconds of arrivals per scenario and policy")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--name", default="fairness_bench")
    p.add_argument("--results", type=Path, default=None, help="default: benchmarks/results (.cache/bench/results with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = min(args.duration, 8.0), 1
    if args.results is None:
        args.results = CACHE / "results" if args.quick else report.RESULTS
    shape = TINY if args.quick else SMALL
    model_path = str(make_model(shape))
    work = Path(tempfile.mkdtemp(prefix="loraplex-fairness-"))
    (work / "adapters").mkdir()
    common = [
        "--model", model_path, "--quantization", "none", "--adapter-root", str(work / "adapters"),
        "--tenants", str(tenants_file(work / "tenants.toml")), "--max-num-seqs", str(args.max_num_seqs),
        "--max-waiting", "8192", "--http-port", "0",
    ]
    servers = {policy: ServerProcess([*common, "--fairness", policy], policy) for policy in ("fcfs", "vtc")}
    try:
        addresses = {policy: server.start() for policy, server in servers.items()}
        capacity = asyncio.run(_closed_loop(
            addresses["vtc"], 3 * args.max_num_seqs, max(4.0, args.duration / 4), args.prompt_len, args.new_tokens,
            shape.vocab_size,
        ))
        print(f"[fairness_bench] {shape.name}, --max-num-seqs {args.max_num_seqs}, {args.prompt_len} + {args.new_tokens} "
              f"tokens per request: capacity C = {capacity:.1f} requests/s; {args.duration:.0f} s per run")
        rounds: list[dict[str, dict[str, dict[str, Any]]]] = []
        for r in range(args.rounds):
            rounds.append({})
            for i, scenario in enumerate(args.scenarios):
                tenants = list(SCENARIOS[scenario])
                rates = {t: rate * capacity for t, (rate, _) in SCENARIOS[scenario].items()}
                rounds[r][scenario] = {}
                for policy in ("fcfs", "vtc"):
                    start = time.perf_counter()
                    elapsed, records = asyncio.run(_open_loop(
                        addresses[policy], rates, args.duration, args.prompt_len, args.new_tokens, shape.vocab_size,
                        seed=100 * r + i,
                    ))
                    rounds[r][scenario][policy] = summarize(records, tenants, start, 0.2 * args.duration, elapsed)
                    time.sleep(2.0)  # the cancelled requests leave the server before the next run
    finally:
        for server in servers.values():
            server.stop()
    results = {scenario: {policy: median_of([rd[scenario][policy] for rd in rounds]) for policy in ("fcfs", "vtc")}
               for scenario in args.scenarios}

    def ratio(scenario: str, value: Any) -> float:
        """The median over rounds of a VTC / FCFS ratio taken within each round."""
        return statistics.median(value(rd[scenario]["vtc"]) / value(rd[scenario]["fcfs"]) for rd in rounds)

    rows: list[dict[str, Any]] = []
    for scenario, by_policy in results.items():
        for policy in ("fcfs", "vtc"):
            got = by_policy[policy]
            for tenant in SCENARIOS[scenario]:
                rows.append({
                    "scenario": scenario, "policy": policy, "tenant": tenant, "weight": SCENARIOS[scenario][tenant][1],
                    "rate (C)": SCENARIOS[scenario][tenant][0], "token share": got["share"][tenant],
                    "TTFT p50 s": got["ttft_p50"][tenant], "TTFT p95 s": got["ttft_p95"][tenant],
                    "requests": got["requests"][tenant], "no token yet": got["censored"][tenant],
                    "tokens/s (all)": got["tokens_per_s"],
                })
    summary: dict[str, Any] = {"capacity C (requests/s)": capacity}
    if "two 4:1" in results:
        fcfs, vtc = results["two 4:1"]["fcfs"], results["two 4:1"]["vtc"]
        summary["two 4:1: light share FCFS"] = fcfs["share"]["light"]
        summary["two 4:1: light share VTC"] = vtc["share"]["light"]
        summary["two 4:1: light TTFT p95 FCFS / VTC"] = 1 / ratio("two 4:1", lambda s: s["ttft_p95"]["light"])
        summary["two 4:1: throughput VTC / FCFS"] = ratio("two 4:1", lambda s: s["tokens_per_s"])
    if "four 4:1:1:1" in results:
        vtc = results["four 4:1:1:1"]["vtc"]
        summary["four: light shares VTC (min)"] = min(vtc["share"][t] for t in ("l1", "l2", "l3"))
        summary["four: throughput VTC / FCFS"] = ratio("four 4:1:1:1", lambda s: s["tokens_per_s"])
    if "weights 2:1" in results:
        vtc = results["weights 2:1"]["vtc"]
        summary["weights 2:1: gold / silver tokens VTC"] = vtc["share"]["gold"] / max(vtc["share"]["silver"], 1e-9)
    columns = ["scenario", "policy", "tenant", "weight", "rate (C)", "token share", "TTFT p50 s", "TTFT p95 s",
               "requests", "no token yet", "tokens/s (all)"]
    notes = (
        f"`python -m benchmarks.fairness_bench{' --quick' if args.quick else ''}`: {shape.name} (unquantized, CPU), "
        f"--max-num-seqs {args.max_num_seqs}, {args.prompt_len} prompt + {args.new_tokens} generated tokens per request, "
        f"{args.duration:.0f} s of Poisson arrivals per run, measured from {0.2 * args.duration:.0f} s on; "
        f"medians over {args.rounds} rounds. "
        "TTFT of a request still without a token at the end counts the time it had waited (a lower bound)."
    )
    report.write(args.name, "Fair share under overload: FCFS vs VTC", rows, columns, summary, notes=notes, results=args.results)
    plot(args.results / f"{args.name}.png", results)
    for scenario in results:
        print(f"  {scenario}: " + "; ".join(
            f"{policy} " + ", ".join(f"{t} {results[scenario][policy]['share'][t]:.0%}" for t in SCENARIOS[scenario])
            for policy in ("fcfs", "vtc")
        ))


if __name__ == "__main__":
    main()
