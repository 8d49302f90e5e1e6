"""Prefix caching end to end: greedy tokens and first-step logits with the cache equal PEFT's
and the same engine's with `prefix_caching` off; the hit counters say what was reused, to
the token. Samples (n > 1) equal single requests seeded by the documented rule."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from conftest import PeftReference, TinyModel, make_engine
from loraplex.engine.request import SamplingParams, sample_seed

BS = 8  # small blocks: a tiny prompt spans several
MAX_NEW = 8
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)


def _tokens(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def _hits(engine: Any) -> int:
    return int(engine.stats().prefix_cache.hit_tokens)


def _record_first_logits(engine: Any) -> dict[tuple[str, int], torch.Tensor]:
    """Wrap the engine's model runner: each request's (sample's) first logits row, the prefill's."""
    first: dict[tuple[str, int], torch.Tensor] = {}
    run = engine.runner.run

    def recording_run(batch: Any) -> Any:
        result = run(batch)
        for row, request in zip(result.logits, result.sampling):
            first.setdefault((request.request_id, request.index), row.float().clone())
        return result

    engine.runner.run = recording_run
    return first


def _engine(tiny: TinyModel, **kwargs: Any) -> Any:
    engine = make_engine(tiny, **kwargs)
    engine.first_logits = _record_first_logits(engine)
    return engine


@pytest.fixture(scope="module")
def cached(tiny_llama: TinyModel) -> Iterator[Any]:
    engine = _engine(tiny_llama, block_size=BS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def uncached(tiny_llama: TinyModel) -> Iterator[Any]:
    engine = _engine(tiny_llama, block_size=BS, prefix_caching=False)
    yield engine
    engine.close()


def _check(
    engine: Any, uncached: Any, peft: PeftReference, prompts: list[list[int]], adapters: list[str | None], results: Any
) -> None:
    """Tokens equal the uncached engine's and PEFT's; first logits equal both to 1e-4."""
    plain = uncached.generate(prompts, GREEDY, adapters)
    for prompt, adapter, result, reference in zip(prompts, adapters, results, plain):
        assert result.token_ids == reference.token_ids == peft.greedy(prompt, adapter, MAX_NEW)
        logits = engine.first_logits[(result.request_id, 0)]
        torch.testing.assert_close(logits, peft.last_logits(prompt, adapter), rtol=0, atol=1e-4)
        torch.testing.assert_close(logits, uncached.first_logits[(reference.request_id, 0)], rtol=0, atol=1e-4)
        assert reference.usage.cached_prompt_tokens == 0


@pytest.mark.parametrize("adapter", [None, "qv-r4", "all-r16-patterns"])
def test_shared_prefix_under_one_adapter(cached: Any, uncached: Any, llama_peft: Any, adapter: str | None) -> None:
    rng = random.Random(100 + len(adapter or ""))
    vocab = cached.loaded.vocab_size
    prefix = _tokens(rng, vocab, 27)  # 3 full blocks of 8, and 3 tokens into the 4th
    # tails: a partial last block (37 tokens), an exact multiple of the block size (32), one past it (33)
    prompts = [prefix + _tokens(rng, vocab, k) for k in (10, 5, 6)]

    first = cached.generate([prompts[0]], GREEDY, [adapter])[0]
    before = _hits(cached)
    rest = cached.generate(prompts[1:], GREEDY, [adapter] * 2)
    assert _hits(cached) - before == 2 * 24  # the prefix's 3 full blocks, for each of the two
    assert [r.usage.cached_prompt_tokens for r in (first, *rest)] == [0, 24, 24]
    _check(cached, uncached, llama_peft, prompts, [adapter] * 3, [first, *rest])


def test_a_prompt_cached_whole_still_computes_its_last_block(cached: Any, uncached: Any, llama_peft: Any) -> None:
    prompt = _tokens(random.Random(5), cached.loaded.vocab_size, 4 * BS)
    first = cached.generate([prompt], GREEDY, ["qv-r4"])[0]
    before = _hits(cached)
    again = cached.generate([prompt], GREEDY, ["qv-r4"])[0]
    assert _hits(cached) - before == 3 * BS  # not 4: the last token's logits are computed
    _check(cached, uncached, llama_peft, [prompt] * 2, ["qv-r4"] * 2, [first, again])


def test_the_same_prompt_under_another_adapter_or_the_base_is_never_hit(
    cached: Any, uncached: Any, llama_peft: Any
) -> None:
    prompt = _tokens(random.Random(6), cached.loaded.vocab_size, 30)
    cached.generate([prompt], GREEDY, ["all-r8-rslora"])
    before = _hits(cached)
    others: list[str | None] = ["qv-r4", "attn-r8-layer0", None]
    results = cached.generate([prompt] * 3, GREEDY, others)  # one step: none can hit another either
    assert _hits(cached) == before and [r.usage.cached_prompt_tokens for r in results] == [0, 0, 0]
    _check(cached, uncached, llama_peft, [prompt] * 3, others, results)
    assert cached.generate([prompt], GREEDY, ["all-r8-rslora"])[0].usage.cached_prompt_tokens == 24


def test_reloading_an_adapter_never_hits_its_old_blocks(cached: Any, uncached: Any, llama_peft: Any) -> None:
    prompt = _tokens(random.Random(7), cached.loaded.vocab_size, 30)
    cached.register_adapter("acme/swap", "qv-r4")
    cached.generate([prompt], GREEDY, ["acme/swap"])
    cached.register_adapter("acme/swap", "qv-r4")  # the same files again: the same version, its blocks hit
    assert cached.adapter_info("acme/swap").version == 1
    assert cached.generate([prompt], GREEDY, ["acme/swap"])[0].usage.cached_prompt_tokens == 24

    # New files under the id (version 2), then the first files again and the same files after
    # an unload (versions 3 and 4): a version never reuses another's blocks.
    for version, path, unload in ((2, "all-r8-rslora", False), (3, "qv-r4", False), (4, "qv-r4", True)):
        if unload:
            cached.unregister_adapter("acme/swap")
        cached.register_adapter("acme/swap", path)
        assert cached.adapter_info("acme/swap").version == version
        before = _hits(cached)
        result = cached.generate([prompt], GREEDY, ["acme/swap"])[0]
        assert _hits(cached) == before and result.usage.cached_prompt_tokens == 0
        _check(cached, uncached, llama_peft, [prompt], [path], [result])
    again = cached.generate([prompt], GREEDY, ["acme/swap"])[0]  # the current version hits its own blocks
    assert again.usage.cached_prompt_tokens == 24
    _check(cached, uncached, llama_peft, [prompt], ["qv-r4"], [again])
    cached.unregister_adapter("acme/swap")


def test_chunked_prefill_over_a_cached_prefix(tiny_llama: TinyModel, uncached: Any, llama_peft: Any) -> None:
    engine = _engine(tiny_llama, block_size=4, max_num_batched_tokens=6)
    rng = random.Random(8)
    prefix = _tokens(rng, engine.loaded.vocab_size, 17)
    prompts = [prefix + _tokens(rng, engine.loaded.vocab_size, k) for k in (3, 14, 21)]
    adapters: list[str | None] = ["all-r16-patterns"] * 3
    first = engine.generate(prompts[:1], GREEDY, adapters[:1])
    rest = engine.generate(prompts[1:], GREEDY, adapters[1:])  # 16 cached, then 15 and 22 in chunks of <= 6
    assert [r.usage.cached_prompt_tokens for r in rest] == [16, 16]
    _check(engine, uncached, llama_peft, prompts, adapters, first + rest)
    engine.close()


def test_preemption_and_eviction_under_kv_pressure(tiny_llama: TinyModel, uncached: Any, llama_peft: Any) -> None:
    # 12 blocks of 8 tokens; 6 requests of ~40 tokens + 8 new (6 blocks each) on 2 prefixes.
    engine = _engine(tiny_llama, block_size=BS, num_blocks=12)
    rng = random.Random(9)
    vocab = engine.loaded.vocab_size
    prefixes = [_tokens(rng, vocab, 24), _tokens(rng, vocab, 24)]
    prompts = [prefixes[i % 2] + _tokens(rng, vocab, rng.randrange(8, 18)) for i in range(6)]
    adapters: list[str | None] = ["qv-r4", None] * 3
    preempted, shared_preempted = 0, 0
    original = engine.scheduler.schedule

    def schedule() -> Any:
        nonlocal preempted, shared_preempted
        sharing = {
            r.request_id for r in engine.scheduler.running if any(engine.blocks.ref_count(b) > 1 for b in r.block_table)
        }
        batch = original()
        preempted += len(batch.preempted)
        shared_preempted += sum(1 for r in batch.preempted if r.request_id in sharing)
        return batch

    engine.scheduler.schedule = schedule
    results = engine.generate(prompts, GREEDY, adapters)
    assert preempted > 0 and shared_preempted > 0, "the workload should preempt a request holding shared blocks"
    assert _hits(engine) > 0
    _check(engine, uncached, llama_peft, prompts, adapters, results)
    # Other prompts push the cached prefixes out; the next requests recompute them, correctly.
    evictions = engine.stats().prefix_cache.evictions
    fillers = [_tokens(rng, vocab, 40) for _ in range(3)]
    engine.generate(fillers, GREEDY, [None] * 3)
    assert engine.stats().prefix_cache.evictions > evictions
    again = engine.generate(prompts[:2], GREEDY, adapters[:2])
    _check(engine, uncached, llama_peft, prompts[:2], adapters[:2], again)
    assert engine.blocks.num_free_blocks == 12
    engine.close()


def _run_samples(engine: Any, prompt: list[int], params: SamplingParams, adapter: str | None) -> dict[int, Any]:
    """Add one request with params.n samples; step until all end: {index: (tokens, final output)}."""
    rid = engine.add_request(None, params, adapter, prompt_token_ids=prompt)
    tokens: dict[int, list[int]] = {i: [] for i in range(params.n)}
    done: dict[int, Any] = {}
    while len(done) < params.n:
        for out in engine.step():
            assert out.request_id == rid
            tokens[out.index].extend(out.new_token_ids)
            if out.finished:
                done[out.index] = out
    return {i: (tokens[i], done[i]) for i in range(params.n)}


@pytest.mark.parametrize("seed", [1234, 2**63 - 2])
def test_n_samples_equal_single_requests_with_seed_plus_index(cached: Any, uncached: Any, seed: int) -> None:
    prompt = _tokens(random.Random(10), cached.loaded.vocab_size, 27)
    params = SamplingParams(n=4, temperature=0.9, top_k=40, seed=seed, max_new_tokens=MAX_NEW, ignore_eos=True)
    samples = _run_samples(cached, prompt, params, "all-r8-rslora")
    for i, (tokens, _) in samples.items():
        assert sample_seed(seed, i) == (seed + i) % 2**63  # the documented rule, written out
        alone = replace(params, n=1, seed=(seed + i) % 2**63)
        assert tokens == uncached.generate([prompt], alone, ["all-r8-rslora"])[0].token_ids, f"sample {i}"
    assert len({tuple(t) for t, _ in samples.values()}) > 1  # the samples differ


@pytest.mark.parametrize("engine_name", ["cached", "uncached"])
def test_n_samples_hold_the_prompt_blocks_once(engine_name: str, request: pytest.FixtureRequest) -> None:
    engine = request.getfixturevalue(engine_name)
    prompt = _tokens(random.Random(11), engine.loaded.vocab_size, 27)
    tables: list[list[list[int]]] = []
    original = engine.scheduler.schedule

    def schedule() -> Any:
        batch = original()
        tables.append([list(r.block_table) for r in batch.requests])
        return batch

    engine.scheduler.schedule = schedule
    try:
        samples = _run_samples(engine, prompt, replace(GREEDY, n=4), "qv-r4")
    finally:
        engine.scheduler.schedule = original
    assert [out.usage.cached_prompt_tokens for _, out in samples.values()] == [0, 24, 24, 24]
    together = next(t for t in tables if len(t) == 4)  # the first step all four run
    assert len({tuple(t[:3]) for t in together}) == 1  # one copy of the prompt's 3 full blocks
    assert len({t[3] for t in together}) == 4  # and a last block each
    assert len({tuple(tokens) for tokens, _ in samples.values()}) == 1  # greedy: all the same
    if engine_name == "uncached":  # shared within the request only
        assert _run_samples(engine, prompt, GREEDY, "qv-r4")[0][1].usage.cached_prompt_tokens == 0
    assert engine.blocks.num_used_blocks == 0


def test_offline_generate_refuses_n_samples(cached: Any) -> None:
    with pytest.raises(ValueError, match="n > 1"):
        cached.generate([[5, 6, 7]], replace(GREEDY, n=2))
