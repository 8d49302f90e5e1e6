"""The sampler against transformers' own logits processors."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loraplex.engine.request import Request, SamplingParams
from loraplex.engine.sampler import Sampler


def _request(params: SamplingParams, prompt: list[int] | None = None) -> Request:
    return Request("r", prompt or [1, 2, 3], params)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    tokens = Sampler()(logits, [_request(SamplingParams()) for _ in range(4)])
    assert tokens == logits.argmax(-1).tolist()


def test_repetition_penalty_matches_transformers() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    prompt = [3, 7, 7, 11]
    params = SamplingParams(repetition_penalty=1.7)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt]), logits.clone())
    ours = logits.clone()
    Sampler()(ours, [_request(params, prompt)])
    torch.testing.assert_close(ours, expected)


def test_top_k_top_p_support_matches_transformers() -> None:
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.8, seed=5)
    warped = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, logits / 1.5))
    allowed = set(torch.nonzero(torch.isfinite(warped[0])).flatten().tolist())
    sampler = Sampler()
    request = _request(params)
    drawn = {sampler(logits, [request])[0] for _ in range(300)}
    assert 3 < len(allowed) < 20
    assert drawn == allowed


def test_sampling_follows_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    request = _request(SamplingParams(temperature=1.0, seed=123))
    sampler = Sampler()
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[sampler(logits, [request])[0]] += 1
    expected = torch.softmax(logits[0], -1)
    assert torch.allclose(counts / n, expected, atol=0.03)


def test_seed_reproduces_and_differs() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3))

    def draw(seed: int | None, sampler: Sampler) -> list[int]:
        request = _request(SamplingParams(temperature=1.0, seed=seed))
        return [sampler(logits, [request])[0] for _ in range(20)]

    assert draw(7, Sampler(0)) == draw(7, Sampler(99))
    assert draw(7, Sampler()) != draw(8, Sampler())
    assert draw(None, Sampler(0)) != draw(None, Sampler(1))
    assert draw(None, Sampler(5)) == draw(None, Sampler(5))  # the engine's --seed makes unseeded runs repeat


def test_logprobs_are_raw_log_softmax_only_where_asked() -> None:
    logits = torch.randn(3, 60, generator=torch.Generator().manual_seed(4))
    raw = torch.log_softmax(logits, -1)
    requests = [
        _request(SamplingParams(logprobs=3, temperature=2.0, top_k=5, seed=1), prompt=[5, 6]),
        _request(SamplingParams()),
        _request(SamplingParams(logprobs=0, repetition_penalty=3.0), prompt=[int(logits[2].argmax())]),
    ]
    out = Sampler().sample(logits.clone(), requests)
    assert out.logprobs[1] is None
    for row in (0, 2):
        lp = out.logprobs[row]
        assert lp is not None and lp.token_id == out.tokens[row]
        assert lp.logprob == float(raw[row, out.tokens[row]])  # before temperature and penalty
        assert lp.rank == int((raw[row] > raw[row, out.tokens[row]]).sum()) + 1
    assert out.logprobs[2].top == () and out.logprobs[2].rank > 1  # the penalty moved the argmax
    values, ids = raw[0].topk(3)
    assert out.logprobs[0].top == tuple(zip(ids.tolist(), values.tolist()))


# What mutation testing (make mutants) found untested: penalised logits in [0, 1), top_k = 1,
# and the top_p boundary (a token is dropped once the mass before it reaches top_p exactly).


def test_repetition_penalty_on_logits_between_zero_and_one_matches_transformers() -> None:
    logits = torch.zeros(1, 20)
    logits[0, 3], logits[0, 7], logits[0, 11], logits[0, 12] = 0.5, 0.25, -0.5, 0.0
    prompt = [3, 7, 11, 12]
    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([prompt]), logits.clone())
    ours = logits.clone()
    Sampler()(ours, [_request(SamplingParams(repetition_penalty=2.0), prompt)])
    torch.testing.assert_close(ours, expected)
    assert float(ours[0, 3]) == 0.25


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    sampler = Sampler()
    drawn = {sampler(logits, [_request(SamplingParams(temperature=5.0, top_k=1, seed=s))])[0] for s in range(40)}
    assert drawn == {int(logits.argmax())}


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p() -> None:
    logits = torch.zeros(1, 2)  # probabilities exactly 0.5 and 0.5
    warped = TopPLogitsWarper(0.5)(None, logits.clone())
    assert int(torch.isfinite(warped).sum()) == 1  # transformers keeps one token too
    sampler = Sampler()
    drawn = {sampler(logits, [_request(SamplingParams(temperature=1.0, top_p=0.5, seed=s))])[0] for s in range(40)}
    assert len(drawn) == 1
