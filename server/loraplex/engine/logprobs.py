"""Log-probabilities of sampled tokens, as the engine reports them. No torch here.

Which distribution: the model's raw one, `log_softmax(logits)` at the position that
produced the token, before repetition penalty, temperature, top-k and top-p. That is vLLM's
default (`logprobs_mode="raw_logprobs"`) and what evaluation users expect: a greedy and a
sampled request on the same prompt report the same numbers, and they equal the reference
model's log-softmax (PEFT's, in the tests). The sampler (sampler.py) computes them only for
requests that ask (`SamplingParams.logprobs` = how many alternatives, 0..MAX_LOGPROBS).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20  # alternatives per position; OpenAI's top_logprobs and vLLM's default cap


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One sampled token: its log-probability, its rank, and the most likely alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token at this position
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first; may include token_id
