"""The paged KV cache: per-layer block tensors, and the cache object transformers writes through.

transformers' attention modules call `past_key_values.update(key, value, layer_idx)` with the
step's new keys and values (after RoPE); `KVCache.update` writes them into their blocks at
the step's slot mapping and hands them back unchanged. The attention function
(attention.py) then reads each sequence's keys and values from the blocks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from loraplex.engine.attention import AttentionMetadata

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 4 << 30  # default cap on the CPU


class KVCache:
    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # key[layer]: [num_blocks, block_size, n_kv, head_dim]
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.meta: AttentionMetadata | None = None  # set by the model runner for each step

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Write the step's keys/values ([1, n_kv, T, head_dim]) into their blocks."""
        meta = self.meta
        if meta is None:
            raise RuntimeError("KVCache.update called outside an engine step")
        slots = meta.slot_mapping  # [T]
        flat_k = self.key[layer_idx].view(-1, self.num_kv_heads, self.head_dim)
        flat_v = self.value[layer_idx].view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, slots, key_states[0].transpose(0, 1).to(flat_k.dtype))
        flat_v.index_copy_(0, slots, value_states[0].transpose(0, 1).to(flat_v.dtype))
        return key_states, value_states

    # transformers may ask these of a cache; the engine passes position_ids, so they are unused.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.key) + sum(t.nbytes for t in self.value)


def plan_num_blocks(
    requested: int | None, max_num_seqs: int, max_model_len: int, block_size: int, bytes_per_block: int,
    device: torch.device, memory_fraction: float,
) -> int:
    """How many blocks to allocate: the request, or enough for every sequence at full length within memory."""
    per_seq = -(-max_model_len // block_size)
    if requested is not None:
        if requested < per_seq:
            log.warning("num_blocks=%d holds less than one sequence of max_model_len=%d", requested, max_model_len)
        return requested
    wanted = max_num_seqs * per_seq
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * memory_fraction)
    else:
        budget = CPU_KV_CACHE_BYTES
    fit = budget // bytes_per_block
    if fit < per_seq:
        raise ValueError(
            f"the KV cache budget ({budget} bytes) holds {fit} blocks, less than one sequence of "
            f"max_model_len={max_model_len} ({per_seq} blocks); lower max_model_len"
        )
    return int(min(wanted, fit))
