"""Mistral's sliding window: prefill, chunked prefill and decode masks against PEFT's generate."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import PeftReference, build_tiny, make_engine
from loraplex.engine.request import SamplingParams


@pytest.mark.parametrize("chunk", [2048, 8])
def test_sliding_window_matches_peft(chunk: int, tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny = build_tiny("mistral", tmp_path_factory.mktemp("mistral"), tokenizer, seed=3)
    reference = PeftReference(tiny)
    engine = make_engine(tiny, max_num_batched_tokens=chunk)
    prompts = [list(range(5, 35)), list(range(40, 49)), list(range(60, 80))]  # 30 and 20 tokens: past the window of 12
    adapters: list[str | None] = ["all-r8-rslora", None, "qv-r4"]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True), adapters)
    for prompt, adapter, result in zip(prompts, adapters, results):
        assert result.token_ids == reference.greedy(prompt, adapter, 16), adapter
    engine.close()
