"""Soak: a real `loraplex serve` under abuse for a given time; nothing may leak, nothing be lost.

    this process                                              `loraplex serve --model demo` (subprocess)
    workers x N: streams / unary, greedy and sampled,  ──gRPC──>  engine, adapter store
        random cancels (queued, prefill, mid-decode),
        deadlines in every phase, prompts at the limits
    churn: load / re-load new content / unload / force-unload / upload (whole and cut off) /
        files corrupted or deleted after registration
    killer: client processes SIGKILLed mid-stream
    monitor: /metrics + the server's RSS every few seconds; at each checkpoint the workload
        pauses and the server must be idle: no running or waiting request, every KV block free,
        no adapter slot reference or holder, host bytes within budget

At the end: every call ended exactly once with a definite status (counted by code), every
greedy request that finished equals its reference run (taken on the idle server first),
resident memory flat after warm-up (the slope is reported), the checkpoints all idle.
Writes benchmarks/results/soak.json (+ .png: memory and latency over time); exits 1 on any
violation. `--inject-leak` starts the server with a slot-reference leak to show it is caught.

    .venv/bin/python -m benchmarks.soak --duration 120          # the CI form (make soak-ci)
    nice -n 10 .venv/bin/python -m benchmarks.soak --duration 1800   # make soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from loraplex.ports import free_port
from loraplex_client import Client, LoraplexError

RESULTS = Path(__file__).parent / "results"
STABLE = ["pirate", "robot", "chef", "poet"]  # demo adapters: never changed, greedy results checked
PROMPTS = [[5, 6, 7, 8], [20, 21, 22], [3, 40, 41, 42, 43, 44, 45], [100, 7, 9, 11, 13]]
MAX_NEW = 24
HOST_BUDGET = 1 << 20  # about 3 demo adapters: the host tier evicts
SOAK_OPTIONS = ("--max-loras", "3", "--max-num-seqs", "12", "--max-host-adapter-bytes", str(HOST_BUDGET))
LEAK_PATCH = (
    "import itertools, loraplex.lora.adapter_store as s\n"
    "c = itertools.count(); r = s.AdapterStore.release\n"
    "s.AdapterStore.release = lambda self, a: None if next(c) % 50 == 49 else r(self, a)\n"
    "from loraplex.cli import main; raise SystemExit(main())\n"
)
KILLED_CLIENT = (
    "import sys; from loraplex_client import Client\n"
    "c = Client(sys.argv[1], timeout=60)\n"
    "for chunk in c.generate_stream(prompt_token_ids=[5, 6, 7], adapter_id=sys.argv[2] or None, max_new_tokens=400, ignore_eos=True):\n"
    "    print(len(chunk.token_ids), flush=True)\n"
)


class Server:
    """`loraplex serve --model demo` on --port 0 (read back from its log) with /metrics on a
    free port, the HTTP API off; `options` are the rest of its flags."""

    def __init__(self, root: Path, log_path: Path, inject_leak: bool = False, options: tuple[str, ...] = SOAK_OPTIONS) -> None:
        for _ in range(5):  # the metrics port is chosen here: retry if another process took it
            self.metrics_port = free_port()
            args = [
                "serve", "--model", "demo", "--adapter-root", str(root), "--port", "0",
                "--metrics-port", str(self.metrics_port), "--http-port", "0", "--log-format", "json", *options,
            ]
            cmd = [sys.executable, "-c", LEAK_PATCH, *args] if inject_leak else [sys.executable, "-m", "loraplex.cli", *args]
            self.log_path = log_path
            with log_path.open("wb") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.address = self._wait_listening()
            if self.address:
                return
        raise RuntimeError(f"the server did not start:\n{log_path.read_text()[-3000:]}")

    def _wait_listening(self) -> str | None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = re.search(r"listening on [^\s:]+:(\d+)", text)
            if match and "metrics on" in text:
                return f"127.0.0.1:{match[1]}"
            if self.proc.poll() is not None:
                return None
            time.sleep(0.2)
        raise RuntimeError("the server did not listen within 600 s")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


class Soak:
    def __init__(self, server: Server, root: Path, demo: Path, seed: int) -> None:
        self.server, self.root, self.demo = server, root, demo
        self.address = server.address or ""
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()  # "kind:CODE" -> calls
        self.events: Counter[str] = Counter()
        self.violations: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (t, seconds) of finished unary greedy calls
        self.reference: dict[tuple[int, str | None], list[int]] = {}
        self.running = threading.Event()
        self.running.set()
        self.stop = threading.Event()
        self.in_flight = 0
        self.started = time.monotonic()
        self.max_model_len = 0  # from GetModelInfo

    # -- bookkeeping -----------------------------------------------------------------------

    def _count(self, kind: str, code: str) -> None:
        with self.lock:
            self.outcomes[f"{kind}:{code}"] += 1

    def _violate(self, what: str) -> None:
        with self.lock:
            self.violations.append(f"{time.monotonic() - self.started:.1f}s {what}")

    def _call(self, kind: str, fn: Any) -> Any:
        """Run one call; exactly one outcome is counted for it, whatever happens."""
        self.running.wait()
        with self.lock:
            self.in_flight += 1
        try:
            result = fn()
            self._count(kind, "OK")
            return result
        except LoraplexError as e:
            code = e.code.name if e.code is not None else "NONE"
            if code in ("INTERNAL", "UNKNOWN"):
                self._violate(f"{kind}: {code} {e}")
            self._count(kind, code)
        except grpc.RpcError as e:
            self._count(kind, e.code().name)  # type: ignore[attr-defined]
        finally:
            with self.lock:
                self.in_flight -= 1
        return None

    # -- the workload ------------------------------------------------------------------------

    def take_references(self, client: Client) -> None:
        for i, prompt in enumerate(PROMPTS):
            for adapter in [*STABLE, None]:
                result = client.generate(prompt_token_ids=prompt, adapter_id=adapter, max_new_tokens=MAX_NEW, ignore_eos=True)
                self.reference[(i, adapter)] = list(result.token_ids)

    def worker(self, client: Client) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            i, adapter = rng.randrange(len(PROMPTS)), rng.choice([*STABLE, None])
            expected = self.reference[(i, adapter)]
            kind = rng.random()
            if kind < 0.35:  # greedy stream, maybe cancelled at a random point
                cancel_after = rng.choice([None, None, 0, 1, 5, 15])

                def stream(i: int = i, adapter: str | None = adapter, cancel_after: int | None = cancel_after) -> None:
                    tokens: list[int] = []
                    it = client.generate_stream(prompt_token_ids=PROMPTS[i], adapter_id=adapter, max_new_tokens=MAX_NEW, ignore_eos=True)
                    for chunk in it:
                        tokens.extend(chunk.token_ids)
                        if cancel_after is not None and len(tokens) >= cancel_after:
                            it.close()
                            self.events["cancels"] += 1
                            return
                    if tokens != self.reference[(i, adapter)]:
                        self._violate(f"stream {adapter} prompt {i}: {tokens} != reference {self.reference[(i, adapter)]}")

                self._call("stream", stream)
            elif kind < 0.65:  # greedy unary, a deadline that may fire in any phase
                timeout = rng.choice([None, None, 0.02, 0.1, 0.3, 1.0])
                t0 = time.monotonic()
                result = self._call("unary", partial(
                    client.generate, prompt_token_ids=PROMPTS[i], adapter_id=adapter, max_new_tokens=MAX_NEW, ignore_eos=True,
                    timeout=timeout or 60,
                ))
                if result is not None:
                    self.latencies.append((time.monotonic() - self.started, time.monotonic() - t0))
                    if list(result.token_ids) != expected:
                        self._violate(f"unary {adapter} prompt {i}: {list(result.token_ids)} != reference {expected}")
            elif kind < 0.85:  # sampled, not checked against a reference
                self._call("sampled", partial(
                    client.generate, prompt_token_ids=PROMPTS[i], adapter_id=adapter, max_new_tokens=MAX_NEW, temperature=0.9,
                    top_p=0.9,
                ))
            elif kind < 0.95:  # prompts at the length limits: the longest allowed, one too long
                n = self.max_model_len - 1 if rng.random() < 0.5 else self.max_model_len
                self._call("limit", lambda n=n: client.generate(prompt_token_ids=[7] * n, max_new_tokens=1, timeout=60))
            else:  # churn adapters in use
                self._call("churn-use", partial(
                    client.generate, prompt_token_ids=PROMPTS[i], adapter_id=f"churn/c{rng.randrange(3)}", max_new_tokens=8,
                    timeout=30,
                ))

    def churn(self, client: Client) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.wait(rng.uniform(0.2, 1.0)):
            slot = f"churn/c{rng.randrange(3)}"
            src = self.demo / "adapters" / rng.choice(STABLE)
            action = rng.choice(["load", "reload", "unload", "force", "upload", "upload-cut", "corrupt", "delete"])
            self.events[f"churn:{action}"] += 1
            target = self.root / slot
            if action in ("load", "reload"):
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(src, target)
                self._call("load", partial(client.load_adapter, slot, slot))
            elif action in ("unload", "force"):
                self._call("unload", partial(client.unload_adapter, slot, force=action == "force", timeout=30))
            elif action == "upload":
                self._call("upload", partial(client.upload_adapter, slot, src))
            elif action == "upload-cut":  # the client goes away mid-stream
                self._call("upload-cut", partial(client.upload_adapter, slot, src, chunk_size=512, timeout=0.05))
            elif action == "corrupt" and (target / "adapter_model.safetensors").exists():
                data = (target / "adapter_model.safetensors").read_bytes()
                (target / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
            elif action == "delete":
                shutil.rmtree(target, ignore_errors=True)

    def killer(self) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.wait(rng.uniform(1.0, 4.0)):
            self.running.wait()
            proc = subprocess.Popen(
                [sys.executable, "-c", KILLED_CLIENT, self.address, rng.choice([*STABLE, ""])],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            proc.stdout.readline()  # streaming
            time.sleep(rng.uniform(0.0, 0.5))
            proc.kill()
            proc.wait()
            self.events["clients killed"] += 1

    # -- checks ------------------------------------------------------------------------------

    def sample(self) -> dict[str, float]:
        m = self.server.metrics()
        return {
            "t": time.monotonic() - self.started,
            "rss_mib": self.server.rss_mib(),
            "running": m.get("loraplex_requests_running", -1),
            "waiting": m.get("loraplex_requests_waiting", -1),
            "kv_used": m.get("loraplex_kv_blocks_used", -1),
            "slot_refs": m.get("loraplex_adapter_slot_references", -1),
            "holders": m.get("loraplex_adapter_holders", -1),
            "host_bytes": m.get('loraplex_adapter_store_bytes{tier="host"}', -1),
            "host_budget": m.get('loraplex_adapter_store_budget_bytes{tier="host"}', -1),
            "requests_total": sum(v for k, v in m.items() if k.startswith("loraplex_requests_total")),
        }

    def checkpoint(self, timeout: float = 60.0) -> dict[str, float]:
        """Pause the workload, let it drain, and require an idle server."""
        self.running.clear()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        while True:  # the server finishes cancelled requests at its next step
            s = self.sample()
            idle = (s["running"], s["waiting"], s["kv_used"], s["slot_refs"], s["holders"]) == (0, 0, 0, 0, 0)
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not idle:
            self._violate(f"not idle at a checkpoint: {s}")
        if s["host_bytes"] > s["host_budget"]:
            self._violate(f"host bytes {s['host_bytes']} over the budget {s['host_budget']}")
        self.events["checkpoints"] += 1
        self.running.set()
        return s


def _slope(points: list[tuple[float, float]]) -> float:
    if len({x for x, _ in points}) < 2:
        return 0.0
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


def _plot(samples: list[dict[str, float]], latencies: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot([s["t"] for s in samples], [s["rss_mib"] for s in samples])
    top.set_ylabel("server RSS (MiB)")
    bottom.scatter([t for t, _ in latencies], [s * 1000 for _, s in latencies], s=3)
    bottom.set_ylabel("greedy unary latency (ms)")
    bottom.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of workload (default 120)")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inject-leak", action="store_true", help="a server that leaks a slot reference now and then")
    parser.add_argument("--out", default=str(RESULTS / "soak"), help="report path without extension")
    args = parser.parse_args(argv)

    from loraplex.model.demo import demo_dir, make_demo

    demo = make_demo(demo_dir())
    work = Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    root = work / "adapters"
    for name in STABLE:
        shutil.copytree(demo / "adapters" / name, root / name)
    server = Server(root, work / "server.log", args.inject_leak)
    soak = Soak(server, root, demo, args.seed)
    samples: list[dict[str, float]] = []
    exit_code = None
    try:
        with Client(soak.address, timeout=120) as client:
            while not client.health(timeout=1.0):
                time.sleep(0.2)
            soak.max_model_len = client.model_info().max_model_len
            soak.take_references(client)
            soak.started = time.monotonic()
            threads = [threading.Thread(target=soak.worker, args=(client,), daemon=True) for _ in range(args.workers)]
            threads += [threading.Thread(target=soak.churn, args=(client,), daemon=True), threading.Thread(target=soak.killer, daemon=True)]
            for t in threads:
                t.start()
            end, next_checkpoint = soak.started + args.duration, soak.started + args.checkpoint_every
            while time.monotonic() < end:
                time.sleep(min(3.0, max(0.0, end - time.monotonic())))
                if time.monotonic() >= next_checkpoint:
                    samples.append(soak.checkpoint())
                    next_checkpoint += args.checkpoint_every
                else:
                    samples.append(soak.sample())
            soak.stop.set()
            soak.running.set()
            for t in threads:
                t.join(120)
            samples.append(soak.checkpoint())
    finally:
        exit_code = server.stop() if server.proc.poll() is None else server.proc.returncode
    if exit_code != 0:
        soak._violate(f"the server exited {exit_code} on SIGTERM")

    warm = [(s["t"], s["rss_mib"]) for s in samples if s["t"] > 0.2 * args.duration]
    calls = sum(soak.outcomes.values())
    report = {
        "duration_s": args.duration,
        "workers": args.workers,
        "calls": calls,
        "outcomes": dict(sorted(soak.outcomes.items())),
        "events": dict(sorted(soak.events.items())),
        "server_requests_total": samples[-1]["requests_total"],
        "rss_mib_start_end": [samples[0]["rss_mib"], samples[-1]["rss_mib"]],
        "rss_slope_mib_per_hour": _slope(warm) * 3600,
        "greedy_p50_ms": 1000 * sorted(s for _, s in soak.latencies)[len(soak.latencies) // 2] if soak.latencies else None,
        "violations": soak.violations,
        "samples": samples,
        "inject_leak": args.inject_leak,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    _plot(samples, soak.latencies, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if soak.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
