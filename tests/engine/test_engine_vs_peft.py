"""Greedy tokens and logits of mixed-adapter batches against PEFT's own generate / forward
on an independently loaded NF4 base (fp32 compute), request by request."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from conftest import make_engine
from loraplex.engine.request import SamplingParams
from loraplex.lora.lora_ops import TorchLora

ADAPTERS = ["qv-r4", "all-r8-rslora", "all-r16-patterns", "attn-r8-layer0"]
MAX_NEW = 12


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _mixed(n: int) -> list[str | None]:
    choices: list[str | None] = [*ADAPTERS, None]
    return [choices[i % len(choices)] for i in range(n)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    arch = request.param
    return request.getfixturevalue(f"{arch}_engine"), request.getfixturevalue(f"{arch}_peft")


def test_mixed_batch_greedy_matches_peft(setup: tuple[Any, Any]) -> None:
    engine, peft = setup
    prompts = _prompts(engine.loaded.vocab_size, 10, seed=0)
    adapters = _mixed(len(prompts))
    results = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), adapters)
    for prompt, adapter, result in zip(prompts, adapters, results):
        expected = peft.greedy(prompt, adapter, MAX_NEW)
        assert result.token_ids == expected, f"adapter={adapter} prompt_len={len(prompt)}"
        assert result.finish_reason == "length"
    # The adapters really change the output (the comparison would be vacuous otherwise).
    base = engine.generate([prompts[0]] * len(ADAPTERS), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), [None] * 4)
    with_adapters = engine.generate([prompts[0]] * len(ADAPTERS), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), ADAPTERS)
    assert all(b.token_ids != a.token_ids for b, a in zip(base, with_adapters))


class RecordingSampler:
    """Wraps the engine's sampler to keep each request's logits rows."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rows: dict[str, list[torch.Tensor]] = {}

    def sample(self, logits: torch.Tensor, requests: list[Any]) -> Any:
        for row, request in zip(logits, requests):
            self.rows.setdefault(request.request_id, []).append(row.float().clone())
        return self.inner.sample(logits, requests)


def test_step_logits_match_peft(setup: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, peft = setup
    recorder = RecordingSampler(engine.sampler)
    monkeypatch.setattr(engine, "sampler", recorder)
    prompts = _prompts(engine.loaded.vocab_size, 5, seed=1)
    adapters: list[str | None] = [*ADAPTERS, None]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True), adapters)
    for prompt, adapter, result in zip(prompts, adapters, results):
        rows = recorder.rows[result.request_id]
        assert len(rows) == 3
        for k, row in enumerate(rows):  # k = 0: prefill; k > 0: decode steps over the paged cache
            expected = peft.last_logits(prompt + result.token_ids[:k], adapter)
            torch.testing.assert_close(row, expected, rtol=0, atol=1e-4, msg=f"adapter={adapter} step={k}")


def test_logprobs_are_peft_log_softmax(llama_engine: Any, llama_peft: Any) -> None:
    """Each sampled token's logprob and the top 5 are PEFT's raw log-softmax at its position:
    before temperature, top-k/p and repetition penalty (vLLM's default), greedy or sampled."""
    prompts = _prompts(llama_engine.loaded.vocab_size, 3, seed=6)
    adapters: list[str | None] = ["all-r16-patterns", None, "qv-r4"]
    params = [
        SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=5),
        SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=0, temperature=0.7, top_k=20, seed=3),
        SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=20, repetition_penalty=1.5),
    ]
    results = llama_engine.generate(prompts, params, adapters)
    for prompt, adapter, p, result in zip(prompts, adapters, params, results):
        assert len(result.logprobs) == len(result.token_ids) == 4
        for k, (token, lp) in enumerate(zip(result.token_ids, result.logprobs)):
            expected = torch.log_softmax(llama_peft.last_logits(prompt + result.token_ids[:k], adapter), -1)
            assert lp.token_id == token
            assert abs(lp.logprob - float(expected[token])) < 1e-4, (adapter, k)
            assert lp.rank == int((expected > expected[token]).sum()) + 1
            top_values, top_ids = expected.topk(p.logprobs)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), top_values, rtol=0, atol=1e-4)
    plain = llama_engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), adapters[:1])[0]
    assert plain.logprobs is None


