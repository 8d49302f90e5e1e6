"""Choosing the LoRA backend, once, when the LoRA layers are built (as vLLM's punica selector).

    CUDA and triton importable ──> TritonLora (triton_lora.py: SGMV kernels)
    otherwise (CPU, or no triton) ──> TorchLora (lora_ops.py: segment and dense torch forms)

No layer branches on the backend afterwards: each reads the one chosen here.
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.lora.lora_backend import LoraBackend
from loraplex.lora.lora_ops import TorchLora
from loraplex.lora.triton_lora import TritonLora
from loraplex.lora.triton_ops import HAVE_TRITON


def select_lora_backend(device: torch.device, dtype: torch.dtype) -> LoraBackend[Any]:
    if device.type == "cuda" and HAVE_TRITON:
        return TritonLora(device)
    return TorchLora(dtype, device)
