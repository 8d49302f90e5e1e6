"""Reading a checked adapter's tensors (the host tier): the only adapter code that needs torch.

    AdapterSpec (adapter_spec.py) ──load_weights──> AdapterWeights: per module A [r, d_in] and
                                                    Bᵀ [r, d_out] with PEFT's scale folded in

Runs on the adapter store's loader thread (injected as the store's `load_fn`). The bytes come
from `read_adapter_files`, which checks them against the registration (the content hash of a
directory, the object ETags of an s3:// adapter), so files changed since are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraplex.lora.adapter_spec import (
    LORA_KEY_RE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterSpec,
    read_adapter_files,
)


@dataclass(frozen=True, slots=True)
class LoraModuleWeights:
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [r, d_out]: B transposed, PEFT's scale folded in


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """Validated tensors of one adapter (the host tier)."""

    modules: dict[str, LoraModuleWeights]
    rank: int
    nbytes: int


def load_weights(spec: AdapterSpec, dtype: torch.dtype, pin_memory: bool = False) -> AdapterWeights:
    """Read the tensors of a checked adapter, fold PEFT's scale into B and cast once."""
    path = spec.display_path  # how messages name it: relative to its root, or its URI
    _, data = read_adapter_files(spec)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, RuntimeError) as e:
        raise AdapterError(f"{path}: cannot read {WEIGHTS_FILE}: {e}") from None
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY_RE.match(key)
        if match is not None:
            by_module.setdefault(match["module"], {})[match["kind"]] = tensor

    modules: dict[str, LoraModuleWeights] = {}
    nbytes = 0
    for module, rank in spec.module_ranks.items():
        pair = by_module.get(module, {})
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{path}: {module}: tensors changed on disk since the adapter was registered")
        scale = spec.scale_for(module, rank)
        # Fold the scale into B in fp32, then cast once: x @ Aᵀ @ (s·B)ᵀ == s·(x @ Aᵀ @ Bᵀ).
        b_t = (b.to(torch.float32) * scale).t().to(dtype).contiguous()
        a_c = a.to(dtype).contiguous()
        if not (torch.isfinite(a_c).all() and torch.isfinite(b_t).all()):
            raise AdapterError(f"{path}: {module}: LoRA weights contain NaN or Inf")
        if pin_memory:
            a_c, b_t = a_c.pin_memory(), b_t.pin_memory()
        modules[module] = LoraModuleWeights(a=a_c, b=b_t)
        nbytes += a_c.nbytes + b_t.nbytes
    return AdapterWeights(modules=modules, rank=spec.rank, nbytes=nbytes)
