"""EngineLoop's delivery to a handler: outputs in order, joined when the handler is behind."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from loraplex.api.engine_loop import EngineLoop
from loraplex.api.validation import GenerateArgs
from loraplex.engine.logprobs import TokenLogprobs
from loraplex.engine.request import ErrorKind, FinishReason, RequestOutput, SamplingParams


class FakeEngine:
    """Takes requests and aborts; the test hands outputs to the loop itself (no engine thread)."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.aborted: list[str] = []

    def add_request(self, prompt: Any, params: Any, adapter_id: Any, request_id: str, **kwargs: Any) -> None:
        self.added.append(request_id)

    def abort(self, request_id: str, kind: ErrorKind, message: str) -> None:
        self.aborted.append(request_id)


def _out(tokens: list[int], finished: bool = False, error: bool = False, index: int = 0) -> RequestOutput:
    if error:
        return RequestOutput("r", [], "", True, FinishReason.ERROR, "boom", ErrorKind.INTERNAL)
    text = "".join(f"w{t} " for t in tokens)
    return RequestOutput("r", tokens, text, finished, FinishReason.LENGTH if finished else None, index=index)


def _deliver(batches: list[list[RequestOutput]], n: int = 1) -> tuple[list[RequestOutput], FakeEngine]:
    """Each batch reaches the stream's queue before its handler runs again (the handler is behind)."""

    async def main() -> tuple[list[RequestOutput], FakeEngine]:
        engine = FakeEngine()
        loop = EngineLoop(engine, asyncio.get_running_loop())  # type: ignore[arg-type]
        stream = loop.stream(GenerateArgs(None, [1, 2], None, SamplingParams(max_new_tokens=8, n=n), "r"))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the request is added; the handler waits on its queue
        received: list[RequestOutput] = []
        pending = first
        for i, batch in enumerate(batches):
            loop._dispatch(batch)
            received.append(await pending)
            while len([o for o in received if o.finished]) < n and i == len(batches) - 1:  # held back: no new step
                received.append(await anext(stream))
            if len([o for o in received if o.finished]) == n:
                break
            pending = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0)
        await stream.aclose()
        return received, engine

    return asyncio.run(main())


def test_outputs_waiting_together_go_as_one_message_with_the_tokens_and_text_in_order() -> None:
    received, engine = _deliver([[_out([5]), _out([6]), _out([7])], [_out([8], finished=True)]])
    assert [o.new_token_ids for o in received] == [[5, 6, 7], [8]]
    assert [o.new_text for o in received] == ["w5 w6 w7 ", "w8 "]
    assert [o.finished for o in received] == [False, True]
    assert engine.added == ["r"] and engine.aborted == []


def test_a_final_output_is_never_joined_to_the_tokens_before_it() -> None:
    received, _ = _deliver([[_out([5]), _out([6]), _out([], error=True)]])
    assert [o.new_token_ids for o in received] == [[5, 6], []]
    assert received[-1].finish_reason is FinishReason.ERROR and received[-1].error == "boom"
    received, _ = _deliver([[_out([5]), _out([6], finished=True)]])
    assert [(o.new_token_ids, o.finished) for o in received] == [([5], False), ([6], True)]


def test_outputs_read_as_they_come_are_sent_one_by_one() -> None:
    received, _ = _deliver([[_out([5])], [_out([6])], [_out([7], finished=True)]])
    assert [o.new_token_ids for o in received] == [[5], [6], [7]]


def test_joined_outputs_keep_every_tokens_logprobs_in_order() -> None:
    def with_logprobs(token: int) -> RequestOutput:
        out = _out([token])
        return dataclasses.replace(out, logprobs=[TokenLogprobs(token, -float(token), 1, ((token, -float(token)),))])

    received, _ = _deliver([[with_logprobs(5), with_logprobs(6), with_logprobs(7)], [_out([8], finished=True)]])
    assert received[0].logprobs is not None
    assert [(lp.token_id, lp.logprob) for lp in received[0].logprobs] == [(5, -5.0), (6, -6.0), (7, -7.0)]
    received, _ = _deliver([[_out([5]), _out([6])], [_out([7], finished=True)]])
    assert received[0].logprobs is None  # none asked for, none made up


def test_the_samples_of_a_request_are_joined_each_with_itself_and_the_stream_ends_after_all() -> None:
    received, engine = _deliver(
        [[_out([5]), _out([6]), _out([50], index=1), _out([51], index=1), _out([7])],
         [_out([8], finished=True), _out([52], finished=True, index=1)]],
        n=2,
    )
    assert [(o.index, o.new_token_ids, o.finished) for o in received] == [
        (0, [5, 6], False), (1, [50, 51], False), (0, [7], False), (0, [8], True), (1, [52], True)
    ]
    assert engine.aborted == []  # it ended when both samples had finished, not at the first
