"""/metrics scraped over HTTP from a real server while the client SDK drives real traffic.

Four adapters through two device slots force loads, hits and evictions; every count is
checked against what the clients saw (deltas between scrapes, so the order of tests and
the warm-up request do not matter)."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import POISON_TOKEN, TinyModel, engine_config, free_port, poisoned_runner, wait_idle
from loraplex.api.metrics import OTHER_LABEL, TopAdapters
from loraplex.api.server import BackgroundServer
from loraplex.config import ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex_client import Client, InternalServerError

ADAPTERS = ["qv-r4", "all-r8-rslora", "all-r16-patterns", "attn-r8-layer0"]
MAX_LORAS = 2
TOP_ADAPTERS = 2
HOST_BUDGET = 64 << 20

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's type, from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` that carry these labels (any others, e.g. tenant, summed over)."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= set(series))


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.fixture(scope="module")
def adapter_root(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("metrics-adapters")
    for name in ADAPTERS:
        shutil.copytree(tiny_llama.adapters[name], root / name)
    return root


@pytest.fixture(scope="module")
def server(tiny_llama: TinyModel, adapter_root: Path) -> Iterator[BackgroundServer]:
    config = engine_config(
        tiny_llama, roots=(str(adapter_root),), max_loras=MAX_LORAS, max_host_adapter_bytes=HOST_BUDGET
    )
    api = ApiConfig(port=0, metrics_port=free_port(), http_port=0, metrics_top_adapters=TOP_ADAPTERS)
    server = BackgroundServer(ServerConfig(engine=config, api=api), Engine(config))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.server.port}", timeout=60) as c:
        yield c


def _port(server: BackgroundServer) -> int:
    return server.server.metrics_port


EXPECTED_FAMILIES = {
    "loraplex_requests": "counter",
    "loraplex_prompt_tokens": "counter",
    "loraplex_generated_tokens": "counter",
    "loraplex_time_to_first_token_seconds": "histogram",
    "loraplex_inter_token_latency_seconds": "histogram",
    "loraplex_e2e_request_latency_seconds": "histogram",
    "loraplex_request_queue_time_seconds": "histogram",
    "loraplex_requests_running": "gauge",
    "loraplex_requests_waiting": "gauge",
    "loraplex_tenant_requests_running": "gauge",
    "loraplex_tenant_requests_waiting": "gauge",
    "loraplex_tenant_service": "gauge",
    "loraplex_step_requests": "histogram",
    "loraplex_step_tokens": "histogram",
    "loraplex_step_adapters": "histogram",
    "loraplex_step_duration_seconds": "histogram",
    "loraplex_preemptions": "counter",
    "loraplex_kv_blocks_used": "gauge",
    "loraplex_kv_blocks_free": "gauge",
    "loraplex_prefix_cache_enabled": "gauge",
    "loraplex_prefix_cache_blocks": "gauge",
    "loraplex_prefix_cache_queried_tokens": "counter",
    "loraplex_prefix_cache_hit_tokens": "counter",
    "loraplex_prefix_cache_evictions": "counter",
    "loraplex_adapter_store_hits": "counter",
    "loraplex_adapter_store_misses": "counter",
    "loraplex_adapter_store_loads": "counter",
    "loraplex_adapter_store_evictions": "counter",
    "loraplex_adapter_store_registrations": "counter",
    "loraplex_adapter_store_bytes": "gauge",
    "loraplex_adapter_store_budget_bytes": "gauge",
    "loraplex_adapter_store_resident_adapters": "gauge",
    "loraplex_adapter_store_device_slots": "gauge",
    "loraplex_adapter_slot_references": "gauge",
    "loraplex_adapter_holders": "gauge",
    "loraplex_adapter_load_duration_seconds": "histogram",
    "loraplex_adapter_requests": "counter",
    "loraplex_denied_calls": "counter",
    "loraplex_build_info": "gauge",  # an Info, exposed as a gauge of 1
}


def test_every_family_is_exposed_with_its_type_and_bounded_labels(server: BackgroundServer) -> None:
    samples, types = scrape(_port(server))
    for name, kind in EXPECTED_FAMILIES.items():
        assert types.get(name) == kind, name
    assert not [name for name in types if name.endswith("_created")]
    for reason in ("stop", "length", "aborted", "error"):
        assert ("loraplex_requests_total", (("finish_reason", reason), ("tenant", "(anonymous)"))) in samples
    for tier in ("host", "device"):
        for event in ("hits", "misses", "loads", "evictions"):
            assert (f"loraplex_adapter_store_{event}_total", (("tier", tier),)) in samples
        assert ("loraplex_adapter_load_duration_seconds_count", (("tier", tier),)) in samples
    for tier in ("registered", "host", "device"):
        assert ("loraplex_adapter_store_resident_adapters", (("tier", tier),)) in samples
    # No request ids, no adapter ids outside the opt-in top-N counter.
    label_names = {k for (name, labels) in samples for k, _ in labels}
    assert label_names <= {
        "finish_reason", "tier", "adapter", "le", "version", "model_type", "quantization", "device", "tenant", "outcome"
    }
    # Without a tenants file every request is the one anonymous tenant's.
    assert {v for (_, labels) in samples for k, v in labels if k == "tenant"} == {"(anonymous)"}
    engine = server.server.engine
    assert value(samples, "loraplex_kv_blocks_free") + value(samples, "loraplex_kv_blocks_used") == engine.blocks.num_blocks
    assert value(samples, "loraplex_adapter_store_budget_bytes", tier="host") == HOST_BUDGET
    assert value(samples, "loraplex_adapter_store_budget_bytes", tier="device") == engine.lora.pool_bytes
    assert value(samples, "loraplex_adapter_store_device_slots") == MAX_LORAS


def test_gauges_mirror_live_traffic(client: Client, server: BackgroundServer) -> None:
    engine = server.server.engine
    wait_idle(engine)
    streams = [
        client.generate_stream(prompt_token_ids=[5 + i, 6, 7], max_new_tokens=300, ignore_eos=True) for i in range(3)
    ]
    for s in streams:
        next(s)
    during, _ = scrape(_port(server))
    assert value(during, "loraplex_requests_running") + value(during, "loraplex_requests_waiting") == 3
    assert value(during, "loraplex_requests_running") >= 1
    assert value(during, "loraplex_kv_blocks_used") >= 3
    for s in streams:
        s.close()
    wait_idle(engine)
    after, _ = scrape(_port(server))
    assert value(after, "loraplex_requests_running") == 0 and value(after, "loraplex_requests_waiting") == 0
    assert value(after, "loraplex_kv_blocks_used") == 0
    assert delta(after, during, "loraplex_requests_total", finish_reason="aborted") == 3


def test_traffic_is_counted_once_and_histograms_observe_each_request(client: Client, server: BackgroundServer) -> None:
    engine = server.server.engine
    wait_idle(engine)
    before, _ = scrape(_port(server))
    new_tokens = 6
    jobs = [([5 + i, 17, 33 + i, 9], ([*ADAPTERS, None])[i % 5]) for i in range(15)]  # 3 per adapter, 3 on the base

    def run(job: tuple[list[int], str | None]) -> list[int]:
        prompt, adapter = job
        tokens: list[int] = []
        for chunk in client.generate_stream(prompt_token_ids=prompt, adapter_id=adapter, max_new_tokens=new_tokens, ignore_eos=True):
            tokens.extend(chunk.token_ids)
        return tokens

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    wait_idle(engine)
    after, _ = scrape(_port(server))
    n = len(jobs)
    assert all(len(r) == new_tokens for r in results)

    # Requests: each counted once, under its final status.
    assert delta(after, before, "loraplex_requests_total", finish_reason="length") == n
    assert sum(delta(after, before, "loraplex_requests_total", finish_reason=r) for r in ("stop", "aborted", "error")) == 0
    # Tokens: what the clients received, and the prompts they sent.
    assert delta(after, before, "loraplex_generated_tokens_total") == n * new_tokens
    assert delta(after, before, "loraplex_prompt_tokens_total") == sum(len(p) for p, _ in jobs)
    # Per-request histograms: one observation per request; inter-token: one per token after the first.
    for name in (
        "loraplex_time_to_first_token_seconds", "loraplex_e2e_request_latency_seconds", "loraplex_request_queue_time_seconds"
    ):
        assert delta(after, before, f"{name}_count") == n, name
        assert delta(after, before, f"{name}_sum") > 0, name
    assert delta(after, before, "loraplex_inter_token_latency_seconds_count") == n * (new_tokens - 1)
    assert value(after, "loraplex_e2e_request_latency_seconds_bucket", le="+Inf") == value(
        after, "loraplex_e2e_request_latency_seconds_count"
    )
    # Step histograms: every computed token is in some step (the last sampled one is never computed).
    steps = delta(after, before, "loraplex_step_requests_count")
    assert steps >= new_tokens and delta(after, before, "loraplex_step_tokens_count") == steps
    assert delta(after, before, "loraplex_preemptions_total") == 0
    computed = sum(len(p) for p, _ in jobs) + n * (new_tokens - 1)
    assert delta(after, before, "loraplex_step_tokens_sum") == computed
    assert delta(after, before, "loraplex_step_requests_sum") == n * new_tokens  # one prefill + 5 decodes each
    # Never more distinct adapters in a step than device slots.
    assert delta(after, before, "loraplex_step_adapters_bucket", le=str(float(MAX_LORAS))) == steps
    assert delta(after, before, "loraplex_step_adapters_sum") > 0

    # The opt-in per-adapter counter: at most TOP_ADAPTERS ids labelled, everything accounted for.
    labelled = {dict(labels)["adapter"] for (name, labels) in after if name == "loraplex_adapter_requests_total"}
    assert OTHER_LABEL in labelled and len(labelled - {OTHER_LABEL}) <= TOP_ADAPTERS
    assert total(after, "loraplex_adapter_requests_total") == sum(
        value(after, "loraplex_requests_total", finish_reason=r) for r in ("stop", "length", "aborted", "error")
    )


def test_prefix_cache_queries_and_hits_are_counted_in_tokens(client: Client, server: BackgroundServer) -> None:
    engine = server.server.engine
    wait_idle(engine)
    before, _ = scrape(_port(server))
    prompt = list(range(200, 240))  # 40 tokens: 2 full blocks of 16
    first = client.generate(prompt_token_ids=prompt, adapter_id="qv-r4", max_new_tokens=2, ignore_eos=True)
    second = client.generate(prompt_token_ids=prompt, adapter_id="qv-r4", max_new_tokens=2, ignore_eos=True)
    other = client.generate(prompt_token_ids=prompt, max_new_tokens=2, ignore_eos=True)  # the base: its own blocks
    after, _ = scrape(_port(server))
    assert [r.usage.cached_prompt_tokens for r in (first, second, other)] == [0, 32, 0]
    assert delta(after, before, "loraplex_prefix_cache_queried_tokens_total") == 3 * 40
    assert delta(after, before, "loraplex_prefix_cache_hit_tokens_total") == 32
    assert value(after, "loraplex_prefix_cache_enabled") == 1
    assert value(after, "loraplex_prefix_cache_blocks") >= 4  # qv-r4's 2 and the base's 2, parked
    # Computed tokens: the prompts less the hit, and each request's one decode.
    assert delta(after, before, "loraplex_step_tokens_sum") == 3 * 40 - 32 + 3


def test_adapter_store_hits_loads_and_evictions(client: Client, server: BackgroundServer, adapter_root: Path) -> None:
    engine = server.server.engine
    wait_idle(engine)
    before, _ = scrape(_port(server))
    # New ids for the same directories: four host misses and loads, then hits.
    fresh = [f"fresh/{name}" for name in ADAPTERS]
    for adapter_id, name in zip(fresh, ADAPTERS):
        client.load_adapter(adapter_id, name)
    for round_ in range(2):  # round 2: every adapter was evicted from the 2 device slots in between
        for adapter_id in fresh:
            client.generate(prompt_token_ids=[5, 6, 7 + round_], adapter_id=adapter_id, max_new_tokens=2, ignore_eos=True)
    wait_idle(engine)
    after, _ = scrape(_port(server))

    assert delta(after, before, "loraplex_adapter_store_registrations_total") == len(fresh)
    assert delta(after, before, "loraplex_adapter_store_misses_total", tier="host") == len(fresh)
    assert delta(after, before, "loraplex_adapter_store_hits_total", tier="host") == len(fresh)
    assert delta(after, before, "loraplex_adapter_store_loads_total", tier="host") == len(fresh)
    # Sequential requests cycling 4 adapters through 2 slots: every request misses the device.
    device_loads = delta(after, before, "loraplex_adapter_store_loads_total", tier="device")
    assert device_loads == 2 * len(fresh)
    assert delta(after, before, "loraplex_adapter_store_misses_total", tier="device") == device_loads
    assert delta(after, before, "loraplex_adapter_store_evictions_total", tier="device") >= device_loads - MAX_LORAS
    # One load-latency observation per load, per tier.
    for tier in ("host", "device"):
        loads = delta(after, before, "loraplex_adapter_store_loads_total", tier=tier)
        assert delta(after, before, "loraplex_adapter_load_duration_seconds_count", tier=tier) == loads
        assert delta(after, before, "loraplex_adapter_load_duration_seconds_sum", tier=tier) > 0
    # Residency and bytes mirror the store.
    snap = engine.store.snapshot()
    assert value(after, "loraplex_adapter_store_resident_adapters", tier="device") == snap.device_resident == MAX_LORAS
    assert value(after, "loraplex_adapter_store_resident_adapters", tier="host") == snap.host_resident
    assert value(after, "loraplex_adapter_store_resident_adapters", tier="registered") == snap.registered
    assert value(after, "loraplex_adapter_store_bytes", tier="host") == snap.host_bytes > 0
    assert value(after, "loraplex_adapter_store_bytes", tier="device") == MAX_LORAS * (engine.lora.pool_bytes // MAX_LORAS)

    # Concurrent: device hits while an adapter's requests share its slot.
    hits_before = value(after, "loraplex_adapter_store_hits_total", tier="device")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(
            lambda i: client.generate(prompt_token_ids=[5, i], adapter_id=fresh[0], max_new_tokens=8, ignore_eos=True),
            range(4),
        ))
    final, _ = scrape(_port(server))
    assert value(final, "loraplex_adapter_store_hits_total", tier="device") > hits_before


def test_errors_and_aborts_are_final_statuses(client: Client, server: BackgroundServer) -> None:
    engine = server.server.engine
    wait_idle(engine)
    before, _ = scrape(_port(server))
    poison = POISON_TOKEN
    with poisoned_runner(engine), pytest.raises(InternalServerError):
        client.generate(prompt_token_ids=[poison, 6, 7], max_new_tokens=5)
    stream = client.generate_stream(prompt_token_ids=[5, 6], max_new_tokens=300, ignore_eos=True)
    next(stream)
    stream.close()
    wait_idle(engine)
    after, _ = scrape(_port(server))
    assert delta(after, before, "loraplex_requests_total", finish_reason="error") == 1
    assert delta(after, before, "loraplex_requests_total", finish_reason="aborted") == 1
    assert delta(after, before, "loraplex_requests_total", finish_reason="length") == 0
    assert delta(after, before, "loraplex_e2e_request_latency_seconds_count") == 2
    assert delta(after, before, "loraplex_time_to_first_token_seconds_count") == 1  # the failed one had no token


def test_a_second_server_has_its_own_registry_and_stops_its_endpoint(
    server: BackgroundServer, tiny_llama: TinyModel, adapter_root: Path
) -> None:
    config = engine_config(tiny_llama, roots=(str(adapter_root),), max_loras=MAX_LORAS)
    port = free_port()
    engine = Engine(config)
    background = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=port, http_port=0)), engine)
    background.start(warm_up=False)
    try:
        samples, types = scrape(port)
        assert "loraplex_adapter_requests" not in types  # opt-in only
        assert value(samples, "loraplex_requests_total", finish_reason="length") == 0  # not the module server's counts
        assert value(scrape(_port(server))[0], "loraplex_requests_total", finish_reason="length") >= 1
    finally:
        background.stop()
        engine.close()
    with pytest.raises(OSError):
        scrape(port)
    assert engine.on_finish is None and engine.store.listener is None  # hooks removed


def test_metrics_off_with_port_zero(tiny_llama: TinyModel, adapter_root: Path) -> None:
    config = engine_config(tiny_llama, roots=(str(adapter_root),), max_loras=MAX_LORAS)
    engine = Engine(config)
    background = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=0, http_port=0)), engine)
    background.start(warm_up=False)
    try:
        assert background.server.metrics is None and background.server.metrics_port == 0
        assert engine.on_finish is None
    finally:
        background.stop()
        engine.close()


def test_top_adapter_labels_stay_bounded_and_monotonic() -> None:
    registry = CollectorRegistry()
    top = TopAdapters(2, registry)

    def series() -> dict[str, float]:
        return {s.labels["adapter"]: s.value for f in registry.collect() for s in f.samples if s.name.endswith("_total")}

    for key in ["a", "b", "a", "c", "c", "c", "d", "c", "b", "b", "b", "e"]:
        before = series()
        top.count(key)
        after = series()
        assert len(after) <= 3  # two adapters and (other)
        # One request, one increment of one series; none goes down (a demoted id's series is removed).
        increments = {label: v - before.get(label, 0.0) for label, v in after.items()}
        assert sorted(increments.values())[-1] == 1 and sum(increments.values()) == 1
        assert min(increments.values()) >= 0
    assert top.labelled == {"b", "c"}  # the two busiest
    assert series() == {"b": 2.0, "c": 3.0, OTHER_LABEL: 4.0}  # b and c counted from their (latest) promotion on
