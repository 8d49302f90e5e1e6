"""Workload generator: which adapter each request uses, when it arrives, how long it is.

Popularity (Punica's modes, and S-LoRA's power law):
    identical  every request uses adapter 0
    uniform    requests spread evenly over n adapters
    skewed     Zipf with exponent 1.5 over n adapters (a few hot ones)
    distinct   request i uses adapter i mod n (n = batch size: all different)
    powerlaw   P(adapter k) ∝ 1 / (k + 1)^alpha over n adapters
    none       the base model only
Arrivals: closed loop (all at t = 0; the runner keeps `concurrency` in flight), or open
loop with Poisson (exponential gaps) or Gamma gaps of a given rate and coefficient of
variation. Lengths: uniform in [lo, hi] (lo == hi for fixed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Popularity = Literal["none", "identical", "uniform", "skewed", "distinct", "powerlaw"]
Arrival = Literal["closed", "poisson", "gamma"]


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    num_adapters: int = 0
    popularity: Popularity = "none"
    alpha: float = 1.0  # powerlaw exponent
    arrival: Arrival = "closed"
    rate: float = 0.0  # requests per second (open loop)
    cv: float = 1.0  # gamma: coefficient of variation of the gaps
    prompt_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (64, 64)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.popularity != "none" and self.num_adapters < 1:
            raise ValueError(f"popularity {self.popularity} needs num_adapters >= 1")
        if self.arrival != "closed" and self.rate <= 0:
            raise ValueError("open-loop arrivals need rate > 0")


@dataclass(frozen=True)
class WorkItem:
    arrival_s: float
    prompt_token_ids: list[int]
    max_new_tokens: int
    adapter: int | None  # index into the adapter list; None = base model


def _adapter_indices(spec: WorkloadSpec, rng: random.Random) -> list[int | None]:
    n, count = spec.num_adapters, spec.num_requests
    if spec.popularity == "none":
        return [None] * count
    if spec.popularity == "identical":
        return [0] * count
    if spec.popularity in ("uniform", "distinct"):
        return [i % n for i in range(count)] if spec.popularity == "distinct" else [rng.randrange(n) for _ in range(count)]
    exponent = 1.5 if spec.popularity == "skewed" else spec.alpha
    weights = [1.0 / (k + 1) ** exponent for k in range(n)]
    return list(rng.choices(range(n), weights, k=count))


def _arrivals(spec: WorkloadSpec, rng: random.Random) -> list[float]:
    if spec.arrival == "closed":
        return [0.0] * spec.num_requests
    t, out = 0.0, []
    mean = 1.0 / spec.rate
    for _ in range(spec.num_requests):
        if spec.arrival == "poisson":
            gap = rng.expovariate(spec.rate)
        else:
            shape = 1.0 / (spec.cv**2)
            gap = rng.gammavariate(shape, mean / shape)
        t += gap
        out.append(t)
    return out


def generate(spec: WorkloadSpec, vocab_size: int) -> list[WorkItem]:
    rng = random.Random(spec.seed)
    adapters = _adapter_indices(spec, rng)
    arrivals = _arrivals(spec, rng)
    items = []
    for arrival, adapter in zip(arrivals, adapters):
        plen = rng.randint(*spec.prompt_len)
        items.append(
            WorkItem(
                arrival_s=arrival,
                prompt_token_ids=[rng.randrange(3, vocab_size) for _ in range(plen)],
                max_new_tokens=rng.randint(*spec.output_len),
                adapter=adapter,
            )
        )
    return items
