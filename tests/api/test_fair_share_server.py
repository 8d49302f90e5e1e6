"""Fair share on a real server: while one tenant floods the queue, another tenant's request
is admitted within a bound of engine steps (the next slot that frees), not after the flood;
and `priority` reaches the scheduler from both doors (gRPC and HTTP).

The steps are counted on the engine thread (the scheduler's schedule() wrapped to record
which requests each step admits); the requests come with two tenants' tokens.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tenant_server import TOKENS, tenants_toml

from conftest import TinyModel, engine_config, wait_idle
from loraplex.api.server import BackgroundServer
from loraplex.config import ANY_PORT, ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.scheduler import ScheduledBatch
from loraplex_client import Client

SLOTS = 2  # max_num_seqs: a slot frees at the latest when a running request ends
NEW_TOKENS = 12
FLOOD = 24


@pytest.fixture(scope="module")
def server(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    base: Path = tmp_path_factory.mktemp("fair-share")
    (base / "adapters").mkdir()
    tenants = base / "tenants.toml"
    tenants.write_text(tenants_toml(("acme", "globex")))
    config = engine_config(tiny_llama, roots=(str(base / "adapters"),), max_num_seqs=SLOTS)
    api = ApiConfig(port=0, metrics_port=0, tenants_file=str(tenants), http_port=ANY_PORT)
    background = BackgroundServer(ServerConfig(engine=config, api=api), Engine(config))
    background.start()
    yield background
    background.stop()


@dataclass
class Steps:
    admitted: list[list[str]] = field(default_factory=list)  # per step: the request ids it admitted
    queued: list[set[str]] = field(default_factory=list)  # per step: the ids waiting when it began

    def arrived(self, rid: str) -> int:
        return next(i for i, ids in enumerate(self.queued) if rid in ids)

    def started(self, rid: str) -> int:
        return next(i for i, ids in enumerate(self.admitted) if rid in ids)

    def admitted_between(self, first: int, last: int, prefix: str) -> int:
        return sum(1 for ids in self.admitted[first:last] for rid in ids if rid.startswith(prefix))


@contextlib.contextmanager
def recording(engine: Engine) -> Iterator[Steps]:
    steps = Steps()
    schedule = engine.scheduler.schedule

    def recorded() -> ScheduledBatch:
        before = {r.request_id for r in engine.scheduler.running}
        steps.queued.append({r.request_id for r in engine.scheduler.waiting})
        batch = schedule()
        steps.admitted.append([r.request_id for r in batch.requests if r.request_id not in before])
        return batch

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    try:
        yield steps
    finally:
        engine.scheduler.schedule = schedule  # type: ignore[method-assign]


def wait_queued(engine: Engine, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(engine.scheduler.waiting) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(engine.scheduler.waiting) >= count


def test_a_flooding_tenant_does_not_hold_back_another(server: BackgroundServer) -> None:
    engine = server.server.engine
    assert engine.scheduler.fair.policy == "vtc"  # the default
    address = f"127.0.0.1:{server.server.port}"
    with (
        recording(engine) as steps,
        Client(address, token=TOKENS["acme"], timeout=120) as acme,
        Client(address, token=TOKENS["globex"], timeout=120) as globex,
        ThreadPoolExecutor(FLOOD) as pool,
    ):
        flood = [
            pool.submit(acme.generate, prompt_token_ids=[5, 6, 7], max_new_tokens=NEW_TOKENS, ignore_eos=True, request_id=f"acme-{i}")
            for i in range(FLOOD)
        ]
        wait_queued(engine, FLOOD - 2 * SLOTS)  # acme's backlog is queued
        result = globex.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=2, ignore_eos=True, request_id="globex-0")
        assert len(result.token_ids) == 2
        for f in flood:
            assert len(f.result().token_ids) == NEW_TOKENS
    arrived, step = steps.arrived("globex-0"), steps.started("globex-0")
    acme_waiting = sum(1 for rid in steps.queued[arrived] if rid.startswith("acme-"))
    acme_before = steps.admitted_between(arrived, step, "acme-")
    # globex went at the next free slot, within one running request's remaining steps, ahead of
    # all of acme's backlog (FCFS: after every queued acme request, ~FLOOD x NEW_TOKENS / SLOTS steps).
    assert acme_waiting >= FLOOD - 2 * SLOTS - 2
    assert step - arrived <= NEW_TOKENS, (step, arrived)
    assert acme_before == 0, acme_before
    wait_idle(engine)


def test_priority_orders_a_tenants_own_requests_from_both_doors(server: BackgroundServer) -> None:
    engine = server.server.engine
    address = f"127.0.0.1:{server.server.port}"
    flood = 12
    with (
        recording(engine) as steps,
        Client(address, token=TOKENS["acme"], timeout=120) as acme,
        ThreadPoolExecutor(flood + 1) as pool,
    ):
        later = [
            pool.submit(acme.generate, prompt_token_ids=[5, 6, 7], max_new_tokens=NEW_TOKENS, ignore_eos=True,
                        request_id=f"later-{i}")  # the default priority, 0
            for i in range(flood)
        ]
        wait_queued(engine, flood - 2 * SLOTS)
        urgent = acme.generate(prompt_token_ids=[5, 6], max_new_tokens=2, ignore_eos=True, request_id="urgent-grpc", priority=-1)
        assert len(urgent.token_ids) == 2
        wait_queued(engine, 2)
        body = {"model": server.server.http_front.served_model_name, "prompt": [5, 6], "max_tokens": 2,
                "ignore_eos": True, "priority": -1}
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.server.http_port}/v1/completions", data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKENS['acme']}", "Content-Type": "application/json",
                     "X-Request-Id": "urgent-http"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 2
        for f in later:
            f.result()
    for rid in ("urgent-grpc", "urgent-http"):
        arrived, started = steps.arrived(rid), steps.started(rid)
        assert any(r.startswith("later-") for r in steps.queued[arrived]), rid  # it did have requests to pass
        assert steps.admitted_between(arrived, started, "later-") == 0, rid  # and passed them all
    wait_idle(engine)
