"""The scheduler: which requests run in the next step, and how many tokens each computes.

No torch here. Prefill and decode are one thing: a request computes the tokens between
`num_computed_tokens` and `num_tokens` (its whole prompt, a chunk of it, or the one token
it sampled last step), so prefills and decodes of different requests share a step.

Who calls what (all on the engine thread, from Engine):
  add(request)            a validated request enters the waiting queue
  schedule()              start of every step; returns the step's batch
  finish(request, status) postprocess (stop, length), abort (cancel, deadline, unload), or
                          error; frees its KV blocks and its adapter-slot reference

Prefix caching (block_manager.py, prefix_cache.py): a waiting request is admitted from the
longest run of cached full blocks of its tokens (the hit), so its first chunk starts after
them and the token budget counts only what it computes; the hit is looked up and taken in
the same admission, with no allocation in between. The samples of an n > 1 request wait
while sample 0 (their leader) computes the prompt's full blocks, then start from them: the
prompt's blocks are held once.

Bounds of one step: max_num_seqs running requests, max_num_batched_tokens tokens, the free
KV blocks, and the device adapter slots (each running request holds a reference to its
adapter's slot, so a step never needs more distinct adapters than there are slots). The slots
are reached through lora/slots.py's AdapterSlots: the scheduler never sees tensors.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from loraplex.config import SchedulerConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.request import Request, RequestStatus
from loraplex.lora.slots import AdapterSlots, SlotState


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # adapter could not be served

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        blocks: BlockManager,
        adapters: AdapterSlots,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- queue -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        for request in self.running:
            self.blocks.commit(request)  # blocks the last step filled can be hit from now on

        # 1. Running requests first: they hold KV blocks and adapter slots already.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, n, batch):
                break  # `request` itself was preempted; everything after it is gone too
            self.blocks.allocate(request, n)
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1

        # 2. Waiting requests, oldest first, skipping those whose adapter is not ready.
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _make_room(self, request: Request, num_new_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running requests until `request` gets its blocks."""
        while not self.blocks.can_allocate(request, num_new_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        # Recompute on resume: drop the KV, keep the generated tokens.
        self.blocks.free(request)
        if request.adapter is not None:
            self.adapters.release(request.adapter)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        now = time.monotonic()
        starving = self._starving_adapter(now)
        kept: deque[Request] = deque()
        while self.waiting:
            request = self.waiting.popleft()
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                kept.append(request)
                break
            if self._waits_for_leader(request):
                kept.append(request)
                continue
            # The hit is taken by allocate() below with nothing allocated in between: its
            # parked blocks cannot be evicted between the check and the allocation.
            hit = self.blocks.lookup(request)
            n = min(request.num_tokens - hit.num_tokens, budget)
            if not self.blocks.can_allocate(request, n, hit):
                kept.append(request)  # KV is first come, first served: stop here
                break
            if request.adapter is not None:
                if starving is not None and request.adapter is not starving and not self.adapters.on_device(
                    request.adapter
                ):
                    kept.append(request)  # leave free slots to the starving adapter
                    continue
                state = self.adapters.try_acquire(request.adapter)
                if state is SlotState.NOT_READY:
                    kept.append(request)
                    continue
                if state is SlotState.FAILED:
                    request.error = self.adapters.failure(request.adapter)
                    batch.failed.append(request)
                    continue
            self.blocks.allocate(request, n, hit)
            request.status = RequestStatus.RUNNING
            if request.scheduled_time is None:
                request.scheduled_time = now
                request.num_cached_prompt_tokens = min(hit.num_tokens, request.num_prompt_tokens)
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            budget -= n
        kept.extend(self.waiting)
        self.waiting = kept

    def _waits_for_leader(self, request: Request) -> bool:
        """A sample of an n > 1 request waits while sample 0 computes the prompt blocks they share."""
        leader = request.leader
        if leader is None or leader.finished:
            return False
        shared_blocks = (leader.num_prompt_tokens - 1) // self.blocks.block_size
        return shared_blocks > 0 and leader.num_computed_tokens < shared_blocks * self.blocks.block_size

    def _starving_adapter(self, now: float) -> object | None:
        """The adapter of the oldest request that has waited past the aging bound for a slot.

        Only an adapter already in host memory counts: one still loading needs host room,
        which other adapters free by moving to the device, so holding them back would deadlock.
        """
        for request in self.waiting:
            if now - request.arrival_time < self.config.adapter_aging_s:
                return None  # the queue is in arrival order (preempted ones first)
            adapter = request.adapter
            if adapter is not None and not self.adapters.on_device(adapter) and self.adapters.loaded(adapter):
                return adapter
        return None

    # -- leaving -------------------------------------------------------------------------

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Move a request to a finished state and give back its blocks and adapter slot."""
        if not status.finished:
            raise ValueError(f"finish() needs a finished status, got {status}")
        was_running = request.status is RequestStatus.RUNNING
        if was_running:
            self.running.remove(request)
            if request.adapter is not None:
                self.adapters.release(request.adapter)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request)
        self.blocks.free(request)
        request.status = status
