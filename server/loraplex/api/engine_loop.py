"""The engine on its own thread, and the bridge between its outputs and asyncio streams.

    gRPC handler (event loop)          engine thread
    stream(args) ── add_request ──────> inbox
        ^                               step() ... step()
        └── queue.put_nowait <── call_soon_threadsafe(dispatch, outputs)

A handler that stops listening (client cancel, disconnect, deadline) aborts its request;
the engine frees its KV blocks and adapter slot at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from loraplex.api.errors import ApiError
from loraplex.api.validation import GenerateArgs
from loraplex.engine.engine import Engine
from loraplex.engine.request import RequestOutput

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
ADAPTER_WAIT_S = 0.005  # nothing ran: requests wait for adapters to load


class EngineLoop:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._ids = itertools.count()
        self.heartbeat = time.monotonic()  # last time the loop came round
        self.busy_since: float | None = None  # start of the step in progress
        self.steps = 0
        self.failed: BaseException | None = None
        self.on_step: Callable[[list[RequestOutput]], None] | None = None  # metrics hook, engine thread

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                if not engine.has_unfinished():
                    engine.wait_for_work(IDLE_WAIT_S)
                    continue
                self.busy_since = time.monotonic()
                outputs = engine.step()
                self.busy_since = None
                self.steps += 1
                if self.on_step is not None:
                    self.on_step(outputs)
                if outputs:
                    self.loop.call_soon_threadsafe(self._dispatch, outputs)
                elif not engine.scheduler.running:
                    engine.wait_for_work(ADAPTER_WAIT_S)
        except BaseException as e:  # the loop must never die silently
            log.exception("engine loop stopped")
            self.failed = e

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.engine.wake()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- streams (event loop) ------------------------------------------------------------------

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}-{uuid.uuid4().hex[:12]}"

    async def stream(self, args: GenerateArgs) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes; abort it if left early."""
        rid = args.request_id or self.new_request_id()
        if rid in self._streams:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already in flight")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[rid] = queue
        finished = False
        try:
            # Synchronous on purpose: the request is in the engine's inbox before any abort can be.
            self.engine.add_request(
                args.prompt, args.params, args.adapter_id, rid, prompt_token_ids=args.prompt_token_ids
            )
            while True:
                out = await queue.get()
                finished = out.finished
                if finished:
                    log.debug("request %s finished: %s", rid, out.finish_reason, extra={"request_id": rid})
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                log.debug("request %s left before finishing: aborting it", rid, extra={"request_id": rid})
                self.engine.abort(rid, "cancelled by the client")

    def abort_all(self, reason: str) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid, reason)
