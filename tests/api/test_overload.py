"""Overload (issue 15, item 3): a closed loop at 3x the admission bound, through a real server.

    12 client threads ──gRPC──> server: max_num_seqs 2 + max_waiting 2 = 4 requests admitted
    each: unary or stream; RESOURCE_EXHAUSTED -> retry; 2 completions each, checked against PEFT

Rejections are OverloadedError (RESOURCE_EXHAUSTED) with a message naming the bound; every
admitted request completes with PEFT's greedy tokens; after the burst nothing is held, and
exactly the bound's worth of requests is admitted at once again. No timing here: rejection
latency and throughput during and after a burst are measured by benchmarks/overload.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from conftest import TinyModel, engine_config, wait_idle
from loraplex.api.server import BackgroundServer
from loraplex.config import ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex_client import Client, OverloadedError

MAX_NUM_SEQS, MAX_WAITING = 2, 2
BOUND = MAX_NUM_SEQS + MAX_WAITING
CLIENTS = 3 * BOUND
COMPLETIONS = 2  # per client
MAX_NEW = 6
ADAPTERS = ["qv-r4", "all-r8-rslora", None]
JOBS = [([5 + i, 17, 30 + i, 9], ADAPTERS[i % len(ADAPTERS)]) for i in range(6)]
REJECTION = f"server overloaded: {BOUND} requests are queued or running (limit {BOUND}); retry later"


@pytest.fixture(scope="module")
def server(tiny_llama: TinyModel) -> Iterator[BackgroundServer]:
    config = engine_config(tiny_llama, max_num_seqs=MAX_NUM_SEQS, max_loras=2)
    config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, max_waiting=MAX_WAITING))
    server = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=0, http_port=0)), Engine(config))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected(llama_peft: Any) -> list[list[int]]:
    return [llama_peft.greedy(prompt, adapter, MAX_NEW) for prompt, adapter in JOBS]


class Gate:
    """Holds the engine's model runs until `opened`: admitted requests stay in flight, so the
    bound is full whatever the machine's speed."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.run, self.opened = engine, engine.runner.run, threading.Event()

    def __enter__(self) -> Gate:
        def gated_run(batch: Any) -> Any:
            self.opened.wait(60)
            return self.run(batch)

        self.engine.runner.run = gated_run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.opened.set()
        self.engine.runner.run = self.run  # type: ignore[method-assign]


def _call(client: Client, job: int, stream: bool) -> list[int]:
    prompt, adapter = JOBS[job]
    kwargs: dict[str, Any] = {"prompt_token_ids": prompt, "adapter_id": adapter, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    if stream:
        return [t for chunk in client.generate_stream(**kwargs) for t in chunk.token_ids]
    return list(client.generate(**kwargs).token_ids)


def test_a_burst_at_3x_the_bound_is_refused_cleanly_and_leaves_full_capacity(
    server: BackgroundServer, expected: list[list[int]]
) -> None:
    engine = server.server.engine
    address = f"127.0.0.1:{server.server.port}"
    lock = threading.Lock()
    results: list[tuple[int, list[int]]] = []
    rejections: Counter[tuple[grpc.StatusCode, str]] = Counter()
    refused_clients: set[int] = set()
    failures: list[str] = []

    def closed_loop(client_id: int, gate: Gate) -> None:
        with Client(address, timeout=120) as client:
            done, attempts = 0, 0
            while done < COMPLETIONS and attempts < 2000:
                attempts += 1
                job = (client_id + done) % len(JOBS)
                try:
                    tokens = _call(client, job, stream=(client_id + attempts) % 2 == 0)
                except OverloadedError as e:
                    with lock:
                        rejections[(e.code, e.details)] += 1
                        refused_clients.add(client_id)
                        if len(refused_clients) == CLIENTS - BOUND:
                            gate.opened.set()  # every client past the bound was refused: let the engine run
                    time.sleep(0.01)  # a client that retries at once (paced: the test shares the GIL)
                    continue
                except Exception as e:  # reported below, whatever it is
                    with lock:
                        failures.append(f"client {client_id}: {type(e).__name__}: {e}")
                    return
                with lock:
                    results.append((job, tokens))
                done += 1
            if done < COMPLETIONS:
                with lock:
                    failures.append(f"client {client_id}: {done} completions after {attempts} attempts")

    with Gate(engine) as gate:
        threads = [threading.Thread(target=closed_loop, args=(i, gate)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert failures == []
    assert len(results) == CLIENTS * COMPLETIONS
    for job, tokens in results:
        assert tokens == expected[job], f"job {job} ({JOBS[job][1]})"
    assert set(rejections) == {(grpc.StatusCode.RESOURCE_EXHAUSTED, REJECTION)}
    assert len(refused_clients) >= CLIENTS - BOUND  # the first wave's surplus, each refused while the bound was full

    # After the burst: nothing held, and the whole bound is admitted at once again.
    wait_idle(engine)
    with Client(address, timeout=120) as client, Gate(engine) as gate:
        calls: list[Any] = []
        for i in range(BOUND):  # streams open (admitted) without a model run: the gate stays shut
            prompt, adapter = JOBS[i]
            calls.append(client.generate_stream(prompt_token_ids=prompt, adapter_id=adapter, max_new_tokens=MAX_NEW, ignore_eos=True))
        deadline = time.monotonic() + 60
        while engine.num_unfinished < BOUND and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_unfinished == BOUND  # all in flight together, none refused
        gate.opened.set()
        for i, call in enumerate(calls):
            assert [t for chunk in call for t in chunk.token_ids] == expected[i]
    wait_idle(engine)
