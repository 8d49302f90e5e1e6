"""Adapter directories: every kind that cannot be served exactly is refused with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TinyModel, make_adapter
from loraplex.lora.adapter_spec import AdapterError, read_spec
from loraplex.lora.adapter_weights import load_weights


def _layers(engine: Any) -> Any:
    return engine.lora.layer_infos


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: Any) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"r": 4, "target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
        ({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"r": 4, "target_modules": ["q_proj"], "bias": "lora_only"}, "bias="),
        ({"r": 4, "target_modules": ["embed_tokens"]}, "embedding / lm_head"),
        ({"r": 4, "target_modules": ["lm_head"]}, "embedding / lm_head"),
        ({"r": 32, "target_modules": ["q_proj"]}, "above max_lora_rank 16"),
    ],
)
def test_unservable_peft_adapters_are_rejected(
    settings: dict[str, Any], reason: str, tiny_llama: TinyModel, llama_engine: Any, tmp_path: Path
) -> None:
    path = make_adapter(tiny_llama.path, tmp_path / "bad", seed=0, **settings)
    with pytest.raises(AdapterError, match=reason):
        read_spec(path, _layers(llama_engine), max_rank=16)


def test_target_the_base_lacks(tiny_llama: TinyModel, llama_engine: Any, tmp_path: Path) -> None:
    path = _edit_config(_copy(tiny_llama.adapters["qv-r4"], tmp_path / "a"), target_modules=["q_proj", "c_attn"])
    with pytest.raises(AdapterError, match="'c_attn' is not a linear layer"):
        read_spec(path, _layers(llama_engine), 16)
    path = _copy(tiny_llama.adapters["qv-r4"], tmp_path / "b")
    tensors = load_file(path / "adapter_model.safetensors")
    renamed = {k.replace("layers.0.self_attn.q_proj", "layers.7.self_attn.q_proj"): v for k, v in tensors.items()}
    save_file(renamed, path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"layers\.7\.self_attn\.q_proj.*does not have"):
        read_spec(path, _layers(llama_engine), 16)


def test_shapes_that_do_not_fit(tiny_llama: TinyModel, llama_engine: Any, tmp_path: Path) -> None:
    path = _copy(tiny_llama.adapters["qv-r4"], tmp_path / "a")
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(4, 64)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="do not fit"):
        read_spec(path, _layers(llama_engine), 16)


def test_pickle_only_and_missing_files(tiny_llama: TinyModel, llama_engine: Any, tmp_path: Path) -> None:
    path = _copy(tiny_llama.adapters["qv-r4"], tmp_path / "a")
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="never pickle"):
        read_spec(path, _layers(llama_engine), 16)
    (path / "adapter_model.bin").unlink()
    with pytest.raises(AdapterError, match="missing adapter_model.safetensors"):
        read_spec(path, _layers(llama_engine), 16)
    (path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        read_spec(path, _layers(llama_engine), 16)


def test_corrupt_files(tiny_llama: TinyModel, llama_engine: Any, tmp_path: Path) -> None:
    path = _copy(tiny_llama.adapters["qv-r4"], tmp_path / "a")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_spec(path, _layers(llama_engine), 16)
    path = _copy(tiny_llama.adapters["qv-r4"], tmp_path / "b")
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterError, match="safetensors"):
        read_spec(path, _layers(llama_engine), 16)
    path = _edit_config(_copy(tiny_llama.adapters["qv-r4"], tmp_path / "c"), peft_type="IA3")
    with pytest.raises(AdapterError, match="not LoRA"):
        read_spec(path, _layers(llama_engine), 16)


def test_nan_weights_fail_at_load(tiny_llama: TinyModel, llama_engine: Any, tmp_path: Path) -> None:
    path = _copy(tiny_llama.adapters["qv-r4"], tmp_path / "a")
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, path / "adapter_model.safetensors")
    spec = read_spec(path, _layers(llama_engine), 16)
    with pytest.raises(AdapterError, match="NaN"):
        load_weights(spec, torch.float32)


def test_scales_are_peft_scales(tiny_llama: TinyModel, llama_engine: Any) -> None:
    """Folded Bᵀ equals PEFT's scaling × lora_B for rsLoRA and rank / alpha patterns."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ("all-r8-rslora", "all-r16-patterns"):
        spec = read_spec(tiny_llama.adapters[name], _layers(llama_engine), 16)
        weights = load_weights(spec, torch.float32)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, tiny_llama.adapters[name])
        checked = 0
        for module_name, module in peft.base_model.model.named_modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                ours = weights.modules[module_name]
                expected_b = module.lora_B["default"].weight.t() * module.scaling["default"]
                torch.testing.assert_close(ours.b, expected_b, rtol=1e-6, atol=0)
                torch.testing.assert_close(ours.a, module.lora_A["default"].weight, rtol=0, atol=0)
                checked += 1
        assert checked == len(weights.modules) > 0
