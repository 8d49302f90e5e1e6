"""Engine behaviour: continuous batching limits, abort, KV exhaustion and preemption, chunked
prefill, stop conditions and bad input. Reference tokens come from PEFT's greedy generate."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import TinyModel, make_engine
from loraplex.engine.request import SamplingParams
from loraplex.lora.adapter_version import AdapterNotFoundError

ADAPTERS: list[str | None] = ["qv-r4", "all-r8-rslora", "all-r16-patterns", "attn-r8-layer0", None]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


def _workload(vocab: int, n: int, seed: int) -> tuple[list[list[int]], list[str | None]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(2, 45))] for _ in range(n)]
    return prompts, [ADAPTERS[i % len(ADAPTERS)] for i in range(n)]


def _expected(peft: Any, prompts: list[list[int]], adapters: list[str | None], max_new: int = 10) -> list[list[int]]:
    return [peft.greedy(p, a, max_new) for p, a in zip(prompts, adapters)]


@pytest.fixture(scope="module")
def workload(llama_engine: Any, llama_peft: Any) -> tuple[list[list[int]], list[str | None], list[list[int]]]:
    prompts, adapters = _workload(llama_engine.loaded.vocab_size, 12, seed=7)
    return prompts, adapters, _expected(llama_peft, prompts, adapters)


def test_kv_block_exhaustion_preempts_without_corrupting(tiny_llama: TinyModel, workload: Any) -> None:
    prompts, adapters, expected = workload
    # 10 blocks of 8 tokens: far fewer than 12 sequences of up to ~55 tokens need.
    engine = make_engine(tiny_llama, num_blocks=10, block_size=8)
    preempted = 0
    original = engine.scheduler.schedule

    def schedule() -> Any:
        nonlocal preempted
        batch = original()
        preempted += len(batch.preempted)
        assert engine.blocks.num_used_blocks <= 10
        return batch

    engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    results = engine.generate(prompts, GREEDY, adapters)
    assert [r.token_ids for r in results] == expected
    assert preempted > 0, "the workload should have run out of KV blocks"
    assert engine.blocks.num_free_blocks == 10
    engine.close()


def test_max_num_seqs_and_chunked_prefill(tiny_llama: TinyModel, workload: Any) -> None:
    prompts, adapters, expected = workload
    engine = make_engine(tiny_llama, max_num_seqs=3, max_num_batched_tokens=16)
    seen_running, seen_tokens = 0, 0
    original = engine.scheduler.schedule

    def schedule() -> Any:
        nonlocal seen_running, seen_tokens
        batch = original()
        seen_running = max(seen_running, len(engine.scheduler.running))
        seen_tokens = max(seen_tokens, batch.num_tokens)
        return batch

    engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    results = engine.generate(prompts, GREEDY, adapters)
    assert [r.token_ids for r in results] == expected
    assert seen_running == 3 and seen_tokens == 16
    engine.close()


def test_more_adapters_than_slots(tiny_llama: TinyModel, workload: Any) -> None:
    prompts, adapters, expected = workload
    engine = make_engine(tiny_llama, max_loras=2)
    results = engine.generate(prompts, GREEDY, adapters)
    assert [r.token_ids for r in results] == expected
    assert engine.store.counters.get(("device", "evictions"), 0) > 0
    engine.close()


def test_abort_frees_blocks_and_slot(llama_engine: Any) -> None:
    engine = llama_engine
    free_before = engine.blocks.num_free_blocks
    rid = engine.add_request(prompt_token_ids=list(range(3, 40)), params=SamplingParams(max_new_tokens=50, ignore_eos=True), adapter_id="qv-r4")
    other = engine.add_request(prompt_token_ids=list(range(3, 20)), params=SamplingParams(max_new_tokens=5, ignore_eos=True))
    outs = engine.step() + engine.step() + engine.step()
    assert engine.blocks.num_free_blocks < free_before
    version = engine.store.resolve("qv-r4")
    assert version.slot_refs == 1 and version.holders == 1
    engine.abort(rid)
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == rid]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "aborted"
    assert version.slot_refs == 0 and version.holders == 0
    while engine.has_unfinished():
        outs += engine.step()
    assert any(o.request_id == other and o.finish_reason == "length" for o in outs)
    assert engine.blocks.num_free_blocks == free_before
    engine.abort("no-such-request")  # harmless
    assert engine.step() == []


def _text_after(tokenizer: Any, prompt: list[int], tokens: list[int]) -> str:
    """The reference text of `tokens` after `prompt`: decoded with the prompt's last tokens as context."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    context = prompt[-5:]
    return decode(context + tokens)[len(decode(context)) :]