def test_alone_and_in_mixed_batch_give_same_tokens(llama_engine: Any) -> None:
    prompt = _prompts(llama_engine.loaded.vocab_size, 1, seed=2)[0]
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    for adapter in ["all-r16-patterns", None]:
        alone = llama_engine.generate([prompt], params, [adapter])[0].token_ids
        others = _prompts(llama_engine.loaded.vocab_size, 7, seed=3)
        mixed = llama_engine.generate([*others[:4], prompt, *others[4:]], params, [*_mixed(4), adapter, *_mixed(3)])
        assert mixed[4].token_ids == alone


def test_seeded_sampling_ignores_batch_mates(llama_engine: Any) -> None:
    prompt = _prompts(llama_engine.loaded.vocab_size, 1, seed=4)[0]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = llama_engine.generate([prompt], params, ["qv-r4"])[0].token_ids
    others = _prompts(llama_engine.loaded.vocab_size, 5, seed=5)
    mixed = llama_engine.generate(
        [*others, prompt],
        [SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)] * 5 + [params],
        [*_mixed(5), "qv-r4"],
    )
    assert mixed[-1].token_ids == alone
    unseeded = llama_engine.generate([prompt] * 2, SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True))
    assert unseeded[0].token_ids != alone or unseeded[1].token_ids != alone


class CountingTorchLora(TorchLora):
    """The torch backend held to one form, counting fused sibling shrinks and dense steps."""

    def __init__(self, form: str) -> None:
        super().__init__(torch.float32, torch.device("cpu"), dense_max_token_slots=10**9 if form == "dense" else 0)
        self.fused = self.single = self.dense_steps = 0

    def prepare(self, *args: Any) -> Any:
        batch = super().prepare(*args)
        self.dense_steps += batch.dense
        return batch

    def shrink(self, *args: Any) -> Any:
        self.single += 1
        return super().shrink(*args)

    def shrink_multi(self, *args: Any) -> Any:
        before = self.single
        out = super().shrink_multi(*args)
        self.fused += self.single == before  # one shrink for all siblings, no fallback
        return out


@pytest.mark.parametrize("form", ["dense", "segments"])
def test_fused_sibling_shrinks_match_peft(form: str, tiny_llama: Any, llama_peft: Any) -> None:
    """q/k/v and gate/up share one shrink when every adapter of the step targets them all."""
    backend = CountingTorchLora(form)
    engine = make_engine(tiny_llama, lora_backend=backend)
    prompts = _prompts(engine.loaded.vocab_size, 4, seed=9)
    adapters: list[str | None] = ["all-r8-rslora", "all-r16-patterns", None, "all-r8-rslora"]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), adapters)
    engine.close()
    for prompt, adapter, result in zip(prompts, adapters, results):
        assert result.token_ids == llama_peft.greedy(prompt, adapter, MAX_NEW), adapter
    assert backend.fused > 0
    assert (backend.dense_steps > 0) == (form == "dense")


def test_slots_exchanged_while_requests_decode_keep_peft_tokens(tiny_llama: Any, llama_peft: Any) -> None:
    """Adapters acquired out of rank order are exchanged between steps (one pair a step) while
    their requests decode; each request's greedy tokens still equal PEFT's."""
    engine = make_engine(tiny_llama)
    try:
        prompts = _prompts(engine.loaded.vocab_size, 8, seed=5)
        adapters: list[str | None] = ["all-r16-patterns", "qv-r4", "all-r8-rslora", "attn-r8-layer0"] * 2
        results = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), adapters)
        for prompt, adapter, result in zip(prompts, adapters, results):
            assert result.token_ids == llama_peft.greedy(prompt, adapter, MAX_NEW), f"adapter={adapter}"
        assert engine.store.snapshot().counters.get(("device", "moves"), 0) >= 1  # the case needed exchanges
        ranks = [v.spec.rank for v in engine.store.device_versions() if v is not None]
        assert ranks == sorted(ranks) and len(ranks) == 4
    finally:
        engine.close()
