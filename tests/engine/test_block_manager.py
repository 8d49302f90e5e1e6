from __future__ import annotations

import pytest

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.prefix_cache import NO_HIT, PrefixHit
from loraplex.engine.request import Request, SamplingParams


def _request(n_prompt: int) -> Request:
    return Request("r", list(range(n_prompt)), SamplingParams())


def test_allocate_grows_by_whole_blocks_and_free_returns_them() -> None:
    blocks = BlockManager(num_blocks=5, block_size=4)
    r = _request(6)
    assert blocks.blocks_needed(r, 6) == 2
    blocks.allocate(r, 6)
    r.num_computed_tokens = 6
    assert len(r.block_table) == 2 and blocks.num_free_blocks == 3
    assert blocks.blocks_needed(r, 2) == 0  # positions 6, 7 fit in block 2
    assert blocks.blocks_needed(r, 3) == 1
    blocks.allocate(r, 3)
    assert len(set(r.block_table)) == 3
    blocks.free(r)
    assert r.block_table == [] and blocks.num_free_blocks == 5


def test_cannot_allocate_past_free_blocks() -> None:
    blocks = BlockManager(num_blocks=2, block_size=4)
    r = _request(9)
    assert not blocks.can_allocate(r, 9)
    with pytest.raises(RuntimeError, match="needs 3 KV blocks"):
        blocks.allocate(r, 9)
    assert blocks.num_free_blocks == 2 and r.block_table == []


# -- prefix caching --------------------------------------------------------------------

BS = 4


def _req(rid: str, tokens: list[int], key: str | None = "base") -> Request:
    return Request(rid, list(tokens), SamplingParams(), cache_key=key)


def _prefill(blocks: BlockManager, r: Request) -> PrefixHit:
    """Admit `r` with whatever the cache holds, then compute all its tokens (as a step would)."""
    hit = blocks.lookup(r)
    blocks.allocate(r, r.num_tokens - hit.num_tokens, hit)
    r.num_computed_tokens = r.num_tokens
    return hit


def _invariants(blocks: BlockManager, *live: Request) -> None:
    """Refcounts equal the block tables holding each block; free + held = all."""
    held: dict[int, int] = {}
    for r in live:
        for b in r.block_table:
            held[b] = held.get(b, 0) + 1
    assert all(blocks.ref_count(b) == held.get(b, 0) for b in range(blocks.num_blocks))
    assert blocks.num_used_blocks == len(held)


def test_freed_full_blocks_are_hit_by_the_same_prefix_only() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a = _req("a", list(range(10)))  # blocks: [0..3] [4..7] [8, 9]
    assert _prefill(blocks, a) == NO_HIT
    table = list(a.block_table)
    blocks.free(a)
    assert blocks.num_free_blocks == 8 and len(blocks.cache) == 2  # the partial block has no hash

    b = _req("b", [*range(8), 50, 51, 52])
    hit = blocks.lookup(b)
    assert hit == PrefixHit((table[0], table[1]), 8)
    blocks.allocate(b, b.num_tokens - hit.num_tokens, hit)
    assert b.num_computed_tokens == 8 and b.block_table[:2] == table[:2] and len(b.block_table) == 3
    assert b.block_table[2] not in table  # a's partial block is not shared: b writes its own
    _invariants(blocks, b)

    # Same tokens, other weights: no hit. Same later block after another first block: no hit (chained).
    assert blocks.lookup(_req("c", list(range(10)), key="adapter:acme/x@h1")) == NO_HIT
    assert blocks.lookup(_req("d", [99, 1, 2, 3, *range(4, 10)])) == NO_HIT
    assert blocks.lookup(_req("e", list(range(10)), key=None)) == NO_HIT


def test_the_last_token_is_always_computed() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a = _req("a", list(range(8)))  # exactly two blocks
    _prefill(blocks, a)
    blocks.free(a)
    again = _req("again", list(range(8)))
    hit = blocks.lookup(again)
    assert hit.num_tokens == 4  # not 8: the second block is recomputed for the last token's logits
    blocks.allocate(again, 4, hit)
    assert again.num_computed_tokens == 4 and len(again.block_table) == 2
    assert blocks.ref_count(again.block_table[1]) == 1  # its own block, not the cached one


def test_blocks_shared_while_running_are_refcounted() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a = _req("a", list(range(9)))
    _prefill(blocks, a)
    blocks.commit(a)  # the scheduler does this at the start of the next step
    b = _req("b", [*range(8), 77, 78])
    assert _prefill(blocks, b).num_tokens == 8
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared and all(blocks.ref_count(x) == 2 for x in shared)
    _invariants(blocks, a, b)
    blocks.free(a)  # preemption or finish of one holder keeps the other's blocks
    assert all(blocks.ref_count(x) == 1 for x in shared) and blocks.num_used_blocks == 3
    _invariants(blocks, b)
    blocks.free(b)
    assert blocks.num_free_blocks == 8 and blocks.cache.num_evictable == 2
    _invariants(blocks)


