"""The n samples of one request, and whose KV blocks a request may share. No torch here.

    add_request(params.n = 3) ─> sample 0 (the leader) ─┐  one request id, prompt, adapter
                                 sample 1 ──────────────┤  and cache key; sample i seeded
                                 sample 2 ──────────────┘  sample_seed(seed, i)

Each sample is a Request of its own (its tokens, KV blocks, generator, detokenizer). The
scheduler holds samples 1.. back until the leader has computed the prompt's full blocks,
then admits them from the prefix cache (block_manager.py): the prompt's blocks are computed
and held once, whether prefix caching is on or off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loraplex.engine.prefix_cache import BASE_CACHE_KEY, adapter_cache_key, samples_cache_key
from loraplex.engine.request import Request, sample_seed

if TYPE_CHECKING:
    from loraplex.lora.adapter_version import AdapterVersion


def cache_key(adapter: AdapterVersion | None, prefix_caching: bool, n: int) -> str | None:
    """Whose KV blocks a request may share (prefix_cache.py): those computed under the same
    weights (the base, or this adapter version); with prefix caching off, only its own
    samples'; None: nobody's."""
    if not prefix_caching:
        return samples_cache_key() if n > 1 else None
    if adapter is None:
        return BASE_CACHE_KEY
    return adapter_cache_key(adapter.adapter_id, adapter.version, adapter.spec.content_hash)


def fan_out(leader: Request, detokenizer: Callable[[], Any]) -> list[Request]:
    """The leader (sample 0, as given) and its leader.params.n - 1 siblings."""
    samples = [leader]
    for i in range(1, leader.params.n):
        samples.append(
            Request(
                request_id=leader.request_id,
                prompt_token_ids=leader.prompt_token_ids,
                params=replace(leader.params, seed=sample_seed(leader.params.seed, i)),
                adapter_id=leader.adapter_id,
                tenant=leader.tenant,
                weight=leader.weight,
                priority=leader.priority,
                arrival_time=leader.arrival_time,
                adapter=leader.adapter,
                eos_token_ids=leader.eos_token_ids,
                detokenizer=detokenizer(),
                cache_key=leader.cache_key,
                index=i,
                leader=leader,
            )
        )
    return samples
