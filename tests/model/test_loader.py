from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TinyModel
from loraplex.config import ModelConfig
from loraplex.model.loader import load_base_model
from loraplex.startup import StartupError


def test_nf4_layers_are_bitsandbytes_and_compute_in_fp32(tiny_llama: TinyModel) -> None:
    import bitsandbytes as bnb

    loaded = load_base_model(ModelConfig(str(tiny_llama.path), quantization="nf4", device="cpu", cpu_nf4_kernel="exact"))
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    assert loaded.dtype == torch.float32 and not getattr(q_proj, "support_avx512bf16_for_cpu", False)
    assert loaded.num_kv_heads == 2 and loaded.head_dim == 32 and 2 in loaded.eos_token_ids


def test_unquantized_and_bad_paths(tiny_llama: TinyModel, tmp_path: Path) -> None:
    loaded = load_base_model(ModelConfig(str(tiny_llama.path), quantization="none", device="cpu", max_model_len=128))
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert loaded.max_model_len == 128
    with pytest.raises(StartupError, match="no config.json"):
        load_base_model(ModelConfig(str(tmp_path)))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    with pytest.raises(StartupError, match=f"model '{tmp_path}' cannot be loaded"):
        load_base_model(ModelConfig(str(tmp_path)))
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig("x", quantization="int8")  # type: ignore[arg-type]
