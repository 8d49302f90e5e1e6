"""The scheduler: which requests run in the next step, and how many tokens each computes.

No torch here. Prefill and decode are one thing: a request computes the tokens between
`num_computed_tokens` and `num_tokens` (its whole prompt, a chunk of it, or the one token
it sampled last step), so prefills and decodes of different requests share a step.

Who calls what (all on the engine thread, from Engine):
  add(request)            a validated request enters the waiting queue
  schedule()              start of every step; returns the step's batch
  finish(request, status) postprocess (stop, length), abort (cancel, deadline, unload), or
                          error; frees its KV blocks and its adapter-slot reference
  record_loads()          end of every step: the per-tenant snapshot metrics read

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

Between tenants (fair_share.py): admission takes the waiting request of the backlogged tenant
with the least weighted service so far (VTC), or the first in the queue (FCFS); a request's
`priority` orders it among its own tenant's requests only; preemption takes from the tenant
with the most service first. Each step's tokens are charged to their tenants as scheduled.
A tenant whose adapter is loading keeps its place: admission moves on to the next request,
and the tenant is first again once its adapter is ready.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from loraplex.config import SchedulerConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.fair_share import FairShare, TenantLoad
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
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Request] = deque()  # arrival order, preempted requests first
        self.running: list[Request] = []
        self.fair = FairShare(config.fairness)
        self.tenant_loads: dict[str, TenantLoad] = {}  # per tenant after the last step, for metrics

    # -- queue -------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.fair.arrive(request, self.waiting, self.running)
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

        # 1. Running requests first: they hold KV blocks and adapter slots already. The ones
        # scheduled so far are always running[:len(batch)], also after a preemption.
        while len(batch) < len(self.running) and budget > 0:
            request = self.running[len(batch)]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            made, refunded = self._make_room(request, n, batch)
            budget += refunded
            if not made:
                continue  # `request` itself was preempted
            self.blocks.allocate(request, n)
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            budget -= n
        for request, n in zip(batch.requests, batch.num_new_tokens):
            self.fair.charge(request, n)  # once the running batch is final

        # 2. Waiting requests, oldest first, skipping those whose adapter is not ready.
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _make_room(self, request: Request, num_new_tokens: int, batch: ScheduledBatch) -> tuple[bool, int]:
        """Preempt running requests (fair_share.victim says which) until `request` gets its
        blocks. A victim already in this step's batch leaves it. Returns (False if `request`
        itself was preempted, the batch tokens given back)."""
        refunded = 0
        while not self.blocks.can_allocate(request, num_new_tokens):
            victim = self.running.pop(self.fair.victim(self.running))
            k = next((k for k, r in enumerate(batch.requests) if r is victim), None)
            if k is not None:
                del batch.requests[k]
                refunded += batch.num_new_tokens.pop(k)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is request:
                return False, refunded
        return True, refunded

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
        """Waiting requests in fair-share order (fair_share.candidates) while the step has room."""
        now = time.monotonic()
        starving = self._starving_adapter(now)
        if budget <= 0 or len(self.running) >= self.config.max_num_seqs or not self.waiting:
            return
        taken: set[int] = set()  # id() of the requests leaving the queue: admitted or failed
        for request in self.fair.candidates(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if self._waits_for_leader(request):
                continue  # it keeps its place
            # The hit is taken by allocate() below with nothing allocated in between: its
            # parked blocks cannot be evicted between the check and the allocation.
            hit = self.blocks.lookup(request)
            n = min(request.num_tokens - hit.num_tokens, budget)
            if not self.blocks.can_allocate(request, n, hit):
                break  # KV goes in admission order: stop here, the request keeps its place
            if request.adapter is not None:
                if starving is not None and request.adapter is not starving and not self.adapters.on_device(
                    request.adapter
                ):
                    continue  # leave free slots to the starving adapter
                state = self.adapters.try_acquire(request.adapter)
                if state is SlotState.NOT_READY:
                    continue  # it keeps its place; its tenant's next request may go
                if state is SlotState.FAILED:
                    request.error = self.adapters.failure(request.adapter)
                    batch.failed.append(request)
                    taken.add(id(request))
                    continue
            self.blocks.allocate(request, n, hit)
            self.fair.charge(request, n)  # computed tokens only: a cached prefix costs nothing
            taken.add(id(request))
            request.status = RequestStatus.RUNNING
            if request.scheduled_time is None:
                request.scheduled_time = now
                request.num_cached_prompt_tokens = min(hit.num_tokens, request.num_prompt_tokens)
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(n)
            budget -= n
        if taken:
            self.waiting = deque(r for r in self.waiting if id(r) not in taken)

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

    def record_loads(self) -> None:
        """Snapshot each tenant's running, waiting and service for metrics (end of a step:
        the snapshot is replaced, never changed, so other threads may read it)."""
        self.tenant_loads = self.fair.loads(self.waiting, self.running)

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
