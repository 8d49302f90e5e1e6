"""Benchmark models and adapters, made here: random Llama-shaped bases and PEFT-format LoRA
directories written directly (the same files PEFT's save_pretrained writes)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CACHE = Path(".cache/bench")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    vocab_size: int = 32000
    max_position_embeddings: int = 2048

    @property
    def name(self) -> str:
        return f"llama-d{self.hidden_size}-l{self.num_hidden_layers}"

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each projection."""
        d, f = self.hidden_size, self.intermediate_size
        kv = self.num_key_value_heads * (d // self.num_attention_heads)
        return {
            "q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
        }


CPU_BENCH = ModelShape()  # the CPU bench model: hidden 1024, 8 layers
SMALL = ModelShape(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=4096)
TINY = ModelShape(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
LLAMA_7B = ModelShape(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)


def _tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer that decodes every id (prompts are given as token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_model(shape: ModelShape, root: Path = CACHE, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """A random Llama with this shape, saved once and reused (a 7B one is made on the GPU in bf16)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = root / shape.name
    marker = path / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(shape):
        return path
    start = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**asdict(shape), tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    del model
    _tokenizer(shape.vocab_size).save_pretrained(path)
    marker.write_text(json.dumps(asdict(shape)))
    print(f"[bench] model {shape.name} written in {time.perf_counter() - start:.1f}s")
    return path


def make_adapters(
    shape: ModelShape, count: int, rank: int = 16, targets: tuple[str, ...] = ALL_LINEAR, root: Path = CACHE,
    dtype: torch.dtype = torch.float32,
) -> tuple[Path, list[str]]:
    """`count` PEFT LoRA directories under one root; returns (root, ids). Reused when present."""
    base = root / f"{shape.name}-adapters-r{rank}-{'-'.join(t[0] for t in targets)}"
    shapes = shape.module_shapes()
    ids = []
    for i in range(count):
        adapter_id = f"tenant{i % 10}/a{i:04d}"
        ids.append(adapter_id)
        path = base / adapter_id
        if (path / "adapter_model.safetensors").is_file():
            continue
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(shape.num_hidden_layers):
            for name in targets:
                d_in, d_out = shapes[name]
                part = "self_attn" if name in ATTENTION else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{name}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * d_in**-0.5).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01).to(dtype)
        _save_peft_dir(path, tensors, rank, targets)
    return base, ids


def make_adapter_set(
    shape: ModelShape, name: str, ranks: list[int], targets: tuple[str, ...] = ALL_LINEAR, root: Path = CACHE,
) -> tuple[Path, list[str]]:
    """One PEFT directory per rank in `ranks` (ids `name/aNNNN-rR`) under one root; reused when present."""
    base = root / f"{shape.name}-adapter-sets"
    shapes = shape.module_shapes()
    ids = []
    for i, rank in enumerate(ranks):
        adapter_id = f"{name}/a{i:04d}-r{rank}"
        ids.append(adapter_id)
        path = base / adapter_id
        if (path / "adapter_model.safetensors").is_file():
            continue
        g = torch.Generator().manual_seed(2000 + i)
        tensors = {}
        for layer in range(shape.num_hidden_layers):
            for module in targets:
                d_in, d_out = shapes[module]
                key = f"base_model.model.model.layers.{layer}.{'self_attn' if module in ATTENTION else 'mlp'}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * d_in**-0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
        _save_peft_dir(path, tensors, rank, targets)
    return base, ids


def adapter_bytes(shape: ModelShape, rank: int, targets: tuple[str, ...] = ALL_LINEAR, itemsize: int = 4) -> int:
    """Bytes of one adapter's A and B at its own rank: what a decode step reads for it."""
    shapes = shape.module_shapes()
    return shape.num_hidden_layers * sum(rank * (shapes[m][0] + shapes[m][1]) for m in targets) * itemsize


def _save_peft_dir(path: Path, tensors: dict[str, torch.Tensor], rank: int, targets: tuple[str, ...]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "modules_to_save": None, "base_model_name_or_path": "random-llama",
    }))
