"""The gauges and counters read at each scrape: live state from Engine.stats() (requests,
KV blocks, the prefix cache, the adapter store's tiers and counters, per-tenant load).

The adapter store's counters are kept by the store itself (they include what happened before
the server started); this collector reads them, as it reads the gauges, per scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.engine.request import ANONYMOUS_TENANT

if TYPE_CHECKING:
    from loraplex.engine.engine import Engine
    from loraplex.engine.fair_share import TenantLoad

STORE_EVENTS = ("hits", "misses", "loads", "evictions")
LOAD_TIERS = ("host", "device")  # host: read + validate from disk; device: copy into a slot


def anonymous(name: str) -> str:
    """The default tenant label: every tenant as one (no tenants file)."""
    return ANONYMOUS_TENANT


class StateCollector(Collector):
    """Gauges that mirror live state, and the adapter store's counters, read per scrape."""

    def __init__(self, engine: Engine, tenant_label: Callable[[str], str] = anonymous) -> None:
        self.engine = engine
        self.tenant_label = tenant_label

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        yield _gauge("loraplex_requests_running", "Requests in the running batch", stats.running)
        yield _gauge(
            "loraplex_requests_waiting", "Requests queued for KV blocks, a batch seat or their adapter", stats.waiting
        )
        yield from self._tenants(stats.tenants)
        yield _gauge("loraplex_kv_blocks_used", "KV-cache blocks held by sequences", stats.kv_blocks_used)
        yield _gauge("loraplex_kv_blocks_free", "KV-cache blocks free (cached ones no request holds included)", stats.kv_blocks_free)
        cache = stats.prefix_cache
        yield _gauge("loraplex_prefix_cache_enabled", "1 if --prefix-caching is on", int(cache.enabled))
        yield _gauge("loraplex_prefix_cache_blocks", "KV blocks with a known prefix (held or parked)", cache.cached_blocks)
        yield _counter(
            "loraplex_prefix_cache_queried_tokens", "Tokens of admitted requests looked up in the prefix cache",
            cache.queried_tokens,
        )
        yield _counter(
            "loraplex_prefix_cache_hit_tokens", "Looked-up tokens found in cached KV blocks (not computed)", cache.hit_tokens
        )
        yield _counter("loraplex_prefix_cache_evictions", "Cached KV blocks taken back for new tokens", cache.evictions)

        snap, slot_bytes = stats.adapters, stats.adapter_slot_bytes
        resident = GaugeMetricFamily(
            "loraplex_adapter_store_resident_adapters", "Adapters held in each tier", labels=["tier"]
        )
        resident.add_metric(["registered"], snap.registered)
        resident.add_metric(["host"], snap.host_resident)
        resident.add_metric(["device"], snap.device_resident)
        yield resident
        used = GaugeMetricFamily(
            "loraplex_adapter_store_bytes", "Bytes of adapter weights held (device: occupied slots)", labels=["tier"]
        )
        used.add_metric(["host"], snap.host_bytes)
        used.add_metric(["device"], snap.device_resident * slot_bytes)
        yield used
        budget = GaugeMetricFamily(
            "loraplex_adapter_store_budget_bytes", "Bytes each tier may hold (device: the slot pool)", labels=["tier"]
        )
        budget.add_metric(["host"], snap.host_budget)
        budget.add_metric(["device"], snap.device_slots * slot_bytes)
        yield budget
        yield _gauge("loraplex_adapter_store_device_slots", "Device adapter slots", snap.device_slots)
        # Both are 0 whenever no request is live: anything else is a leak (the soak checks them).
        yield _gauge(
            "loraplex_adapter_slot_references", "Running requests' references to device adapter slots", snap.slot_refs
        )
        yield _gauge("loraplex_adapter_holders", "Live requests holding an adapter version", snap.holders)

        for event in STORE_EVENTS:
            family = CounterMetricFamily(
                f"loraplex_adapter_store_{event}", f"Adapter store {event} per tier", labels=["tier"]
            )
            for tier in LOAD_TIERS:
                family.add_metric([tier], snap.counters.get((tier, event), 0))
            yield family
        registrations = CounterMetricFamily(
            "loraplex_adapter_store_registrations", "Adapters registered (or re-registered with new content)"
        )
        registrations.add_metric([], snap.counters.get(("registered", "registrations"), 0))
        yield registrations
        moves = CounterMetricFamily(
            "loraplex_adapter_slot_moves", "Exchanges of two device slots that keep adapters of one rank side by side"
        )
        moves.add_metric([], snap.counters.get(("device", "moves"), 0))
        yield moves

    def _tenants(self, loads: Mapping[str, TenantLoad]) -> Iterator[Metric]:
        """Per tenant label (configured names; everyone else summed as one): the scheduler's view."""
        running = GaugeMetricFamily("loraplex_tenant_requests_running", "Requests in the running batch, by tenant", labels=["tenant"])
        waiting = GaugeMetricFamily("loraplex_tenant_requests_waiting", "Requests queued, by tenant", labels=["tenant"])
        service = GaugeMetricFamily(
            "loraplex_tenant_service", "Fair share: weighted tokens served (prompt x 1 + generated x 2) / weight, "
            "lifted when a tenant becomes active (engine/fair_share.py)", labels=["tenant"],
        )
        totals: dict[str, list[float]] = {ANONYMOUS_TENANT: [0, 0, 0.0]}
        for name, load in loads.items():
            row = totals.setdefault(self.tenant_label(name), [0, 0, 0.0])
            row[0] += load.running
            row[1] += load.waiting
            row[2] += load.counter
        for label, (run, wait, counter) in sorted(totals.items()):
            running.add_metric([label], run)
            waiting.add_metric([label], wait)
            service.add_metric([label], counter)
        yield running
        yield waiting
        yield service


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
