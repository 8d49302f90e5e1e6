"""The per-step context: everything one forward pass reads, built once by the model runner.

    ModelRunner.run(batch) ──builds──> StepContext
        ├── attention (attention.py) reads it: transformers hands it to the attention function
        │   as the forward keyword `loraplex_step` (the route transformers uses for flash
        │   attention's packed-sequence lengths), once per layer
        └── the LoRA layers read its `lora` part: the LoraBatch the runner gives LoraModel for
            the step (lora/ never imports engine/, so they get it by injection, not from here)

Names: a *KV row* is one token's row in the paged KV cache (block * block_size + offset);
an *adapter slot* is an index of the LoRA pool (lora/). They never mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.engine.kv_cache import KVCache
from loraplex.lora.lora_backend import LoraBatch


@dataclass(slots=True)
class PrefillSpan:
    start: int  # first token of the span in the packed batch
    length: int  # query tokens
    context_len: int  # keys visible to the last query token (cached + this span)
    kv_rows: torch.Tensor | None  # [context_len] KV rows of its keys; None when the span is the whole context


@dataclass(slots=True)
class StepContext:
    kv_cache: KVCache
    kv_write_rows: torch.Tensor  # [T] KV row each new token's key and value are written to
    prefills: list[PrefillSpan]
    decode_index: torch.Tensor | None  # [B] token positions of the decodes in the packed batch
    decode_kv_rows: torch.Tensor | None  # [B * L] KV rows of each decode's keys, L = longest context
    decode_context_lens: torch.Tensor | None  # [B]
    lora: LoraBatch  # segments of tokens per adapter slot, and the backend's per-step data
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, 1, L] True where a decode token may attend; built once per step and window."""
        mask = self._decode_masks.get(sliding_window)
        if mask is None:
            assert self.decode_kv_rows is not None and self.decode_context_lens is not None
            length = self.decode_kv_rows.shape[0] // self.decode_context_lens.shape[0]
            pos = torch.arange(length, device=self.decode_context_lens.device)
            ctx = self.decode_context_lens[:, None]
            mask = pos[None, :] < ctx
            if sliding_window is not None:
                mask &= pos[None, :] >= ctx - sliding_window
            mask = mask[:, None, None, :]
            self._decode_masks[sliding_window] = mask
        return mask
