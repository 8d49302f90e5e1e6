from __future__ import annotations

import pytest

from loraplex.engine.block_manager import BlockManager
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
