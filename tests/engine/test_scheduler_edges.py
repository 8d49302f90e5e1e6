"""The scheduler's edges that mutation testing (make mutants) found untested, with the fake
slots of test_scheduler.py (no torch, no model): the aging guard's choice of adapter, a victim
leaving the step's batch and giving its tokens back, a request that preempts itself, the token
budget's edges, and the queue after admission stops or an adapter fails."""

from __future__ import annotations

import dataclasses
import time

import pytest
from test_scheduler import FakeAdapter, _request, _run, _samples, _scheduler

from loraplex.engine.request import Request, RequestStatus, SamplingParams
from loraplex.engine.scheduler import Scheduler


def _tenant_request(rid: str, n_prompt: int, tenant: str, adapter: FakeAdapter | None = None, priority: int = 0) -> Request:
    return Request(rid, list(range(n_prompt)), SamplingParams(max_new_tokens=4), adapter=adapter, tenant=tenant, priority=priority)


def _with_budget(s: Scheduler, tokens: int) -> None:
    s.config = dataclasses.replace(s.config, max_num_batched_tokens=tokens)


def test_a_free_slot_goes_to_the_starving_adapter_not_to_a_newer_one() -> None:
    s = _scheduler(slots=2, adapter_aging_s=5.0)
    hot, cold, newer = FakeAdapter("hot"), FakeAdapter("cold"), FakeAdapter("newer")
    s.add(_request("h1", adapter=hot))
    _run(s)  # hot holds slot 0; slot 1 is free
    old = _request("c", adapter=cold)
    old.arrival_time = time.monotonic() - 10  # waited past the aging bound
    s.add(old)
    s.add(Request("x", list(range(8)), SamplingParams(max_new_tokens=4), adapter=newer, priority=-5))  # tried first
    assert [rid for rid, _ in _run(s)] == ["h1", "c"]
    assert newer.slot is None and cold.slot == 1
    assert [r.request_id for r in s.waiting] == ["x"]


def test_an_old_request_whose_adapter_is_on_device_or_loading_holds_no_slot_back() -> None:
    for old_adapter in (FakeAdapter("hot"), FakeAdapter("loading", ready=False)):
        s = _scheduler(slots=2, adapter_aging_s=5.0)
        hot = old_adapter if old_adapter.ready else FakeAdapter("hot")
        s.add(_request("h1", adapter=hot))
        _run(s)
        old = _request("old", adapter=old_adapter)
        old.arrival_time = time.monotonic() - 10
        s.add(old)
        newer = FakeAdapter("newer")
        s.add(Request("x", list(range(8)), SamplingParams(max_new_tokens=4), adapter=newer, priority=-5))
        ran = [rid for rid, _ in _run(s)]
        assert "x" in ran and newer.slot == 1, old_adapter.name  # nothing to wait for: the slot is used


def test_a_victim_in_this_steps_batch_leaves_it_and_gives_its_tokens_back() -> None:
    s = _scheduler(num_blocks=4)
    a = _tenant_request("a", 6, "big")  # 2 blocks; its 7th token fits in them
    b = _tenant_request("b", 4, "small")  # 1 block; its 5th token needs a 2nd
    c = _tenant_request("c", 1, "tiny")  # 1 block
    for r in (a, b, c):
        s.add(r)
    _run(s)
    assert s.blocks.num_free_blocks == 0 and [r.request_id for r in s.running] == ["a", "b", "c"]
    _with_budget(s, 2)
    batch = s.schedule()  # a (1 token) is in the batch when b needs a block: a's tenant has had most
    assert [r.request_id for r in batch.preempted] == ["a"]
    assert [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)] == [("b", 1), ("c", 1)]
    assert a.status is RequestStatus.WAITING and s.waiting[0] is a and a.num_preemptions == 1


def test_a_request_that_must_preempt_itself_lets_the_others_run() -> None:
    s = _scheduler(num_blocks=4)
    a = _tenant_request("a", 1, "t1")
    b = _tenant_request("b", 8, "t2")  # 2 full blocks: its 9th token needs a 3rd
    c = _tenant_request("c", 1, "t3")
    for r in (a, b, c):
        s.add(r)
    _run(s)
    batch = s.schedule()
    assert [r.request_id for r in batch.preempted] == ["b"]
    assert [r.request_id for r in batch.requests] == ["a", "c"]
    assert b.block_table == [] and s.blocks.num_used_blocks == 2


