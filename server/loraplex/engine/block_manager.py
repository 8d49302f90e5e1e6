"""KV-cache block bookkeeping: which fixed-size blocks each sequence owns. No torch here.

The tensors live in kv_cache.py; this file only hands out block numbers. A sequence's
token at position p lives in block `block_table[p // block_size]`, row `p % block_size`.
"""

from __future__ import annotations

from collections import deque

from loraplex.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to add so that `num_new_tokens` more tokens fit after the computed ones."""
        total = request.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - len(request.block_table))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(request, num_new_tokens) <= len(self._free)

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        n = self.blocks_needed(request, num_new_tokens)
        if n > len(self._free):
            raise RuntimeError(f"request {request.request_id}: needs {n} KV blocks, {len(self._free)} free")
        request.block_table.extend(self._free.popleft() for _ in range(n))

    def free(self, request: Request) -> None:
        # Recently freed blocks go to the back: a preempted sequence's blocks are not reused first.
        self._free.extend(request.block_table)
        request.block_table = []
