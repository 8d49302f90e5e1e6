"""Fair share between tenants: a virtual token counter per tenant (VTC). No torch here.

VTC ("Fairness in Serving Large Language Models", Sheng et al., OSDI 2024): each tenant's
counter is the weighted service it has received,

    counter += (PROMPT_COST x prompt tokens computed + OUTPUT_COST x tokens generated) / weight

and admission serves the backlogged tenant with the smallest counter. A tenant that becomes
active (its first live request) is lifted to the smallest counter among the backlogged
tenants, so nobody banks credit while idle; the paper bounds the difference in service
between two backlogged tenants by a constant.

Who calls what (the scheduler, on the engine thread):
  arrive(request, waiting, running)  Scheduler.add: the tenant's weight; lift a newly active tenant
  candidates(waiting)                Scheduler._admit: waiting requests in the order to try them;
                                     the tenant of each next one is chosen after the previous
                                     one was admitted (and charged), so one step interleaves tenants
  charge(request, n)                 Scheduler: the step computes n tokens of this request
  victim(running)                    Scheduler._make_room: whom to preempt for KV blocks

Within a tenant, requests go by `priority` (lower first), then queue order: a priority never
lets a tenant pass another. FCFS (`--fairness fcfs`) picks, across tenants, the request
first in the queue (with one tenant and no priorities, exactly the queue's order) and
preempts the newest running request.

Charging at schedule time counts what each step computes: a prompt chunk when it is computed
(chunked prefill charges chunk by chunk; a recomputation after preemption is not charged
again) and a generated token in the step that samples it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from loraplex.config import Fairness
from loraplex.engine.request import Request

PROMPT_COST = 1.0  # w_p: one prompt token computed
OUTPUT_COST = 2.0  # w_q: one token generated (the paper's default: an output token costs two input tokens)


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """One tenant's place in the scheduler after a step (metrics)."""

    running: int
    waiting: int
    counter: float  # weighted service received (VTC); also kept under FCFS, for comparison


class FairShare:
    def __init__(self, policy: Fairness = "vtc") -> None:
        self.policy = policy
        self.counters: dict[str, float] = {}  # tenant -> weighted service received
        self.weights: dict[str, float] = {}  # tenant -> its weight, as its latest request carried it

    # -- arrivals ----------------------------------------------------------------------

    def arrive(self, request: Request, waiting: Sequence[Request], running: Sequence[Request]) -> None:
        """A request enters the queue (before it is in `waiting`). A tenant with nothing
        waiting or running is lifted to the least counter among backlogged tenants (if
        none: the most among running ones, else among all), never lowered."""
        tenant = request.tenant
        self.weights[tenant] = request.weight
        counter = self.counters.get(tenant, 0.0)
        backlogged = {r.tenant for r in waiting}
        active = {r.tenant for r in running}
        if tenant in backlogged or tenant in active:
            self.counters[tenant] = counter
            return
        if backlogged:
            floor = min(self.counters[t] for t in backlogged)
        elif active:
            floor = max(self.counters[t] for t in active)
        else:
            floor = max(self.counters.values(), default=0.0)
        self.counters[tenant] = max(counter, floor)

    # -- service -----------------------------------------------------------------------

    def cost(self, request: Request, num_new_tokens: int) -> float:
        """The weighted service of computing `num_new_tokens` of this request now."""
        start = request.num_computed_tokens
        end = start + num_new_tokens
        prompt = max(0, min(end, request.num_prompt_tokens) - max(start, request.num_charged_prompt_tokens))
        sampled = 1 if end >= request.num_tokens else 0  # the chunk reaches the end: a token is sampled
        return (PROMPT_COST * prompt + OUTPUT_COST * sampled) / request.weight

    def charge(self, request: Request, num_new_tokens: int) -> None:
        """The step computes `num_new_tokens` of this request (called once per scheduled request)."""
        cost = self.cost(request, num_new_tokens)
        end = request.num_computed_tokens + num_new_tokens
        request.num_charged_prompt_tokens = max(request.num_charged_prompt_tokens, min(end, request.num_prompt_tokens))
        self.counters[request.tenant] = self.counters.get(request.tenant, 0.0) + cost

    # -- order -------------------------------------------------------------------------

    def candidates(self, waiting: Sequence[Request]) -> Iterator[Request]:
        """Waiting requests in the order admission should try them.

        Lazy on purpose: the tenant of each next request is chosen when it is asked for,
        after the previous one was admitted and charged.
        """
        queues: dict[str, list[tuple[int, Request]]] = {}
        for position, request in enumerate(waiting):
            queues.setdefault(request.tenant, []).append((position, request))
        for queue in queues.values():
            queue.sort(key=lambda item: item[1].priority)  # stable: queue order within a priority
            queue.reverse()  # pop() from the end takes the next one
        while queues:
            if self.policy == "vtc":
                tenant = min(queues, key=lambda t: (self.counters.get(t, 0.0), queues[t][-1][0]))
            else:
                tenant = min(queues, key=lambda t: queues[t][-1][0])
            queue = queues[tenant]
            _, request = queue.pop()
            if not queue:
                del queues[tenant]
            yield request

    def victim(self, running: Sequence[Request]) -> int:
        """The index in `running` of the request to preempt: FCFS the newest; VTC the tenant
        with the largest counter, its lowest-priority, newest request."""
        if self.policy == "fcfs":
            return len(running) - 1
        return max(
            range(len(running)),
            key=lambda i: (self.counters.get(running[i].tenant, 0.0), running[i].priority, i),
        )

    def loads(self, waiting: Sequence[Request], running: Sequence[Request]) -> dict[str, TenantLoad]:
        """Every tenant seen so far: its requests running and waiting, and its counter."""
        counts = {t: [0, 0] for t in self.counters}
        for r in running:
            counts.setdefault(r.tenant, [0, 0])[0] += 1
        for r in waiting:
            counts.setdefault(r.tenant, [0, 0])[1] += 1
        return {t: TenantLoad(run, wait, self.counters.get(t, 0.0)) for t, (run, wait) in counts.items()}
