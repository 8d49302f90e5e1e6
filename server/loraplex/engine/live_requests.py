"""The live requests: the one registry of unfinished requests, and the inbox to the engine thread.

    any thread                                         engine thread (Engine.step)
    admit(*samples) ─> registry + inbox: Admit    ──> drain() ──> scheduler.add
    abort(id, ...) ──> inbox: Abort per sample     ──> drain() ──> finish ABORTED
    abort_holders(version, ...) ─> inbox: AbortHolders ─> drain() ──> finish every live holder
    when_released(version, callback)                   remove(request) ──> callbacks of a version
                                                                          no live request holds

A request is unfinished from `admit` until `remove` (called when it finishes), whatever the
engine thread has seen of it: this registry is the truth for "is this id in flight", for
the admission bound, and for who holds an adapter version. One lock guards it and the
order of the inbox, so a request's Admit is always drained before any Abort of it.
A request with n > 1 samples is n Requests under one id: admitted together, each counted
against the bound (each is a sequence), aborted together, each removed when it finishes.
No torch here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from loraplex.engine.errors import DuplicateRequestError, EngineOverloadedError
from loraplex.engine.request import ErrorKind, Request


@dataclass(frozen=True, slots=True)
class Admit:
    request: Request


@dataclass(frozen=True, slots=True)
class Abort:
    request: Request
    kind: ErrorKind
    message: str


@dataclass(frozen=True, slots=True)
class AbortHolders:
    """End every live request that holds this adapter version."""

    version: object
    kind: ErrorKind
    message: str


Event = Admit | Abort | AbortHolders


class LiveRequests:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # admission bound: queued + running
        self._lock = threading.Lock()
        self._by_id: dict[str, list[Request]] = {}  # id -> its unfinished samples
        self._count = 0
        self._inbox: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._released: dict[object, list[Callable[[], None]]] = {}  # adapter version -> waiters

    # -- any thread ----------------------------------------------------------------------

    def admit(self, *samples: Request, on_admit: Callable[[], None] | None = None) -> None:
        """Register a request (its samples, which share one id) and queue it for the engine
        thread; `on_admit` runs under the lock once it is accepted (the adapter holds, so
        that no finish can come before them)."""
        request_id = samples[0].request_id
        with self._lock:
            if self._count + len(samples) > self.limit:
                raise EngineOverloadedError(f"{self._count} requests are queued or running (limit {self.limit})")
            if request_id in self._by_id:
                raise DuplicateRequestError(f"request_id {request_id!r} is already in flight")
            if on_admit is not None:
                on_admit()
            self._by_id[request_id] = list(samples)
            self._count += len(samples)
            for sample in samples:
                self._inbox.put(Admit(sample))

    def abort(self, request_id: str, kind: ErrorKind, message: str) -> bool:
        """Queue the end of the live request with this id, every sample of it (not of a later
        one reusing the id)."""
        with self._lock:
            samples = self._by_id.get(request_id, [])
            for sample in samples:
                self._inbox.put(Abort(sample, kind, message))
        return bool(samples)

    def abort_holders(self, version: object, kind: ErrorKind, message: str) -> None:
        with self._lock:
            self._inbox.put(AbortHolders(version, kind, message))

    def holders(self, version: object) -> list[Request]:
        """The live requests holding this adapter version (admitted, not yet finished)."""
        with self._lock:
            return [r for r in self._requests() if r.adapter is version]

    def when_released(self, version: object, callback: Callable[[], None]) -> None:
        """Call `callback` once no live request holds `version`: now, or from the engine
        thread when the last holder finishes. Requests that resolve the version later (it
        is unregistered first) are not waited for."""
        with self._lock:
            held = any(r.adapter is version for r in self._requests())
            if held:
                self._released.setdefault(version, []).append(callback)
        if not held:
            callback()

    def _requests(self) -> Iterator[Request]:
        for samples in self._by_id.values():
            yield from samples

    def __len__(self) -> int:
        """Unfinished requests, each sample counted."""
        return self._count

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    # -- engine thread -------------------------------------------------------------------

    def drain(self) -> Iterator[Event]:
        """The queued admissions and aborts, in the order they were made."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def remove(self, request: Request) -> None:
        """A request finished: forget it, and tell who waits for its version to be released."""
        callbacks: list[Callable[[], None]] = []
        with self._lock:
            samples = self._by_id.get(request.request_id, [])
            if any(r is request for r in samples):
                samples[:] = [r for r in samples if r is not request]
                self._count -= 1
                if not samples:
                    del self._by_id[request.request_id]
            version = request.adapter
            released = version is not None and not any(r.adapter is version for r in self._requests())
            if released and version in self._released:
                callbacks = self._released.pop(version)
        for callback in callbacks:
            callback()
