"""Prefix caching: which KV blocks hold the keys and values of which token prefix. No torch here.

A *full* block (block_size computed tokens) is named by a hash chained over the blocks before
it, the request's *cache key* and the block's own token ids:

    hash_0 = H(ZERO,   key, tokens[0 : bs])
    hash_i = H(hash_{i-1}, key, tokens[i*bs : (i+1)*bs])

so equal hashes mean the same tokens at the same positions after the same prefix, computed
under the same weights. The key names those weights: the base model, or one adapter version:
its (namespaced) id, its version number and the content hash of its files. A LoRA on any
layer changes the keys and values of every later layer, so a block is never shared across
adapters, across an adapter and the base, or across two versions of one id: re-loading an id
(new files, or the same files after an unload) gives a new version and a new key, and the old
blocks are never hit again (they age out of the LRU below). Version numbers are never reused
for an id in one store, and the store checks the bytes it loads against the content hash.
SHA-256, not Python's hash: one tenant must not be able to craft a prompt whose blocks
collide with another's.

`PrefixCache` is the table the block manager (block_manager.py) keeps beside its refcounts:

    hash -> block     every full block whose KV is known, in use or not
    evictable         blocks no request holds that still have a hash, least recently freed
                      first: taken for new tokens only when no never-hashed block is free,
                      so the cache costs no capacity

Who calls what (all on the engine thread, from BlockManager):
  get(hash)              lookup at admission: the block holding this prefix, or None
  insert(hash, block)    a block became full of computed tokens (first writer wins)
  park(block)            its last holder freed it; it stays findable
  take(block)            a hit on a parked block: it leaves the evictable LRU
  evict()                a fresh block is needed and only parked ones are left
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes

BASE_CACHE_KEY = "base"
_ZERO = bytes(32)
_samples = itertools.count()


def adapter_cache_key(adapter_id: str, version: int, content_hash: str) -> str:
    """The cache key of one adapter version: its (namespaced) id, version and files' content hash."""
    return f"adapter:{adapter_id}@{version}:{content_hash}"


def samples_cache_key() -> str:
    """A key no other request has: with prefix caching off, the samples of one request
    (n > 1) still share their prompt's blocks, and nothing else ever hits them."""
    return f"samples:{next(_samples)}"


def hash_block(parent: BlockHash | None, key: str, tokens: Sequence[int]) -> BlockHash:
    """The chained hash of one full block (parent None for the first block of a sequence)."""
    h = hashlib.sha256(parent or _ZERO)
    h.update(key.encode())
    h.update(b"\0")  # keys never contain NUL: the token bytes cannot run into the key
    h.update(array("q", tokens).tobytes())
    return h.digest()


def extend_hashes(hashes: list[BlockHash], key: str, token_ids: Sequence[int], block_size: int, num_blocks: int) -> None:
    """Append the hashes of full blocks len(hashes) .. num_blocks - 1 of `token_ids`."""
    for i in range(len(hashes), num_blocks):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, key, token_ids[i * block_size : (i + 1) * block_size]))


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """The cached blocks a waiting request can start from (its block table's first entries)."""

    blocks: tuple[int, ...] = ()
    num_tokens: int = 0  # len(blocks) * block_size: tokens whose KV need not be computed


NO_HIT = PrefixHit()


class PrefixCache:
    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_evicted = 0

    def __len__(self) -> int:
        """Blocks with a hash (held or parked)."""
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def get(self, block_hash: BlockHash) -> int | None:
        return self._block_of.get(block_hash)

    def hashed(self, block: int) -> bool:
        return block in self._hash_of

    def is_parked(self, block: int) -> bool:
        return block in self._evictable

    def insert(self, block_hash: BlockHash, block: int) -> bool:
        """Name `block` by its hash. False if another block already holds this prefix (two
        requests computed it at once) or `block` already has a hash: it stays as it is."""
        if block_hash in self._block_of or block in self._hash_of:
            return False
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def park(self, block: int) -> None:
        """A hashed block's last holder let it go: most recently freed goes last."""
        self._evictable[block] = None

    def take(self, block: int) -> None:
        del self._evictable[block]

    def evict(self) -> int:
        """The least recently freed parked block, its hash forgotten."""
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        self.num_evicted += 1
        return block
