"""Attention over the paged KV cache, plugged into transformers' own model code.

The engine registers `paged_attention` under ATTENTION_NAME with transformers'
AttentionInterface and sets it on the model. No mask function is registered under that
name, so transformers builds no mask; the runner passes no transformers cache either
(`past_key_values=None`), so each call gets the step's new keys and values (after RoPE) and
the step's `StepContext` as the keyword argument `loraplex_step`. It writes the keys and
values to their KV rows, then attends over the cache.

The step's tokens are one packed row ([1, T]) of many sequences:
- prefill spans (a whole prompt, or a chunk of one): causal attention per span; a first
  chunk attends to its own keys, a later chunk to the cached keys before it too;
- decode tokens (one per sequence): batched into one SDPA call against each sequence's
  blocks, gathered by block table and masked by context length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from loraplex.engine.step_context import StepContext

ATTENTION_NAME = "loraplex_paged"


def _gather(cache: torch.Tensor, rows: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """cache [N, bs, n_kv, d] at flat rows [S * L] -> [S, n_kv, L, d].

    index_select on the flattened cache is twice as fast on the CPU as indexing by block
    table, and the rows are computed once per step for every layer.
    """
    n_kv, d = cache.shape[-2], cache.shape[-1]
    picked = cache.view(-1, n_kv, d).index_select(0, rows)  # [S * L, n_kv, d]
    return picked.view(num_seqs, -1, n_kv, d).transpose(1, 2)


def _prefill_mask(q_len: int, ctx_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
    k_pos = torch.arange(ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, d]; key/value: [1, n_kv, T, d], the step's new tokens.

    Returns [1, T, H, d], the layout transformers' attention modules expect.
    """
    meta: StepContext | None = kwargs.get("loraplex_step")
    if meta is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs the engine's step context")
    layer: int = module.layer_idx  # type: ignore[assignment]
    k_cache, v_cache = meta.kv_cache.key[layer], meta.kv_cache.value[layer]  # [N, bs, n_kv, d]
    meta.kv_cache.write(layer, key, value, meta.kv_write_rows)
    num_heads, num_tokens = query.shape[1], query.shape[2]
    gqa = num_heads != key.shape[1]
    out = query.new_empty(num_tokens, num_heads, query.shape[-1])  # [T, H, d]

    for span in meta.prefills:
        s, e = span.start, span.start + span.length
        q = query[:, :, s:e]
        if span.kv_rows is None:  # the whole context is this span: causal over itself
            if sliding_window is None or span.length <= sliding_window:
                o = F.scaled_dot_product_attention(q, key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, enable_gqa=gqa)
            else:
                mask = _prefill_mask(span.length, span.length, sliding_window, query.device)
                o = F.scaled_dot_product_attention(q, key[:, :, s:e], value[:, :, s:e], attn_mask=mask, scale=scaling, enable_gqa=gqa)
        else:
            k = _gather(k_cache, span.kv_rows, 1)  # [1, n_kv, ctx, d]
            v = _gather(v_cache, span.kv_rows, 1)
            mask = _prefill_mask(span.length, span.context_len, sliding_window, query.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[s:e] = o[0].transpose(0, 1)

    if meta.decode_index is not None:
        assert meta.decode_kv_rows is not None
        num_decodes = meta.decode_index.shape[0]
        q = query[0].index_select(1, meta.decode_index).transpose(0, 1)[:, :, None]  # [B, H, 1, d]
        k = _gather(k_cache, meta.decode_kv_rows, num_decodes)  # [B, n_kv, L, d]
        v = _gather(v_cache, meta.decode_kv_rows, num_decodes)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=meta.decode_mask(sliding_window), scale=scaling, enable_gqa=gqa
        )  # [B, H, 1, d]
        out.index_copy_(0, meta.decode_index, o[:, :, 0])

    return out[None], None


def register() -> None:
    """Make ATTENTION_NAME known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
