"""Per-tenant limits on requests in flight and tokens per minute. No grpc, no torch.

    EngineLoop.stream ── admit(tenant) ... release(tenant)   (in a finally: every way a stream ends)
    EngineLoop._dispatch ── charge(tenant, tokens)            (generated tokens as they come out,
                                                               prompt tokens with the final output)

- max_requests: requests admitted and not yet ended, per tenant.
- tokens_per_minute: a sliding window of the last 60 seconds over prompt + generated tokens.
  A request is admitted while the window holds fewer tokens than the limit; the tokens it
  then uses count as they are produced, so one request may take the window past the limit
  and the next ones wait until enough of it has slid out (that time is the retry delay).
  The window keeps one bucket per second, so its memory is bounded.
- max_adapters (registered ids in the tenant's own namespaces) is checked where adapters are
  registered (access.py), under `registering(name)` so that two loads cannot both take the
  last place.

State is keyed by tenant name and kept across tenants-file reloads; the limits come from the
caller's Tenant, as the table had it when the call began.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.api.auth import AccessError, Caller, Outcome

WINDOW_S = 60.0
MAX_REQUESTS_RETRY_S = 1.0  # a hint: requests of this tenant are running and will end


@dataclass
class _Usage:
    in_flight: int = 0
    window: deque[list[int]] = field(default_factory=deque)  # [second, tokens], oldest first
    window_tokens: int = 0


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}
        self._registering: dict[str, threading.Lock] = {}

    def _of(self, name: str) -> _Usage:
        usage = self._usage.get(name)
        if usage is None:
            usage = self._usage[name] = _Usage()
        return usage

    def _slide(self, usage: _Usage, now: float) -> None:
        while usage.window and usage.window[0][0] <= now - WINDOW_S:
            usage.window_tokens -= usage.window.popleft()[1]

    def admit(self, caller: Caller) -> None:
        """Count a new request in flight, or raise AccessError(RESOURCE_EXHAUSTED) naming the limit."""
        tenant = caller.tenant
        if tenant is None:
            return
        with self._lock:
            usage = self._of(tenant.name)
            if tenant.max_requests and usage.in_flight >= tenant.max_requests:
                raise AccessError(
                    Outcome.RESOURCE_EXHAUSTED,
                    f"tenant {tenant.name!r} has {usage.in_flight} requests in flight: max_requests ({tenant.max_requests}) "
                    "reached; retry when one ends",
                    limit="max_requests",
                    retry_after_s=MAX_REQUESTS_RETRY_S,
                )
            if tenant.tokens_per_minute:
                now = self._clock()
                self._slide(usage, now)
                if usage.window_tokens >= tenant.tokens_per_minute:
                    raise AccessError(
                        Outcome.RESOURCE_EXHAUSTED,
                        f"tenant {tenant.name!r} used {usage.window_tokens} tokens in the last minute: tokens_per_minute "
                        f"({tenant.tokens_per_minute}) reached",
                        limit="tokens_per_minute",
                        retry_after_s=self._wait(usage, tenant.tokens_per_minute, now),
                    )
            usage.in_flight += 1

    def _wait(self, usage: _Usage, limit: int, now: float) -> float:
        """Seconds until the window holds fewer than `limit` tokens (nothing new counted)."""
        remaining = usage.window_tokens
        for second, tokens in usage.window:
            remaining -= tokens
            if remaining < limit:
                return max(0.001, second + WINDOW_S - now)
        return 0.001

    def release(self, caller: Caller) -> None:
        if caller.tenant is None:
            return
        with self._lock:
            self._of(caller.tenant.name).in_flight -= 1

    def charge(self, name: str, tokens: int) -> None:
        """Count tokens a tenant's request used now (any thread)."""
        if tokens <= 0:
            return
        now = self._clock()
        second = math.floor(now)
        with self._lock:
            usage = self._of(name)
            self._slide(usage, now)
            if usage.window and usage.window[-1][0] == second:
                usage.window[-1][1] += tokens
            else:
                usage.window.append([second, tokens])
            usage.window_tokens += tokens

    def in_flight(self, name: str) -> int:
        with self._lock:
            return self._usage[name].in_flight if name in self._usage else 0

    def registering(self, name: str) -> threading.Lock:
        """A lock per tenant held around 'count its adapters, then register one'."""
        with self._lock:
            lock = self._registering.get(name)
            if lock is None:
                lock = self._registering[name] = threading.Lock()
            return lock
