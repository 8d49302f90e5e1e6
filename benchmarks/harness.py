"""Running a workload on an engine and timing it: prefill and decode separately.

`run` drives the engine from the calling thread; `run_on_thread` from a thread of its own, as
the server's engine loop does. The two are not the same to torch on the CPU: each thread that
runs ops gets its own OpenMP team, and GNU OpenMP spins its workers far less once a process
holds more OpenMP threads than cores (a server has the engine's team and the start-up
thread's). A comparison with the server runs the engine the server's way.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from benchmarks.workload import WorkItem
from loraplex.engine.request import SamplingParams

T = TypeVar("T")


@dataclass
class RunStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    decode_step_ms: list[float] = field(default_factory=list)
    total_tokens: int = 0
    wall_s: float = 0.0
    adapters_per_step: list[int] = field(default_factory=list)
    requests_per_step: list[int] = field(default_factory=list)
    idle_steps: int = 0  # steps that ran nothing (waiting for adapters)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def throughput(self) -> float:
        return self.total_tokens / self.wall_s if self.wall_s else 0.0

    def merge(self, other: RunStats) -> None:
        self.prefill_tokens += other.prefill_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        self.decode_step_ms += other.decode_step_ms
        self.total_tokens += other.total_tokens
        self.wall_s += other.wall_s
        self.adapters_per_step += other.adapters_per_step
        self.requests_per_step += other.requests_per_step
        self.idle_steps += other.idle_steps

    @property
    def median_decode_step_ms(self) -> float:
        return statistics.median(self.decode_step_ms) if self.decode_step_ms else 0.0


def run(engine: Any, items: Sequence[WorkItem], adapter_ids: Sequence[str], concurrency: int | None = None) -> RunStats:
    """Closed loop (at most `concurrency` in flight) or open loop (items' arrival times).

    A step that only decodes counts as decode; one that only prefills counts as prefill;
    mixed steps count toward throughput only.
    """
    stats = RunStats()
    pending = sorted(items, key=lambda it: it.arrival_s)
    open_loop = any(it.arrival_s > 0 for it in pending)
    limit = concurrency or len(pending)
    start = time.perf_counter()
    queue = list(pending)
    in_flight = 0
    while queue or engine.has_unfinished():
        now = time.perf_counter() - start
        while queue and in_flight < limit and (not open_loop or queue[0].arrival_s <= now):
            it = queue.pop(0)
            adapter = None if it.adapter is None else adapter_ids[it.adapter]
            engine.add_request(
                None, SamplingParams(max_new_tokens=it.max_new_tokens, ignore_eos=True), adapter,
                prompt_token_ids=it.prompt_token_ids,
            )
            in_flight += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(0.01, queue[0].arrival_s - now)) if queue else 0)
            continue
        outputs = engine.step()
        step = engine.last_step
        if step.num_requests == 0:
            stats.idle_steps += 1
            engine.wait_for_work(0.002)  # adapters loading
        else:
            stats.requests_per_step.append(step.num_requests)
        stats.total_tokens += sum(len(o.new_token_ids) for o in outputs)
        if step.pure_decode:
            stats.decode_tokens += step.num_tokens
            stats.decode_s += step.duration_s
            stats.decode_step_ms.append(step.duration_s * 1e3)
            stats.adapters_per_step.append(step.num_adapters)
        elif step.pure_prefill:
            stats.prefill_tokens += step.num_tokens
            stats.prefill_s += step.duration_s
        in_flight -= sum(1 for o in outputs if o.finished)
        for o in outputs:
            if o.finish_reason == "error":
                raise RuntimeError(o.error)
    stats.wall_s = time.perf_counter() - start
    return stats


def on_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread of its own (as the server's engine loop), joined before returning;
    its exception re-raised here."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    thread = threading.Thread(target=target, name="engine-bench")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def run_on_thread(engine: Any, items: Sequence[WorkItem], adapter_ids: Sequence[str], concurrency: int | None = None) -> RunStats:
    """`run` on a thread of its own (as the server's engine loop), joined before returning."""
    return on_thread(lambda: run(engine, items, adapter_ids, concurrency))
