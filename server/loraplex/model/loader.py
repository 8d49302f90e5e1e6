"""Loading the base model: a local Hugging Face causal-LM directory, NF4 (bitsandbytes) or as is.

transformers' own model definitions run unchanged; the engine swaps in its attention
function (engine/attention.py) and wraps the linear layers with LoRA (lora/lora_layer.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.config import ModelConfig
from loraplex.logs import progress_bars
from loraplex.startup import MODEL_FIX, StartupError, check_model_dir

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite")
DEFAULT_MAX_MODEL_LEN = 4096
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    model_type: str
    quantization: str
    path: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise StartupError("device=cuda was asked for, but no CUDA device is available", "use --device auto or cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return frozenset(ids)


def exact_nf4_compute(model: Any) -> int:
    """Make bitsandbytes' CPU NF4 layers compute exactly in the compute dtype.

    On CPUs with AVX512-BF16, bitsandbytes runs NF4 matmuls through a fused kernel that
    rounds activations and outputs to bf16 whatever the compute dtype: fast at decode, but
    a 1e-7 difference upstream can flip a bf16 rounding. This turns it off (dequantize +
    GEMM in the compute dtype): slower at decode, faster for long prefills, and results that
    agree with any other exact implementation to float rounding. Returns the layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_base_model(config: ModelConfig) -> LoadedModel:
    """Load the base; a directory transformers cannot load raises StartupError naming it."""
    check_model_dir(config.model)
    try:
        return _load(config)
    except (OSError, ValueError) as e:  # transformers' word for a missing weights file, unknown model type, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StartupError(f"model {config.model!r} cannot be loaded: {first_line}", MODEL_FIX) from e


def _load(config: ModelConfig) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    hf_config = AutoConfig.from_pretrained(path)
    if hf_config.model_type not in SUPPORTED_FAMILIES:
        log.warning("model type %r is untested; Llama / Mistral / Qwen2-style module names are expected", hf_config.model_type)

    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": str(device)}}
    if config.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    log.info("loading %s (%s, %s, %s)", path, config.quantization, str(dtype).removeprefix("torch."), device)
    # bitsandbytes may try to fetch optional CPU kernels from a hub; there is no network here.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The "Loading weights" bar: on a terminal only, never inside JSON logs.
    if progress_bars():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    model.requires_grad_(False)
    if config.quantization == "nf4" and device.type == "cpu" and config.cpu_nf4_kernel == "exact":
        exact_nf4_compute(model)
    tokenizer = AutoTokenizer.from_pretrained(path)

    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    max_len = getattr(text_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
    max_model_len = config.max_model_len or min(max_len, DEFAULT_MAX_MODEL_LEN)
    if max_model_len > max_len:
        raise StartupError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {max_len}",
            f"set --max-model-len to at most {max_len}",
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        num_layers=text_config.num_hidden_layers,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=text_config.vocab_size,
        max_model_len=max_model_len,
        eos_token_ids=_eos_ids(model, tokenizer),
        model_type=hf_config.model_type,
        quantization=config.quantization,
        path=str(path),
    )
