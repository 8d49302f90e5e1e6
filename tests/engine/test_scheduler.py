"""The scheduler with fake adapter slots: no torch, no model."""

from __future__ import annotations

import time

from loraplex.config import SchedulerConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.request import Request, RequestStatus, SamplingParams
from loraplex.engine.scheduler import Scheduler
from loraplex.lora.slots import SlotState


class FakeAdapter:
    def __init__(self, name: str, ready: bool = True, failed: str | None = None) -> None:
        self.name, self.ready, self.failed = name, ready, failed
        self.slot: int | None = None
        self.refs = 0


class FakeSlots:
    def __init__(self, num_slots: int) -> None:
        self.slots: list[FakeAdapter | None] = [None] * num_slots

    def try_acquire(self, adapter: object) -> SlotState:
        assert isinstance(adapter, FakeAdapter)
        if adapter.failed:
            return SlotState.FAILED
        if not adapter.ready:
            return SlotState.NOT_READY
        if adapter.slot is None:
            free = [i for i, a in enumerate(self.slots) if a is None or a.refs == 0]
            if not free:
                return SlotState.NOT_READY
            old = self.slots[free[0]]
            if old is not None:
                old.slot = None
            self.slots[free[0]] = adapter
            adapter.slot = free[0]
        adapter.refs += 1
        return SlotState.ACQUIRED

    def release(self, adapter: object) -> None:
        assert isinstance(adapter, FakeAdapter)
        adapter.refs -= 1
        assert adapter.refs >= 0

    def failure(self, adapter: object) -> str:
        return str(getattr(adapter, "failed", ""))

    def on_device(self, adapter: object) -> bool:
        return getattr(adapter, "slot", None) is not None

    def loaded(self, adapter: object) -> bool:
        return bool(getattr(adapter, "ready", False))


def _scheduler(num_blocks: int = 100, slots: int = 2, **config: object) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, 4), FakeSlots(slots))  # type: ignore[arg-type]


def _request(rid: str, n_prompt: int = 8, adapter: FakeAdapter | None = None) -> Request:
    return Request(rid, list(range(n_prompt)), SamplingParams(max_new_tokens=4), adapter=adapter)


def _run(s: Scheduler) -> list[tuple[str, int]]:
    batch = s.schedule()
    for r, n in zip(batch.requests, batch.num_new_tokens):
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(0)
    return [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)]


def test_prefill_and_decode_share_a_step() -> None:
    s = _scheduler()
    s.add(_request("a"))
    assert _run(s) == [("a", 8)]
    s.add(_request("b", 5))
    assert _run(s) == [("a", 1), ("b", 5)]


def test_token_budget_chunks_prompts() -> None:
    s = _scheduler(max_num_batched_tokens=6)
    s.add(_request("a", 10))
    s.add(_request("b", 3))
    assert _run(s) == [("a", 6)]
    assert _run(s) == [("a", 4), ("b", 2)]
    assert _run(s) == [("a", 1), ("b", 1)]


def test_max_num_seqs() -> None:
    s = _scheduler(max_num_seqs=2)
    for rid in "abc":
        s.add(_request(rid))
    assert [rid for rid, _ in _run(s)] == ["a", "b"]
    s.finish(s.running[0], RequestStatus.FINISHED_STOPPED)
    assert [rid for rid, _ in _run(s)] == ["b", "c"]


def test_adapter_not_ready_does_not_block_others() -> None:
    s = _scheduler()
    slow = FakeAdapter("slow", ready=False)
    s.add(_request("a", adapter=slow))
    s.add(_request("base"))
    s.add(_request("b", adapter=FakeAdapter("fast")))
    assert [rid for rid, _ in _run(s)] == ["base", "b"]
    slow.ready = True
    assert "a" in [rid for rid, _ in _run(s)]


def test_distinct_adapters_never_exceed_slots() -> None:
    s = _scheduler(slots=2)
    adapters = [FakeAdapter(f"x{i}") for i in range(4)]
    for i, adapter in enumerate(adapters):
        s.add(_request(f"r{i}", adapter=adapter))
    ran = [rid for rid, _ in _run(s)]
    assert ran == ["r0", "r1"]
    assert {a.slot for a in adapters[:2]} == {0, 1}
    s.finish(s.running[0], RequestStatus.FINISHED_STOPPED)
    assert [rid for rid, _ in _run(s)] == ["r1", "r2"]
    assert adapters[0].refs == 0 and adapters[2].slot == 0


