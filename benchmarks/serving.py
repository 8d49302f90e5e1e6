"""What server_bench drives: a real `loraplex serve` subprocess, N concurrent SDK streams, and the
machine's memory bandwidth.

    ServerProcess(args) ── start() ──> `loraplex serve ... --port 0 --http-port 0` (log to a file; the port
                                        from its "listening on" line; returns at "ready")
    stream_load(address, plan)  ──> N asyncio tasks, one AsyncClient stream per request, each
                                    task's requests one after another (a closed loop of N)
    memory_bandwidth()          ──> bytes moved per second by a large torch copy (read + write)
    cpu_seconds(pid)            ──> CPU time (user + system, all threads) a process has used

CPU time is what the load cost, whatever else the machine ran meanwhile: on a shared machine
its ratios hold up where wall-clock ratios do not.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex_client import AsyncClient

LISTENING = re.compile(r"listening on [^\s:]+:(\d+)")


class ServerProcess:
    """`loraplex serve` with the given flags on 127.0.0.1 and an OS-chosen port."""

    def __init__(self, flags: list[str], label: str) -> None:
        self.flags = flags
        self.label = label
        self.log_path = Path(tempfile.mkdtemp(prefix="loraplex-bench-")) / f"{label}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout: float = 600.0) -> str:
        exe = Path(sys.executable).parent / "loraplex"
        cmd = [str(exe), "serve", *self.flags, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if (m := LISTENING.search(text)) is not None:
                self.address = f"127.0.0.1:{m.group(1)}"
            if self.address and re.search(r"\bready\b", text):
                return self.address
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.label} exited ({self.proc.returncode}):\n{text[-3000:]}")
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server {self.label} not ready in {timeout:.0f}s; log: {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    adapter_id: str | None
    max_new_tokens: int


@dataclass
class LoadResult:
    tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


async def _stream_all(address: str, plan: list[list[Request]], timeout: float) -> LoadResult:
    async with AsyncClient(address, timeout=timeout) as client:
        async def one_stream(requests: list[Request]) -> int:
            count = 0
            for r in requests:
                stream = client.generate_stream(
                    prompt_token_ids=r.prompt_token_ids, adapter_id=r.adapter_id, max_new_tokens=r.max_new_tokens,
                    ignore_eos=True,
                )
                async for chunk in stream:
                    count += len(chunk.token_ids)
            return count

        start = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(requests) for requests in plan))
        return LoadResult(sum(counts), time.perf_counter() - start)


def stream_load(address: str, plan: list[list[Request]], timeout: float = 900.0) -> LoadResult:
    """Run `plan` (one list of requests per concurrent stream) through the SDK; tokens received / wall."""
    return asyncio.run(_stream_all(address, plan, timeout))


def memory_bandwidth(mib: int = 512, trials: int = 7) -> float:
    """Bytes per second a large torch copy moves (read + write), median of `trials`; on a
    thread of its own, as the engine's ops run in the server (see harness.run_on_thread)."""
    times: list[float] = []

    def copies() -> None:
        src = torch.ones(mib * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        for _ in range(trials):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)

    thread = threading.Thread(target=copies, name="bandwidth")
    thread.start()
    thread.join()
    return 2 * (mib * 2**20) / statistics.median(times)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system, every thread) used so far by process `pid` (None: this one)."""
    fields = Path(f"/proc/{pid or 'self'}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK
