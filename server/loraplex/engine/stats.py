"""What the engine holds now, as one snapshot (Engine.stats): metrics' gauges and the API read
it instead of the scheduler, the block manager or the adapter store. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.engine.fair_share import TenantLoad
    from loraplex.engine.request import StepStats
    from loraplex.lora.adapter_version import StoreSnapshot


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """The prefix cache's counters (block_manager.py, prefix_cache.py), cumulative since start."""

    enabled: bool  # --prefix-caching; off, only the samples of one n > 1 request share blocks
    queried_tokens: int  # tokens of requests admitted with a cache key, looked up in the cache
    hit_tokens: int  # of those, found in cached blocks (not computed)
    evictions: int  # cached blocks taken back for new tokens
    cached_blocks: int  # blocks with a known prefix now, held by requests or parked

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """What the engine holds now (Engine.stats): for metrics and the API."""

    running: int  # requests in the running batch
    waiting: int  # unfinished and not running: queued for KV blocks, a batch seat or their adapter
    kv_blocks_used: int
    kv_blocks_free: int  # cached blocks no request holds included: the cache costs no capacity
    prefix_cache: PrefixCacheStats
    adapters: StoreSnapshot  # tiers: resident counts, bytes, budgets, device slots, event counters
    adapter_slot_bytes: int  # device bytes of one adapter slot
    last_step: StepStats | None
    tenants: Mapping[str, TenantLoad] = field(default_factory=dict)  # after the last step: running, waiting, service