def test_failed_adapter_ends_its_request() -> None:
    s = _scheduler()
    s.add(_request("a", adapter=FakeAdapter("bad", failed="boom")))
    batch = s.schedule()
    assert [r.request_id for r in batch.failed] == ["a"] and batch.failed[0].error == "boom"


def test_preemption_frees_blocks_and_slot_and_requeues_first() -> None:
    s = _scheduler(num_blocks=4)  # 16 tokens of KV
    adapter = FakeAdapter("x")
    a, b = _request("a", 7), _request("b", 7, adapter=adapter)
    s.add(a)
    s.add(b)
    _run(s)  # a: 7 (2 blocks), b: 7 (2 blocks)
    assert adapter.refs == 1
    # a needs a third block for its 9th token: b is preempted
    a.output_token_ids.append(0)
    batch = s.schedule()
    assert [r.request_id for r in batch.preempted] == ["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert s.waiting[0] is b and b.num_preemptions == 1
    assert adapter.refs == 0  # a preempted request gives its slot back: the slot can be evicted again
    s.finish(a, RequestStatus.FINISHED_STOPPED)
    assert [rid for rid, _ in _run(s)] == ["b"] and adapter.refs == 1  # resumed: one reference again
    s.finish(b, RequestStatus.FINISHED_STOPPED)
    assert adapter.refs == 0 and s.blocks.num_free_blocks == 4


def test_aging_reserves_slots_for_a_starving_adapter() -> None:
    s = _scheduler(slots=1, adapter_aging_s=0.0)
    hot, cold = FakeAdapter("hot"), FakeAdapter("cold")
    s.add(_request("h1", adapter=hot))
    _run(s)
    cold_request = _request("c", adapter=cold)
    cold_request.arrival_time = time.monotonic() - 10
    s.add(cold_request)
    s.add(_request("h2", adapter=hot))
    # hot is on the device: h2 may still run with it; cold waits for the slot.
    assert "h2" in [rid for rid, _ in _run(s)]
    for r in list(s.running):
        s.finish(r, RequestStatus.FINISHED_STOPPED)
    late_hot = FakeAdapter("other-hot")
    s.add(_request("h3", adapter=late_hot))
    assert [rid for rid, _ in _run(s)] == ["c"]


def test_abort_and_finish_release_everything() -> None:
    s = _scheduler()
    adapter = FakeAdapter("x")
    s.add(_request("a", adapter=adapter))
    s.add(_request("b"))
    _run(s)
    assert adapter.refs == 1
    aborted = next(r for r in s.running if r.request_id == "a")
    s.finish(aborted, RequestStatus.FINISHED_ABORTED)  # a running request: blocks and slot come back
    assert aborted.status is RequestStatus.FINISHED_ABORTED
    assert adapter.refs == 0 and aborted.block_table == [] and aborted not in s.running
    waiting = _request("c")
    s.add(waiting)
    s.finish(waiting, RequestStatus.FINISHED_ABORTED)  # a waiting one leaves the queue
    assert waiting.status is RequestStatus.FINISHED_ABORTED and not s.waiting


# -- prefix caching ------------------------------------------------------------------

def _cached_request(rid: str, tokens: list[int], adapter: FakeAdapter | None = None, key: str = "base") -> Request:
    return Request(rid, list(tokens), SamplingParams(max_new_tokens=4), adapter=adapter, cache_key=key)


def _all_free(s: Scheduler) -> bool:
    return s.blocks.num_free_blocks == s.blocks.num_blocks and all(
        s.blocks.ref_count(b) == 0 for b in range(s.blocks.num_blocks)
    )


def test_a_cached_prefix_is_skipped_and_costs_no_token_budget() -> None:
    s = _scheduler(max_num_batched_tokens=8)
    first = _cached_request("first", list(range(12)))
    s.add(first)
    assert _run(s) == [("first", 8)]
    assert _run(s) == [("first", 4)]
    s.add(_cached_request("second", [*range(12), 40, 41]))
    # first's 3 full blocks are cached now; second computes only its last 2 tokens.
    assert _run(s) == [("first", 1), ("second", 2)]
    second = s.running[1]
    assert second.block_table[:3] == first.block_table[:3] and second.num_cached_prompt_tokens == 12
    for r in list(s.running):
        s.finish(r, RequestStatus.FINISHED_STOPPED)
    assert _all_free(s)


def test_chunked_prefill_continues_after_a_hit() -> None:
    s = _scheduler(max_num_batched_tokens=4)
    s.add(_cached_request("a", list(range(9))))
    for _ in range(3):
        _run(s)
    s.add(_cached_request("b", [*range(8), *range(50, 58)]))
    assert _run(s) == [("a", 1), ("b", 3)]  # b: hit 8, then its 8 own tokens in chunks
    assert _run(s) == [("a", 1), ("b", 3)]
    assert _run(s) == [("a", 1), ("b", 2)]


def test_the_same_tokens_under_another_adapter_are_not_hit() -> None:
    s = _scheduler()
    x, y = FakeAdapter("x"), FakeAdapter("y")
    s.add(_cached_request("on-x", list(range(12)), x, key="adapter:x@1"))
    _run(s)
    s.add(_cached_request("on-y", list(range(12)), y, key="adapter:y@1"))
    s.add(_cached_request("on-base", list(range(12))))
    s.add(_cached_request("on-x-v2", list(range(12)), x, key="adapter:x@2"))
    assert _run(s) == [("on-x", 1), ("on-y", 12), ("on-base", 12), ("on-x-v2", 12)]
    assert s.blocks.num_hit_tokens == 0


def test_preempting_a_request_that_shares_blocks_keeps_the_other_whole() -> None:
    s = _scheduler(num_blocks=6)
    a = _cached_request("a", list(range(8)))
    s.add(a)
    _run(s)
    b = _cached_request("b", [*range(8), 9, 9, 9])  # shares a's two blocks
    s.add(b)
    assert _run(s) == [("a", 1), ("b", 3)]
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared and [s.blocks.ref_count(x) for x in shared] == [2, 2]
    # Fill the cache: a grows until b (newest) is preempted.
    preempted: list[str] = []
    while not preempted:
        a.output_token_ids.append(0)
        batch = s.schedule()
        preempted = [r.request_id for r in batch.preempted]
        for r, n in zip(batch.requests, batch.num_new_tokens):
            r.num_computed_tokens += n
    assert preempted == ["b"] and b.block_table == [] and [s.blocks.ref_count(x) for x in shared] == [1, 1]
    s.finish(a, RequestStatus.FINISHED_STOPPED)
    # b resumes from the cache: a's blocks of b's prefix are still parked.
    assert _run(s) == [("b", 4)]  # 12 tokens (11 + 1 generated), 8 of them cached
    assert b.block_table[:2] == shared and b.num_preemptions == 1
    s.finish(b, RequestStatus.FINISHED_STOPPED)
    assert _all_free(s)


def _samples(rid: str, tokens: list[int], n: int) -> list[Request]:
    samples = [_cached_request(rid, tokens) for _ in range(n)]
    for i, sample in enumerate(samples):
        sample.index, sample.leader = i, samples[0] if i else None
    return samples


def test_samples_of_one_prompt_share_its_blocks() -> None:
    s = _scheduler()
    samples = _samples("r", list(range(10)), 3)
    for sample in samples:
        s.add(sample)
    assert _run(s) == [("r", 10)]  # the others wait for sample 0's prompt blocks
    assert _run(s) == [("r", 1), ("r", 2), ("r", 2)]  # ... then compute only the partial block
    shared = samples[0].block_table[:2]
    assert all(x.block_table[:2] == shared for x in samples) and s.blocks.ref_count(shared[0]) == 3
    assert s.blocks.num_used_blocks == 2 + 3  # the prompt's full blocks once, a last block each
    assert [x.num_cached_prompt_tokens for x in samples] == [0, 8, 8]


def test_samples_of_a_short_prompt_do_not_wait() -> None:
    s = _scheduler()
    for sample in _samples("r", [1, 2, 3], 3):
        s.add(sample)
    assert _run(s) == [("r", 3)] * 3
