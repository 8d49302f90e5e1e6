"""The paged KV cache: per-layer block tensors.

A token's key and value live at one *KV row*: row `block * block_size + offset` of the
flattened [num_blocks * block_size, n_kv, head_dim] view of a layer's tensors (the block
manager hands out the blocks). The attention function (attention.py) writes the step's new
keys and values at the step's KV write rows, then reads each sequence's rows back.
"""

from __future__ import annotations

import logging

import torch

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

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor) -> None:
        """Write one layer's new keys and values ([1, n_kv, T, head_dim]) at their KV rows ([T])."""
        flat_k = self.key[layer].view(-1, self.num_kv_heads, self.head_dim)
        flat_v = self.value[layer].view(-1, self.num_kv_heads, self.head_dim)
        flat_k.index_copy_(0, rows, key[0].transpose(0, 1).to(flat_k.dtype))
        flat_v.index_copy_(0, rows, value[0].transpose(0, 1).to(flat_v.dtype))

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
