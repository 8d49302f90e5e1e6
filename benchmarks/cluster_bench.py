"""Scale-out on Ray Serve: adapter-affinity routing vs Ray's routing without multiplexing.

A local Ray cluster with 2 engine replicas of a small model and 60 adapters with power-law
popularity. The same closed-loop workload (client streams through Ray's gRPC proxy and the
unchanged SDK) runs in interleaved rounds with the ingress routing by adapter id
(multiplexed_model_id) and without it (Ray's default routing: the less busy of two random
replicas); before each round every adapter is unloaded, so both start cold. Reported per
mode: device and host hit rates per replica, adapter loads, TTFT p50/p95, tokens/s; then
the latency of the Ray path against direct gRPC to one loraplex server.

    python -m benchmarks.cluster_bench [--rounds 3] [--requests 96] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from benchmarks import report
from benchmarks.models import ATTENTION, SMALL, make_adapters, make_model
from loraplex.api.server import BackgroundServer
from loraplex.config import (
    ApiConfig,
    CacheConfig,
    EngineConfig,
    LoraConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)
from loraplex.engine.engine import Engine
from loraplex_client import AdapterNotFoundError, Client

NUM_ADAPTERS = 60
REPLICAS = 2
MAX_LORAS = 4  # device slots per replica
HELD = 12  # adapter ids per replica in Serve's multiplex LRU (its host tier)
MAX_NEW = 16


def _config(model: str, root: str, port: int) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(
            model=ModelConfig(model, quantization="none", dtype="float32", device="cpu"),
            cache=CacheConfig(num_blocks=512),
            scheduler=SchedulerConfig(max_num_seqs=16),
            lora=LoraConfig(max_loras=MAX_LORAS, max_lora_rank=8, adapter_roots=(root,)),
        ),
        api=ApiConfig(port=port, metrics_port=0, http_port=0),
    )


def _pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] * 1e3 if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3


def workload(ids: list[str], n: int, seed: int) -> list[tuple[str, list[int]]]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(ids))]  # S-LoRA-style power law
    return [(rng.choices(ids, weights)[0], [rng.randrange(3, SMALL.vocab_size) for _ in range(rng.randrange(8, 32))]) for _ in range(n)]


def run_round(address: str, jobs: list[tuple[str, list[int]]], concurrency: int) -> dict[str, float]:
    """Closed loop: `concurrency` client streams; TTFT per request, tokens/s over the round."""
    ttft: list[float] = []
    tokens = 0
    lock = threading.Lock()
    queue = list(jobs)

    def worker() -> None:
        nonlocal tokens
        with Client(address, timeout=600) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    adapter, prompt = queue.pop()
                sent = time.perf_counter()
                first = None
                count = 0
                for chunk in client.generate_stream(prompt_token_ids=prompt, adapter_id=adapter, max_new_tokens=MAX_NEW, ignore_eos=True):
                    if first is None and chunk.token_ids:
                        first = time.perf_counter() - sent
                    count += len(chunk.token_ids)
                with lock:
                    ttft.append(first or 0.0)
                    tokens += count

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"ttft_p50_ms": _pct(ttft, 50), "ttft_p95_ms": _pct(ttft, 95), "tokens_per_s": tokens / wall}


def _delta(after: list[dict[str, Any]], before: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per replica (matched by name): what the round did to its counters."""
    old = {s["replica"]: s for s in before}
    rows = []
    for s in sorted(after, key=lambda s: s["replica"]):
        b = old.get(s["replica"], {"store": {}, "requests": 0, "misses": 0})

        def d(key: str, s: dict[str, Any] = s, b: dict[str, Any] = b) -> float:
            return float(s["store"].get(key, 0) - b["store"].get(key, 0))

        rows.append({
            "device_hit_rate": d("device_hits") / max(1.0, d("device_hits") + d("device_misses")),
            "host_hit_rate": d("host_hits") / max(1.0, d("host_hits") + d("host_misses")),
            "adapter_loads": d("host_loads"),
            "requests": float(s["requests"] - b["requests"]),
            "affinity": 1.0 - (s["misses"] - b["misses"]) / max(1, s["requests"] - b["requests"]),
        })
    return rows


