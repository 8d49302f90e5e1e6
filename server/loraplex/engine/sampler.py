"""The sampler: each request's next token from its last logits, with its own parameters.

Greedy rows take the argmax together. Sampled rows apply temperature, top-k and top-p, and
draw with the request's own torch.Generator, seeded from `seed` when given: a seeded request
draws the same numbers whatever its batch mates.

Rows whose request asks for logprobs get them from the raw logits, before repetition penalty,
temperature and top-k/p (logprobs.py says why): log_softmax is taken first, on a copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from loraplex.engine.logprobs import TokenLogprobs
from loraplex.engine.request import Request


@dataclass(frozen=True, slots=True)
class SampledTokens:
    tokens: list[int]  # one per request
    logprobs: list[TokenLogprobs | None]  # one per request; None where it asked for none


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seeds = random.Random(seed)

    def _generator(self, request: Request, device: torch.device) -> torch.Generator:
        if request.generator is None:
            g = torch.Generator(device=device)
            seed = request.params.seed
            g.manual_seed(seed if seed is not None else self._seeds.getrandbits(63))
            request.generator = g
        return request.generator

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits: [S, vocab] (one row per request) -> one token id per request."""
        return self.sample(logits, requests).tokens

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """logits: [S, vocab] (one row per request; penalties are applied to it in place)."""
        if not requests:
            return SampledTokens([], [])
        logits = logits.float()
        wanted = [row for row, r in enumerate(requests) if r.params.logprobs is not None]
        # raw: [W, vocab], a new tensor: what follows changes `logits` in place
        raw = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
        for row, request in enumerate(requests):
            if request.params.repetition_penalty != 1.0:
                _apply_repetition_penalty(logits[row], request.all_token_ids, request.params.repetition_penalty)
        tokens = logits.argmax(dim=-1).tolist()
        for row, request in enumerate(requests):
            if not request.params.greedy:
                tokens[row] = self._sample(logits[row], request)
        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if raw is not None:
            chosen = [tokens[row] for row in wanted]
            for row, lp in zip(wanted, _token_logprobs(raw, chosen, [requests[row] for row in wanted])):
                logprobs[row] = lp
        return SampledTokens(tokens, logprobs)

    def _sample(self, logits: torch.Tensor, request: Request) -> int:
        p = request.params
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Drop a token once the mass before it reaches top_p; the first token always stays.
            drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(request, logits.device)).item())


def _token_logprobs(raw: torch.Tensor, tokens: list[int], requests: list[Request]) -> list[TokenLogprobs]:
    """raw: [W, vocab] log-probabilities; each request's sampled token, its rank and its top-N."""
    chosen = raw.gather(1, torch.tensor(tokens, device=raw.device).unsqueeze(1))  # [W, 1]
    ranks = (raw > chosen).sum(dim=1) + 1  # [W]
    top_values, top_ids = raw.topk(max(r.params.logprobs or 0 for r in requests), dim=1)  # [W, N]
    out = []
    for i, request in enumerate(requests):
        k = request.params.logprobs or 0
        top = tuple(zip(top_ids[i, :k].tolist(), top_values[i, :k].tolist()))
        out.append(TokenLogprobs(tokens[i], float(chosen[i, 0]), int(ranks[i]), top))
    return out


def _apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor, on one row, in place."""
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    scores = logits.index_select(0, ids)
    logits.index_copy_(0, ids, torch.where(scores < 0, scores * penalty, scores / penalty))