def test_the_token_budget_is_spent_exactly() -> None:
    s = _scheduler(max_num_batched_tokens=1)
    s.add(_request("a", 1))
    assert _run(s) == [("a", 1)]  # a budget of one token admits a one-token prompt
    s.add(_request("b", 1))
    assert _run(s) == [("a", 1)]  # and then runs only the first running request
    assert s.has_unfinished() and s.num_unfinished == 2
    _with_budget(s, 2)
    assert _run(s) == [("a", 1), ("b", 1)]
    _with_budget(s, 1)
    assert _run(s) == [("a", 1)]  # b is not scheduled with 0 tokens


def test_admission_stopped_by_kv_leaves_the_queue_right() -> None:
    s = _scheduler(num_blocks=2)
    a, b = _request("a", 8), _request("b", 4)
    s.add(a)
    assert a.status is RequestStatus.WAITING
    s.add(b)
    assert _run(s) == [("a", 8)]
    assert list(s.waiting) == [b] and a.status is RequestStatus.RUNNING
    assert a.scheduled_time is not None and a.scheduled_time >= a.arrival_time


def test_a_failed_adapter_leaves_the_queue_and_the_next_request_runs() -> None:
    s = _scheduler()
    s.add(_request("bad", adapter=FakeAdapter("bad", failed="boom")))
    s.add(_request("ok"))
    batch = s.schedule()
    assert [r.request_id for r in batch.failed] == ["bad"] and [r.request_id for r in batch.requests] == ["ok"]
    assert list(s.waiting) == []


def test_a_sample_waiting_for_its_leader_lets_later_requests_in() -> None:
    s = _scheduler()
    for sample in _samples("r", list(range(10)), 2):
        s.add(sample)
    s.add(_request("later", 3))
    assert _run(s) == [("r", 10), ("later", 3)]


def test_finish_needs_a_finished_status_and_tolerates_a_request_not_queued() -> None:
    s = _scheduler()
    r = _request("a")
    with pytest.raises(ValueError, match="finish\\(\\) needs a finished status"):
        s.finish(r, RequestStatus.RUNNING)
    s.finish(r, RequestStatus.FINISHED_ABORTED)  # never added: nothing to remove, no error
    assert r.status is RequestStatus.FINISHED_ABORTED and not s.has_unfinished()


def test_samples_wait_for_exactly_the_blocks_they_share() -> None:
    s = _scheduler()  # block size 4
    for sample in _samples("r", list(range(5)), 2):  # 1 shared block: its 4 tokens
        s.add(sample)
    assert _run(s) == [("r", 5)]
    s = _scheduler(max_num_batched_tokens=4)
    for sample in _samples("r", list(range(5)), 2):
        s.add(sample)
    assert _run(s) == [("r", 4)]  # the shared block is computed: the sample may start
    assert _run(s) == [("r", 1), ("r", 1)]
    s = _scheduler(max_num_batched_tokens=5)
    for sample in _samples("r", list(range(9)), 2):  # 2 shared blocks: 8 tokens
        s.add(sample)
    assert _run(s) == [("r", 5)]
    assert _run(s) == [("r", 4)]  # 5 of 8 computed when this step was planned: the sample waits
    assert _run(s) == [("r", 1), ("r", 1)]


def test_tenant_loads_are_recorded_per_tenant() -> None:
    s = _scheduler(max_num_seqs=1)
    assert s.tenant_loads == {}
    s.add(_tenant_request("a", 4, "acme"))
    s.add(_tenant_request("b", 4, "beta"))
    _run(s)
    s.record_loads()
    loads = s.tenant_loads
    assert (loads["acme"].running, loads["acme"].waiting) == (1, 0)
    assert (loads["beta"].running, loads["beta"].waiting) == (0, 1)


def test_each_preemption_is_counted() -> None:
    s = _scheduler(num_blocks=2)  # 8 tokens of KV
    x, y = _tenant_request("x", 4, "t1"), _tenant_request("y", 4, "t2")
    s.add(x)
    s.add(y)
    _run(s)  # one block each, full
    batch = s.schedule()  # x's 5th token needs a block: y (newest of the tied tenants) goes
    assert [r.request_id for r in batch.preempted] == ["y"] and y.num_preemptions == 1
    s.finish(x, RequestStatus.FINISHED_STOPPED)
    for _ in range(8):  # y comes back (its 4 + 1 tokens recomputed), then grows past 8 tokens
        batch = s.schedule()
        if batch.preempted:
            break
        for r, n in zip(batch.requests, batch.num_new_tokens):
            r.num_computed_tokens += n
            if r.num_computed_tokens == r.num_tokens:
                r.output_token_ids.append(0)
    assert [r.request_id for r in batch.preempted] == ["y"] and y.num_preemptions == 2
