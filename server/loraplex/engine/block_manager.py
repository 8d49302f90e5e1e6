"""KV-cache block bookkeeping: which fixed-size blocks each sequence holds, shared or its own. No torch here.

The tensors live in kv_cache.py; this file only hands out block numbers. A sequence's
token at position p lives in block `block_table[p // block_size]`, row `p % block_size`.

With prefix caching (prefix_cache.py) a block may sit in several block tables at once: a
reference count says how many. The rules that keep shared KV right:
- only full blocks of computed tokens are shared; a request starts from the longest run of
  cached full blocks of its tokens, and always computes its last token (its logits are
  needed), so a hit stops one token short of the end;
- a request writes KV only at positions >= its num_computed_tokens: into its own blocks (the
  partial last one and new ones), never into a shared block;
- a block whose last holder leaves keeps its KV and hash (parked, LRU) and is reused for new
  tokens only when no never-hashed block is free.

Who calls what (all on the engine thread, from Scheduler):
  lookup(request)                      admission: the cached blocks a waiting request can start from
                                       (no state changes; the hit stays valid until the next
                                       allocate, so check and allocation are one step)
  can_allocate(request, n, hit)        do n more tokens fit (after the hit)? parked hit blocks
                                       count as taken, since the hit removes them from the free ones
  allocate(request, n, hit)            takes the hit blocks (refcount + 1) and fresh ones
  commit(request)                      start of each schedule, for the running requests: blocks
                                       the last step filled with computed tokens join the cache
  free(request)                        finish or preempt: commits, then drops its references
"""

from __future__ import annotations

from collections import deque

from loraplex.engine.prefix_cache import NO_HIT, PrefixCache, PrefixHit, extend_hashes
from loraplex.engine.request import Request
from loraplex.engine.stats import PrefixCacheStats


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        """prefix_caching: reported in the stats only; a request's cache_key decides what it shares."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free and never hashed (or evicted)
        self.cache = PrefixCache()
        # Cumulative, for metrics: tokens looked up at admission, and those found cached.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, cached ones included: the cache costs no capacity."""
        return len(self._free) + self.cache.num_evictable

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> int:
        """Fresh blocks to add so that `num_new_tokens` more tokens fit after the computed
        ones (after the hit's, for a request being admitted with one)."""
        computed = hit.num_tokens if hit.blocks else request.num_computed_tokens
        need = -(-(computed + num_new_tokens) // self.block_size)
        return max(0, need - len(request.block_table) - len(hit.blocks))

    def lookup(self, request: Request) -> PrefixHit:
        """The longest run of cached full blocks a waiting request (no blocks yet) starts from."""
        if request.cache_key is None or request.block_table:
            return NO_HIT
        max_blocks = (request.num_tokens - 1) // self.block_size  # the last token is computed
        self._hash(request, max_blocks)
        blocks: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.cache.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(tuple(blocks), len(blocks) * self.block_size)

    def can_allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        parked = sum(1 for b in hit.blocks if self.cache.is_parked(b))
        return self.blocks_needed(request, num_new_tokens, hit) + parked <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> None:
        if not self.can_allocate(request, num_new_tokens, hit):
            raise RuntimeError(
                f"request {request.request_id}: needs {self.blocks_needed(request, num_new_tokens, hit)} KV blocks, "
                f"{self.num_free_blocks} free"
            )
        n = self.blocks_needed(request, num_new_tokens, hit)
        if not request.block_table:  # admission
            if hit.blocks and request.num_computed_tokens:
                raise RuntimeError(f"request {request.request_id}: a prefix hit needs a request with no KV")
            if request.cache_key is not None:
                self.num_queried_tokens += request.num_tokens
                self.num_hit_tokens += hit.num_tokens
            for block in hit.blocks:
                if self._refs[block] == 0:
                    self.cache.take(block)
                self._refs[block] += 1
            request.block_table.extend(hit.blocks)
            request.num_cached_blocks = len(hit.blocks)
            if hit.blocks:
                request.num_computed_tokens = hit.num_tokens
        request.block_table.extend(self._fresh() for _ in range(n))

    def free(self, request: Request) -> None:
        self.commit(request)
        # Tail first: of a sequence's parked blocks, the end of the prefix is evicted before its head.
        for block in reversed(request.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self.cache.hashed(block):
                    self.cache.park(block)
                else:
                    # Recently freed blocks go to the back: a preempted sequence's blocks are not reused first.
                    self._free.append(block)
        request.block_table = []
        request.num_cached_blocks = 0

    def _fresh(self) -> int:
        block = self._free.popleft() if self._free else self.cache.evict()
        self._refs[block] = 1
        return block

    def commit(self, request: Request) -> None:
        """Offer the request's blocks that are now full of computed tokens to the cache."""
        if request.cache_key is None:
            return
        full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        if full <= request.num_cached_blocks:
            return
        self._hash(request, full)
        for i in range(request.num_cached_blocks, full):
            self.cache.insert(request.block_hashes[i], request.block_table[i])
        request.num_cached_blocks = full

    def _hash(self, request: Request, num_blocks: int) -> None:
        if len(request.block_hashes) < num_blocks:
            assert request.cache_key is not None
            extend_hashes(request.block_hashes, request.cache_key, request.all_token_ids, self.block_size, num_blocks)

    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self.prefix_caching, self.num_queried_tokens, self.num_hit_tokens, self.cache.num_evicted, len(self.cache)
        )

    def ref_count(self, block: int) -> int:
        """How many block tables hold `block` (tests and invariants)."""
        return self._refs[block]
