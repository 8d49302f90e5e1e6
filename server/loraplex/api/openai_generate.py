"""Completions and chat completions over the engine loop: n choices, streamed or not.

    body ──requests()──> one GenerateArgs per prompt, params.n = the body's n
         ──Choices────> one engine-loop stream per prompt, merged: (choice index, output)
         ──first()────> every choice's first output, or its error as an HTTP status
         ──JSON, or SSE: chunk per output ... [usage chunk] data: [DONE]

Until the first output of every choice is in, nothing is sent: an unknown model, a bad
field, a full queue or an adapter that fails to load is still an HTTP status then. A client
that leaves closes the Choices, whose streams abort their engine requests (engine_loop.py):
KV blocks and adapter slots come back at the next step.

`n` is the engine's (SamplingParams.n, engine/samples.py), as GenerateRequest's `n`: the n
choices of a prompt are the samples of one engine request, which compute and hold the
prompt's KV blocks once; choice i of a seeded request samples with seed s + i (sample_seed).
Prompt p's sample i is choice p * n + i.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex.api.auth import ANONYMOUS, Caller
from loraplex.api.engine_loop import EngineLoop
from loraplex.api.errors import ended_status
from loraplex.api.validation import GenerateArgs
from loraplex.engine.logprobs import TokenLogprobs
from loraplex.engine.request import RequestOutput


class Choices:
    """The engine-loop streams of a body's prompts as one: (choice index, output), in the
    order outputs arrive. Every request has the same params.n; the choices number
    len(requests) * n."""

    def __init__(self, engine_loop: EngineLoop, requests: Sequence[GenerateArgs], caller: Caller = ANONYMOUS) -> None:
        self._queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()
        self.n = sum(args.params.n for args in requests)
        self._open = self.n
        self._tasks = [asyncio.create_task(self._pump(p, engine_loop, args, caller)) for p, args in enumerate(requests)]

    async def _pump(self, prompt: int, engine_loop: EngineLoop, args: GenerateArgs, caller: Caller) -> None:
        first = prompt * args.params.n  # prompt p's sample i is choice p * n + i
        try:
            async for out in engine_loop.stream(args, caller):
                self._queue.put_nowait((first + out.index, out, None))
        except Exception as e:
            self._queue.put_nowait((first, None, e))

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next output of any choice; None once every choice has finished. Raises the
        first error: a setup error, or the status of a request that ended ABORTED or ERROR."""
        if not self._open:
            return None
        index, out, error = await self._queue.get()
        if error is not None:
            raise error
        assert out is not None
        if out.finished:
            self._open -= 1
            ended = ended_status(out)
            if ended is not None:
                raise ended
        return index, out

    def close(self) -> None:
        """Stop listening: every unfinished choice's engine request is aborted."""
        for task in self._tasks:
            task.cancel()


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    final: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.logprobs or ())
        if out.finished:
            self.final = out

    @property
    def finish_reason(self) -> str | None:
        return None if self.final is None or self.final.finish_reason is None else str(self.final.finish_reason)

    @property
    def prompt_tokens(self) -> int:
        return self.final.usage.prompt_tokens if self.final is not None and self.final.usage else 0

    @property
    def cached_prompt_tokens(self) -> int:
        return self.final.usage.cached_prompt_tokens if self.final is not None and self.final.usage else 0


async def first_outputs(choices: Choices, n: int) -> list[tuple[int, RequestOutput]]:
    """Wait for every choice's first output (or the first error, raised)."""
    got: list[tuple[int, RequestOutput]] = []
    seen: set[int] = set()
    while len(seen) < n:
        item = await choices.next()
        if item is None:
            break
        got.append(item)
        seen.add(item[0])
    return got


async def run_all(choices: Choices, n: int, first: list[tuple[int, RequestOutput]]) -> list[ChoiceState]:
    """Every choice to completion (the non-streaming routes), after its first outputs."""
    states = [ChoiceState() for _ in range(n)]
    for index, out in first:
        states[index].add(out)
    while (item := await choices.next()) is not None:
        states[item[0]].add(item[1])
    return states


async def watch_disconnect(receive: Callable[[], Any]) -> None:
    """Return when the client has gone (the ASGI http.disconnect message)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client closed the connection before the answer was sent."""


async def unless_disconnected(receive: Callable[[], Any], work: Any) -> Any:
    """Await `work` (a coroutine), or cancel it when the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task not in done:
        raise ClientGone
    return task.result()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def stream_events(
    choices: Choices,
    first: list[tuple[int, RequestOutput]],
    chunks: Callable[[int, RequestOutput, ChoiceState], list[dict[str, Any]]],
    final_chunks: Callable[[list[ChoiceState]], list[dict[str, Any]]],
    n: int,
    error_event: Callable[[BaseException], str],
) -> AsyncIterator[str]:
    """The SSE body: a chunk per output, the final chunks (usage), then [DONE]. A failure
    after the start becomes an error event; leaving (disconnect) aborts every choice."""
    states = [ChoiceState() for _ in range(n)]
    try:
        pending = list(first)
        while True:
            if pending:
                index, out = pending.pop(0)
            else:
                item = await choices.next()
                if item is None:
                    break
                index, out = item
            states[index].add(out)
            for data in chunks(index, out, states[index]):
                yield sse(data)
        for data in final_chunks(states):
            yield sse(data)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        yield error_event(e)
    finally:
        choices.close()
    yield "data: [DONE]\n\n"