def latency(call: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per routing mode, interleaved")
    parser.add_argument("--requests", type=int, default=96, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-requests", type=int, default=40)
    args = parser.parse_args()

    import ray
    from ray import serve

    from loraplex.cluster.app import (
        APP_NAME,
        ClusterOptions,
        application,
        init_local_ray,
        start_serve,
    )
    from loraplex.ports import free_ports

    model = str(make_model(SMALL))
    root, ids = make_adapters(SMALL, NUM_ADAPTERS, rank=8, targets=ATTENTION)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init_local_ray(num_cpus=REPLICAS + 1, include_dashboard=False, object_store_memory=256 * 2**20,
                   logging_level=logging.WARNING, log_to_driver=False)
    direct: BackgroundServer | None = None
    try:
        port, http_port = free_ports(2)
        start_serve("127.0.0.1", port, http_port)
        options = ClusterOptions(replicas=REPLICAS, max_adapters_per_replica=HELD, replica_cpus=1)
        serve.run(application(_config(model, str(root), port), options), name=APP_NAME, route_prefix="/")
        ingress = serve.get_app_handle(APP_NAME)
        address = f"127.0.0.1:{port}"
        run_round(address, workload(ids, 16, seed=99), args.concurrency)  # warm both paths up

        results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        for r in range(args.rounds):
            for by_adapter in (True, False):
                with Client(address, timeout=600) as client:
                    for adapter_id in ids:  # both modes start cold
                        with contextlib.suppress(AdapterNotFoundError):
                            client.unload_adapter(adapter_id)
                ingress.set_route_by_adapter.remote(by_adapter).result()
                time.sleep(1.0)
                before = ingress.stats.remote().result()
                timing = run_round(address, workload(ids, args.requests, seed=r), args.concurrency)
                replicas = _delta(ingress.stats.remote().result(), before)
                results[by_adapter].append({**timing, "replicas": replicas})
                print(f"[cluster_bench] round {r} {'affinity' if by_adapter else 'random'}: {timing} {replicas}")

        rows: list[dict[str, Any]] = []
        for by_adapter, rounds in results.items():
            mode = "adapter affinity" if by_adapter else "Ray default (no multiplexing)"
            for i in range(REPLICAS):
                per = [rd["replicas"][i] for rd in rounds if i < len(rd["replicas"])]
                rows.append({
                    "routing": mode, "replica": i,
                    "device_hit_rate": statistics.median(p["device_hit_rate"] for p in per),
                    "host_hit_rate": statistics.median(p["host_hit_rate"] for p in per),
                    "adapter_loads": statistics.median(p["adapter_loads"] for p in per),
                    "ttft_p50_ms": statistics.median(rd["ttft_p50_ms"] for rd in rounds),
                    "ttft_p95_ms": statistics.median(rd["ttft_p95_ms"] for rd in rounds),
                    "tokens_per_s": statistics.median(rd["tokens_per_s"] for rd in rounds),
                })
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results[True], results[False])]
        loads = [sum(p["adapter_loads"] for p in rd["replicas"]) for rd in results[True]]
        loads_random = [sum(p["adapter_loads"] for p in rd["replicas"]) for rd in results[False]]

        # The Ray path's cost: one short request at a time, direct gRPC vs through the cluster.
        config = _config(model, str(root), 0)
        direct = BackgroundServer(config, Engine(config.engine))
        direct_address = direct.start()
        prompt = [5, 6, 7, 8]
        with Client(direct_address, timeout=600) as d_client, Client(address, timeout=600) as r_client:
            direct_ms: list[float] = []
            ray_ms: list[float] = []
            for _ in range(max(1, args.latency_requests // 10)):  # interleaved blocks of 10
                for target, out in ((d_client, direct_ms), (r_client, ray_ms)):
                    out += latency(partial(target.generate, prompt_token_ids=prompt, adapter_id=ids[0], max_new_tokens=1), 10)
        summary = {
            "tokens/s ratio, affinity / default (median of rounds)": statistics.median(ratios),
            "adapter loads per round, affinity": statistics.median(loads),
            "adapter loads per round, default": statistics.median(loads_random),
            "1-token request p50 ms, direct gRPC": statistics.median(direct_ms) * 1e3,
            "1-token request p50 ms, through Ray": statistics.median(ray_ms) * 1e3,
            "Ray path overhead p50 ms": (statistics.median(ray_ms) - statistics.median(direct_ms)) * 1e3,
        }
        report.write(
            "cluster_bench",
            f"Ray Serve, {REPLICAS} replicas of {SMALL.name}, {NUM_ADAPTERS} adapters (power law), "
            f"{MAX_LORAS} device slots and {HELD} held ids per replica; {args.rounds} interleaved rounds of "
            f"{args.requests} requests x {MAX_NEW} tokens, {args.concurrency} client streams",
            rows,
            ["routing", "replica", "device_hit_rate", "host_hit_rate", "adapter_loads", "ttft_p50_ms", "ttft_p95_ms", "tokens_per_s"],
            summary,
            notes="Hit rates and loads: each replica's adapter-store counters over a round (medians over rounds); "
            "TTFT and tokens/s: client-side, over both replicas.",
        )
    finally:
        if direct is not None:
            direct.stop()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