def test_stop_token_and_stop_string(llama_engine: Any, llama_peft: Any) -> None:
    prompt = list(range(5, 25))
    reference = llama_peft.greedy(prompt, "qv-r4", 10)
    stop_at = reference[4]
    first = reference.index(stop_at)
    result = llama_engine.generate([prompt], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,)), ["qv-r4"])[0]
    assert result.token_ids == reference[: first + 1] and result.finish_reason == "stop"

    # A stop string made of the reference's own text, two characters from where a token starts:
    # the text before it comes back whole, including what was held back while it might match.
    text = _text_after(llama_engine.tokenizer, prompt, reference)
    start = len(_text_after(llama_engine.tokenizer, prompt, reference[:6]))
    stop = text[start + 2 : start + 5]
    assert len(stop) == 3 and start + 2 > 0, text  # the reference must be long enough for this test
    cut = text.index(stop)
    result = llama_engine.generate([prompt], SamplingParams(max_new_tokens=10, stop=(stop,), ignore_eos=True), ["qv-r4"])[0]
    assert result.finish_reason == "stop" and result.text == text[:cut]
    decoded = _text_after(llama_engine.tokenizer, prompt, result.token_ids)
    assert decoded.startswith(text[:cut] + stop) and result.token_ids == reference[: len(result.token_ids)]


def test_eos_ends_a_request_unless_ignored(tiny_llama: TinyModel, llama_peft: Any, tmp_path: Path) -> None:
    """A copy of the tiny base whose config names as EOS a token its greedy output reaches."""
    prompt = list(range(5, 25))
    reference = llama_peft.greedy(prompt, None, 10)
    eos = reference[3]
    first = reference.index(eos)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama.path, model_dir)
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.exists():
            config = json.loads(path.read_text())
            config["eos_token_id"] = eos
            path.write_text(json.dumps(config))
    engine = make_engine(TinyModel("llama", model_dir, {}, tiny_llama.adapter_root), register=False)
    assert eos in engine.loaded.eos_token_ids
    stopped, ignored = engine.generate(
        [prompt, prompt], [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, ignore_eos=True)]
    )
    assert stopped.finish_reason == "stop" and stopped.token_ids == reference[: first + 1]
    assert stopped.text == _text_after(engine.tokenizer, prompt, reference[:first])  # EOS adds no text
    assert ignored.finish_reason == "length" and ignored.token_ids == reference
    engine.close()


def test_max_model_len_ends_with_length(tiny_llama: TinyModel) -> None:
    import dataclasses

    from conftest import engine_config
    from loraplex.config import ModelConfig
    from loraplex.engine.engine import Engine

    config = engine_config(tiny_llama)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, max_model_len=32))
    engine = Engine(config)
    result = engine.generate([list(range(3, 30))], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(prompt_token_ids=list(range(3, 40)))
    engine.close()
    assert isinstance(config.model, ModelConfig)


def test_bad_input_is_rejected_with_the_reason(llama_engine: Any) -> None:
    engine = llama_engine
    with pytest.raises(AdapterNotFoundError, match="nope"):
        engine.add_request("hello", adapter_id="nope")
    with pytest.raises(ValueError, match="exactly one"):
        engine.add_request("hi", prompt_token_ids=[1, 2])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request(prompt_token_ids=[10**6])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished()


def test_text_prompt(llama_engine: Any, llama_peft: Any) -> None:
    prompt_ids = llama_engine.tokenizer("The sun rises")["input_ids"]
    reference = llama_peft.greedy(prompt_ids, None, 5)
    assert not set(reference) & llama_engine.loaded.eos_token_ids  # else this test would need a stop
    result = llama_engine.generate(["The sun rises"], SamplingParams(max_new_tokens=5))[0]
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.finish_reason == "length" and result.token_ids == reference
    assert result.text == _text_after(llama_engine.tokenizer, prompt_ids, reference)


def test_sequences_never_outgrow_the_kv_cache(tiny_llama: TinyModel) -> None:
    engine = make_engine(tiny_llama, num_blocks=4, block_size=4)  # 16 tokens of KV in all
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request(prompt_token_ids=list(range(3, 23)))
    result = engine.generate([list(range(3, 13))], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 6  # 10 + 6 = 16 tokens
    assert engine.blocks.num_free_blocks == 4
    engine.close()


def test_stats_is_a_snapshot_of_requests_blocks_and_adapters(tiny_llama: TinyModel) -> None:
    engine = make_engine(tiny_llama, num_blocks=32, block_size=8, max_loras=2)
    idle = engine.stats()
    assert (idle.running, idle.waiting, idle.kv_blocks_used, idle.kv_blocks_free) == (0, 0, 0, 32)
    assert idle.adapters.device_slots == 2 and idle.adapters.registered == len(tiny_llama.adapters)
    assert idle.adapter_slot_bytes * 2 == engine.lora.pool_bytes and idle.last_step is None
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine.add_request(prompt_token_ids=list(range(3, 20)), params=params)  # 17 tokens: 3 blocks
    engine.add_request(prompt_token_ids=list(range(3, 12)), params=params, adapter_id="qv-r4")  # 9 tokens: 2 blocks
    queued = engine.stats()
    assert (queued.running, queued.waiting, queued.kv_blocks_used) == (0, 2, 0)  # in the inbox: waiting
    engine.store.wait_idle()
    engine.step()
    running = engine.stats()
    assert (running.running, running.waiting, running.kv_blocks_used, running.kv_blocks_free) == (2, 0, 5, 27)
    assert running.adapters.device_resident == 1 and running.last_step is not None
    assert running.last_step.num_requests == 2 and running.last_step.num_tokens == 17 + 9
    while engine.has_unfinished():
        engine.step()
    done = engine.stats()
    assert (done.running, done.waiting, done.kv_blocks_used, done.kv_blocks_free) == (0, 0, 0, 32)
    engine.close()
