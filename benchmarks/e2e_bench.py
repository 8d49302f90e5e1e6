"""End to end through the gRPC server and the client SDK, against the in-process engine.

The same workload (open-loop Poisson arrivals, mixed adapters) runs first in process, then
through a real server on 127.0.0.1 with one client stream per request; reported: tokens/s,
time to first token and inter-token latency percentiles, and the ratio to in process.

    python -m benchmarks.e2e_bench [--model small|bench] [--requests 64] [--rate 8]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from benchmarks import harness, report
from benchmarks.models import CPU_BENCH, SMALL, make_adapters, make_model
from benchmarks.workload import WorkloadSpec, generate
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
from loraplex_client import Client


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49] * 1e3, "p95": q[94] * 1e3, "p99": q[98] * 1e3}


def run_grpc(address: str, items: list[Any], ids: list[str]) -> dict[str, Any]:
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def one(item: Any, start: float) -> None:
        nonlocal tokens
        delay = item.arrival_s - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter()
        last = None
        count = 0
        with Client(address, timeout=600) as client:
            for chunk in client.generate_stream(
                prompt_token_ids=item.prompt_token_ids, adapter_id=None if item.adapter is None else ids[item.adapter],
                max_new_tokens=item.max_new_tokens, ignore_eos=True,
            ):
                now = time.perf_counter()
                if chunk.token_ids:
                    with lock:
                        if last is None:
                            ttft.append(now - sent)
                        else:
                            itl.append((now - last) / len(chunk.token_ids))
                    last = now
                    count += len(chunk.token_ids)
        with lock:
            tokens += count

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(item, start)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "ttft": _percentiles(ttft), "itl": _percentiles(itl)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bench", "small"], default="small")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--name", default="e2e_bench")
    args = p.parse_args(argv)

    shape = CPU_BENCH if args.model == "bench" else SMALL
    model_path = str(make_model(shape))
    root, ids = make_adapters(shape, args.adapters, rank=16)
    config = EngineConfig(
        model=ModelConfig(model_path),
        cache=CacheConfig(num_blocks=2048),
        scheduler=SchedulerConfig(max_num_seqs=32),
        lora=LoraConfig(max_loras=8, max_lora_rank=16, adapter_roots=(str(root),)),
    )
    spec = WorkloadSpec(
        num_requests=args.requests, num_adapters=args.adapters, popularity="uniform", arrival="poisson", rate=args.rate,
        prompt_len=(32, 128), output_len=(16, 64), seed=0,
    )
    items = generate(spec, shape.vocab_size)

    engine = Engine(config)
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    engine.store.wait_idle()
    harness.run(engine, items[:4], ids)  # warm-up
    local = harness.run(engine, items, ids)
    engine.close()

    engine = Engine(config)
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    server = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=0, http_port=0)), engine)
    address = server.start()
    run_grpc(address, items[:4], ids)  # warm-up
    remote = run_grpc(address, items, ids)
    server.stop()
    engine.close()

    grpc_tps = remote["tokens"] / remote["wall_s"]
    rows = [
        {"run": "in-process engine", "tokens/s": local.throughput, "wall s": local.wall_s},
        {"run": "gRPC + client SDK", "tokens/s": grpc_tps, "wall s": remote["wall_s"],
         "TTFT p50 ms": remote["ttft"]["p50"], "TTFT p95 ms": remote["ttft"]["p95"], "TTFT p99 ms": remote["ttft"]["p99"],
         "ITL p50 ms": remote["itl"]["p50"], "ITL p95 ms": remote["itl"]["p95"], "ITL p99 ms": remote["itl"]["p99"]},
    ]
    summary = {"gRPC / in-process throughput": grpc_tps / local.throughput}
    columns = ["run", "tokens/s", "wall s", "TTFT p50 ms", "TTFT p95 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p95 ms", "ITL p99 ms"]
    report.write(args.name, f"end to end: {args.requests} requests, Poisson {args.rate}/s, {args.adapters} adapters, {shape.name}",
                 rows, columns, summary, plot=("run", "tokens/s"),
                 notes="open loop, one client stream per request; command: python -m benchmarks.e2e_bench " + " ".join(argv or []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
