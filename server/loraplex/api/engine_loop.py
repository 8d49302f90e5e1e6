"""The engine on its own thread, and the bridge between its outputs and asyncio streams.

    handler (event loop)                          worker thread        engine thread
    stream(args, caller) ─ quotas.admit(caller)
                 ─ access.resolve(caller, id) ─ auto-register? ─> read + hash
                 ─ add_request(tenant=caller) ───────────────────────────────> inbox
        ^                                                                      step() ... step()
        └── queue.put_nowait <── _dispatch(outputs) <── call_soon_threadsafe ──┘
                                   └── quotas.charge(tenant, tokens)

This is the one place a request's stream ends, whichever way (finished, failed, cancelled,
disconnected, deadline, shutdown): its quota place is released in the `finally` here.
Every transport (gRPC, HTTP) streams through it, so the tenant rules hold for all of them.

No disk work on the event loop: a request that names an adapter directory not yet
registered (auto-register) has it read and hashed on a worker thread first, and a chat is
rendered with its template and tokenized there too. add_request
itself runs on the loop, synchronously, so the request is in the engine's inbox before any
abort of it can be. A handler that stops listening aborts its request; the engine frees its
KV blocks and adapter slot at the next step.

A handler that falls behind the engine (a busy event loop, a slow client) finds several
outputs waiting: it sends a sample's run of them as one message (tokens and text joined), so the per-message
cost of gRPC shrinks exactly when the loop is short of time. A final output is never joined
to the ones before it (an error must not swallow tokens already produced).

`_streams` is the delivery table (request id -> its handler's queue), not a registry of
requests: the engine's live requests are that. An id stays taken here until its handler
has read its last output, so a retry reusing the id never receives the old one's output.
Tokens are charged to tenants from every output, delivered or not (a request whose caller
left still used them): generated tokens as they come, prompt tokens with the final output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence

import grpc

from loraplex.api.access import AdapterAccess
from loraplex.api.auth import ANONYMOUS, Caller
from loraplex.api.errors import ApiError
from loraplex.api.quotas import Quotas
from loraplex.api.validation import GenerateArgs
from loraplex.engine.engine import Engine
from loraplex.engine.prompts import ChatMessage
from loraplex.engine.request import ErrorKind, RequestOutput, SamplingParams
from loraplex.lora.adapter_version import AdapterVersion
from loraplex.rules import InvalidFieldError, new_request_id

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
ADAPTER_WAIT_S = 0.005  # nothing ran: requests wait for adapters to load


class EngineLoop:
    def __init__(
        self, engine: Engine, event_loop: asyncio.AbstractEventLoop, quotas: Quotas | None = None
    ) -> None:
        self.engine = engine
        self.event_loop = event_loop  # where outputs are handed to the handlers' streams
        self.quotas = quotas or Quotas()
        self.access = AdapterAccess(engine, self.quotas)
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
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
                    self.event_loop.call_soon_threadsafe(self._dispatch, outputs)
                elif engine.last_step is not None and not engine.last_step.num_requests:
                    engine.wait_for_work(ADAPTER_WAIT_S)
        except BaseException as e:  # the loop must never die silently
            log.exception("engine loop stopped")
            self.failed = e

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            tokens = len(out.new_token_ids) + (out.usage.prompt_tokens if out.finished and out.usage else 0)
            self.quotas.charge(out.tenant, tokens)
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

    @property
    def started(self) -> bool:
        """Whether the engine thread was ever started (a failed server start never starts it)."""
        return self._thread.ident is not None

    # -- streams (event loop) ------------------------------------------------------------------

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    async def resolve_adapter(self, adapter_id: str | None, caller: Caller = ANONYMOUS) -> AdapterVersion | None:
        """The current version of an adapter id for this caller (None: the base model); an id
        outside its namespaces is NOT_FOUND as an unknown one (access.py)."""
        if adapter_id is None:
            return None
        return await self.access.resolve(caller, adapter_id)  # auto-register reads on a worker thread

    async def tokenize(
        self, prompt: str | None, messages: Sequence[ChatMessage] | None, adapter_id: str | None,
        caller: Caller = ANONYMOUS,
    ) -> list[int]:
        """The prompt ids Generate would make of a prompt or a chat (Tokenize, POST /tokenize)."""
        if (prompt is None) == (messages is None):
            raise InvalidFieldError("prompt", "give exactly one of prompt and messages")
        adapter = await self.resolve_adapter(adapter_id, caller)  # an unknown id is NOT_FOUND, as in Generate
        if messages is not None:
            return await asyncio.to_thread(self.engine.chat_prompt_ids, messages, adapter)
        return await asyncio.to_thread(self.engine.prompts.encode, prompt or "")

    async def stream(self, args: GenerateArgs, caller: Caller = ANONYMOUS) -> AsyncGenerator[RequestOutput, None]:
        """Add a request for this caller and yield its outputs until it finishes (every sample
        of it, with n > 1: their outputs interleave, told apart by index); abort it if left early.

        Raises AccessError over a tenant limit, HiddenAdapterError for an adapter outside the
        caller's namespaces, and what add_request raises.
        """
        rid = args.request_id or new_request_id()
        if rid in self._streams:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already in flight")
        self.quotas.admit(caller)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[rid] = queue
        added = finished = False
        try:
            adapter = await self.resolve_adapter(args.adapter_id, caller)
            prompt_ids = args.prompt_token_ids
            if args.messages is not None:  # Jinja and the tokenizer: a worker thread's job too
                prompt_ids = await asyncio.to_thread(self.engine.chat_prompt_ids, args.messages, adapter)
            # Synchronous on purpose: the request is in the engine's inbox before any abort can be.
            self.engine.add_request(
                args.prompt, args.params, None, rid, prompt_token_ids=prompt_ids, adapter=adapter, tenant=caller.name,
                weight=caller.tenant.weight if caller.tenant is not None else 1.0, priority=args.priority,
            )
            added = True
            pending: RequestOutput | None = None  # an output read while joining that cannot join, sent next
            unfinished = args.params.n
            while True:
                out = pending or await queue.get()
                pending = None
                while not out.finished and not queue.empty():  # behind the engine: one message
                    later = queue.get_nowait()
                    if later.finished or later.index != out.index:  # samples are joined only with themselves
                        pending = later
                        break
                    out = joined(out, later)
                unfinished -= out.finished
                finished = unfinished == 0
                if finished:
                    log.debug("request %s finished: %s", rid, out.finish_reason, extra={"request_id": rid})
                yield out
                if finished:
                    return
        finally:
            del self._streams[rid]
            self.quotas.release(caller)
            if added and not finished:
                log.debug("request %s left before finishing: aborting it", rid, extra={"request_id": rid})
                self.engine.abort(rid, ErrorKind.CANCELLED, "cancelled by the client")

    def stream_ids(self) -> list[str]:
        """The request ids being served now (each has a handler reading its outputs)."""
        return list(self._streams)

    async def warm_up(self) -> float:
        """Run one short base-model request through the whole path; returns its seconds."""
        start = time.perf_counter()
        args = GenerateArgs(None, [0, 1, 2], None, SamplingParams(max_new_tokens=2, ignore_eos=True), None)
        async for _ in self.stream(args):
            pass
        return time.perf_counter() - start

    def stalled(self, heartbeat_timeout_s: float) -> str | None:
        """Why the loop is not making progress (readiness), or None."""
        if not self.alive:
            return f"engine loop stopped: {self.failed!r}"
        now = time.monotonic()
        busy = self.busy_since
        if busy is not None and now - busy > heartbeat_timeout_s:
            return f"an engine step has run for {now - busy:.1f}s"
        if now - self.heartbeat > heartbeat_timeout_s:
            return f"the engine loop has not come round for {now - self.heartbeat:.1f}s"
        return None

    def abort_all(self, kind: ErrorKind, message: str) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid, kind, message)


def joined(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive unfinished outputs of one request (one sample of it) as one (tokens, text and logprobs)."""
    logprobs = None if first.logprobs is None and later.logprobs is None else [*(first.logprobs or ()), *(later.logprobs or ())]
    return dataclasses.replace(
        later, new_token_ids=first.new_token_ids + later.new_token_ids, new_text=first.new_text + later.new_text,
        logprobs=logprobs,
    )
