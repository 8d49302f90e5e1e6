"""Offline use: run a list of prompts to completion on the calling thread (Engine.generate).

    add_request x N → step() until every request has its final output → results in input order

The calling thread is the engine thread meanwhile; a server uses the API's engine loop instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from loraplex.engine.logprobs import TokenLogprobs
from loraplex.engine.request import CompletionResult, FinishReason, RequestOutput, SamplingParams, StepStats


class Steppable(Protocol):
    """What a whole run needs of the engine."""

    last_step: StepStats | None

    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        request_id: str | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> str: ...

    def step(self) -> list[RequestOutput]: ...

    def wait_for_work(self, timeout: float) -> None: ...


def generate(
    engine: Steppable,
    prompts: Sequence[str | Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    adapter_ids: Sequence[str | None] | None = None,
) -> list[CompletionResult]:
    """Engine.generate: one continuous batch; a request that ends in ERROR raises RuntimeError."""
    n = len(prompts)
    params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * n
    adapters = list(adapter_ids) if adapter_ids is not None else [None] * n
    if len(params_list) != n or len(adapters) != n:
        raise ValueError("prompts, params and adapter_ids must have the same length")
    if any(p.n > 1 for p in params_list):
        raise ValueError("generate returns one result per prompt: n > 1 samples need add_request and step")
    ids = []
    for prompt, p, adapter in zip(prompts, params_list, adapters):
        if isinstance(prompt, str):
            ids.append(engine.add_request(prompt, p, adapter))
        else:
            ids.append(engine.add_request(None, p, adapter, prompt_token_ids=prompt))
    texts: dict[str, list[str]] = {i: [] for i in ids}
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    logprobs: dict[str, list[TokenLogprobs]] = {i: [] for i in ids}
    done: dict[str, RequestOutput] = {}
    while len(done) < n:
        outputs = engine.step()
        if not outputs and engine.last_step is not None and not engine.last_step.num_requests:
            engine.wait_for_work(0.01)  # nothing ran: adapters loading
        for out in outputs:
            if out.request_id in texts:
                texts[out.request_id].append(out.new_text)
                tokens[out.request_id].extend(out.new_token_ids)
                logprobs[out.request_id].extend(out.logprobs or ())
                if out.finished:
                    done[out.request_id] = out
    results = []
    for i, p in zip(ids, params_list):
        out = done[i]
        if out.finish_reason is FinishReason.ERROR:
            raise RuntimeError(out.error or f"request {i} failed")
        assert out.usage is not None and out.finish_reason is not None
        wanted = p is not None and p.logprobs is not None
        results.append(
            CompletionResult(
                i, "".join(texts[i]), tokens[i], out.finish_reason, out.usage, logprobs[i] if wanted else None
            )
        )
    return results
