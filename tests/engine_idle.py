"""Every engine run ends idle and within a step budget: the checks conftest.py applies to every
test (a leaked KV block, slot reference or holder fails the test that leaked it)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any


def engine_leaks(engine: Any) -> list[str]:
    """What an engine with no unfinished request still holds: each entry is a leak.

    Idle means: no live request, empty scheduler queues, every KV block free, and no adapter
    version with a device-slot reference or a holder (the counts a leak would grow).
    """
    problems = []
    if engine.has_unfinished():
        problems.append(f"{engine.num_unfinished} live requests")
    scheduler = engine.scheduler
    if scheduler.running or scheduler.waiting:
        problems.append(f"scheduler holds {len(scheduler.running)} running, {len(scheduler.waiting)} waiting")
    blocks = engine.blocks
    if blocks.num_free_blocks != blocks.num_blocks:
        problems.append(f"{blocks.num_blocks - blocks.num_free_blocks} of {blocks.num_blocks} KV blocks not free")
    store = engine.store
    with store._lock:
        versions = list(store._versions.values()) + [v for v in store.device_versions() if v is not None]
    for version in {id(v): v for v in versions}.values():
        if version.slot_refs or version.holders:
            problems.append(f"adapter {version.key}: {version.slot_refs} slot references, {version.holders} holders")
    snap = engine.stats()
    if (snap.running, snap.waiting, snap.adapters.slot_refs, snap.adapters.holders) != (0, 0, 0, 0):
        problems.append(f"stats() not idle: {snap}")
    return problems


def assert_engine_idle(engine: Any) -> None:
    """The invariant after every engine run: nothing held once nothing runs."""
    problems = engine_leaks(engine)
    assert not problems, "engine not idle after its run: " + "; ".join(problems)


def wait_idle(engine: Any, timeout: float = 10.0) -> None:
    """Wait until a server's engine has no unfinished request (its own thread runs the steps),
    then check that it holds nothing."""
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished(), f"{engine.num_unfinished} requests still live after {timeout}s"
    # The engine thread finishes a request (remove) before its step returns; give it that step.
    while engine_leaks(engine) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_engine_idle(engine)


ENGINES: weakref.WeakSet[Any] = weakref.WeakSet()  # every Engine made in this session
IDLE_STEPS_BUDGET = 3000  # steps that run nothing (adapters loading) per generate(): ~30 s of waits


class StepBudgetExceeded(AssertionError):
    pass


def step_budget(requests: int, tokens: int) -> int:
    """Steps a whole run may take: every token computed alone, each request preempted 3 times."""
    return 4 * (tokens + requests) + 100


def _checked_generate(original: Callable[..., Any]) -> Callable[..., Any]:
    """offline.generate with a step budget (a bug fails fast, not at the timeout) and the idle check."""

    def generate(engine: Any, prompts: Any, params: Any = None, adapter_ids: Any = None) -> Any:
        from loraplex.engine.request import SamplingParams

        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        tokens = sum(len(p.encode() if isinstance(p, str) else p) + q.max_new_tokens for p, q in zip(prompts, params_list))
        budget, idle_budget = step_budget(len(prompts), tokens), IDLE_STEPS_BUDGET
        counts = {"steps": 0, "idle": 0}
        step = engine.step

        def budgeted_step() -> Any:
            outputs = step()
            counts["steps"] += 1
            if engine.last_step is not None and not engine.last_step.num_requests:
                counts["idle"] += 1
            if counts["steps"] - counts["idle"] > budget or counts["idle"] > idle_budget:
                raise StepBudgetExceeded(
                    f"generate() of {len(prompts)} requests ({tokens} tokens) ran {counts['steps']} steps "
                    f"({counts['idle']} idle) without finishing: budget {budget} (+{idle_budget} idle); "
                    f"leaks: {engine_leaks(engine)}"
                )
            return outputs

        engine.step = budgeted_step
        try:
            results = original(engine, prompts, params, adapter_ids)
        finally:
            del engine.step
        assert_engine_idle(engine)
        return results

    return generate