def test_parked_blocks_are_evicted_last_and_least_recently_freed_first() -> None:
    blocks = BlockManager(num_blocks=4, block_size=BS)
    a, b = _req("a", list(range(5))), _req("b", list(range(100, 105)))
    _prefill(blocks, a)
    _prefill(blocks, b)
    blocks.free(a)  # a's full block parked first (older), then b's
    blocks.free(b)
    assert blocks.cache.num_evictable == 2 and blocks.num_free_blocks == 4
    c = _req("c", list(range(200, 208)))  # needs 2 blocks: the 2 never-hashed ones
    _prefill(blocks, c)
    assert blocks.cache.num_evicted == 0
    assert blocks.lookup(_req("a2", list(range(5)))).num_tokens == 4
    d = _req("d", list(range(300, 303)))  # needs 1 block: a's parked block goes (least recent)
    _prefill(blocks, d)
    assert blocks.cache.num_evicted == 1
    assert blocks.lookup(_req("a3", list(range(5)))) == NO_HIT
    assert blocks.lookup(_req("b2", list(range(100, 105)))).num_tokens == 4
    _invariants(blocks, c, d)


def test_can_allocate_counts_the_parked_blocks_a_hit_takes() -> None:
    blocks = BlockManager(num_blocks=4, block_size=BS)
    a = _req("a", list(range(9)))  # 3 blocks, 2 full
    _prefill(blocks, a)
    blocks.free(a)  # 4 free, of which 2 parked with a's prefix
    b = _req("b", [*range(8), *range(50, 60)])  # hits 2, needs ceil(18 / 4) - 2 = 3 fresh
    hit = blocks.lookup(b)
    assert hit.num_tokens == 8 and blocks.blocks_needed(b, 10, hit) == 3
    # 3 fresh + 2 hit > 4 free: the fresh ones could only come from evicting the hit itself.
    assert not blocks.can_allocate(b, 10, hit)
    assert blocks.can_allocate(b, 6, hit)  # 2 fresh + 2 hit
    blocks.allocate(b, 6, hit)
    assert b.block_table[:2] == list(hit.blocks) and blocks.cache.num_evicted == 0
    _invariants(blocks, b)


def test_two_requests_computing_one_prefix_keep_one_cached_copy() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a, b = _req("a", list(range(6))), _req("b", list(range(6)))
    _prefill(blocks, a)
    _prefill(blocks, b)  # admitted in the same step: nothing cached yet
    blocks.commit(a)
    blocks.commit(b)
    assert len(blocks.cache) == 1 and blocks.cache.get(a.block_hashes[0]) == a.block_table[0]
    blocks.free(b)
    blocks.free(a)
    assert blocks.cache.num_evictable == 1 and blocks.num_free_blocks == 8


def test_hit_counters_count_admissions() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a = _req("a", list(range(10)))
    _prefill(blocks, a)
    blocks.free(a)
    _prefill(blocks, _req("b", list(range(10))))
    _prefill(blocks, _req("off", list(range(10)), key=None))  # not a query: caching off for it
    assert (blocks.num_queried_tokens, blocks.num_hit_tokens) == (20, 8)
    _prefill(blocks, _req("c", list(range(10))))  # a second hit adds to the first
    assert (blocks.num_queried_tokens, blocks.num_hit_tokens) == (30, 16)
    stats = blocks.prefix_cache_stats()
    assert (stats.enabled, stats.queried_tokens, stats.hit_tokens, stats.evictions, stats.cached_blocks) == (True, 30, 16, 0, 2)
    assert BlockManager(4, BS, prefix_caching=False).prefix_cache_stats().enabled is False


# What mutation testing (make mutants) found untested: the size check, what free leaves on the
# request, and the refusal of a hit for a request that already has KV.


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 4)])
def test_sizes_below_one_are_refused(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="num_blocks and block_size must be >= 1"):
        BlockManager(num_blocks, block_size)


def test_smallest_sizes_work() -> None:
    blocks = BlockManager(num_blocks=1, block_size=1)
    r = _request(1)
    blocks.allocate(r, 1)
    assert len(r.block_table) == 1 and blocks.num_free_blocks == 0


def test_free_leaves_the_request_holding_nothing() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a = _req("a", list(range(10)))
    _prefill(blocks, a)
    blocks.commit(a)
    assert a.num_cached_blocks == 2
    blocks.free(a)
    assert a.block_table == [] and a.num_cached_blocks == 0


def test_a_hit_for_a_request_that_has_kv_is_refused() -> None:
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a = _req("a", list(range(10)))
    _prefill(blocks, a)
    blocks.free(a)
    b = _req("b", list(range(10)))
    hit = blocks.lookup(b)
    b.num_computed_tokens = 3  # preempted with computed tokens but no blocks: not a state admission may see
    with pytest.raises(RuntimeError, match="a prefix hit needs a request with no KV"):
        blocks.allocate(b, 7, hit)
