"""The Ray Serve application on a local Ray cluster started here (ray.init, few CPUs):
an ingress and two engine replicas of the tiny Llama, reached through Ray's gRPC proxy with
the unchanged client SDK, and through Ray's HTTP proxy with the official `openai` package.

The reference is direct loraplex: a gRPC server in this process on the same base and the
same adapter root. Marked `ray`: `make test-ray` runs it (minutes on 2 cores), `make test`
does not."""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import TinyModel, engine_config, make_adapter
from loraplex.api.server import BackgroundServer
from loraplex.config import ANY_PORT, ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.ports import free_ports
from loraplex_client import AdapterNotFoundError, Client, ServerUnavailableError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]

BASE = ["qv-r4", "all-r8-rslora", "all-r16-patterns", "attn-r8-layer0"]
VARIANTS = [f"acme/v{i}" for i in range(4)]
ADAPTERS = BASE + VARIANTS  # eight, all auto-registered by id from the shared root
PROMPTS = [[8, 9, 10], [5, 6, 7, 8], [20, 21, 22, 23, 24]]
# Ids loaded or uploaded through the cluster only, and the same adapter's id on the direct server.
SAME_AS = {"loaded/patterns": "all-r16-patterns", "uploaded/rs": "all-r8-rslora"}
HTTP_GREEDY: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
MESSAGES: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]


@dataclass
class Cluster:
    address: str  # Ray's gRPC proxy
    http: str  # Ray's HTTP proxy
    ingress: Any  # the application's DeploymentHandle (the ingress)
    root: Path


@pytest.fixture(scope="module")
def shared_root(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster-root")
    for name in BASE:
        shutil.copytree(tiny_llama.adapters[name], root / name)
    for i, name in enumerate(VARIANTS):
        make_adapter(tiny_llama.path, root / name, seed=200 + i, r=8, lora_alpha=16, target_modules="all-linear")
    return root


def _config(tiny: TinyModel, root: Path, port: int, http_port: int = 0) -> ServerConfig:
    # max_loras=2 device slots per replica: adapters do move between tiers during the tests
    api = ApiConfig(port=port, metrics_port=0, http_port=http_port)
    return ServerConfig(engine=engine_config(tiny, roots=(str(root),), max_loras=2), api=api)


@pytest.fixture(scope="module")
def direct_server(tiny_llama: TinyModel, shared_root: Path) -> Iterator[BackgroundServer]:
    config = _config(tiny_llama, shared_root, 0, http_port=ANY_PORT)
    server = BackgroundServer(config, Engine(config.engine))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct(direct_server: BackgroundServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{direct_server.server.port}", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def cluster(tiny_llama: TinyModel, shared_root: Path) -> Iterator[Cluster]:
    ray = pytest.importorskip("ray")
    from ray import serve

    from loraplex.cluster.app import (
        APP_NAME,
        ClusterOptions,
        application,
        init_local_ray,
        start_serve,
    )

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        init_local_ray(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20,
                       logging_level=logging.WARNING, log_to_driver=True)
        try:
            port, http_port = free_ports(2)
            start_serve("127.0.0.1", port, http_port)
            options = ClusterOptions(replicas=2, max_adapters_per_replica=6, replica_cpus=1, health_check_period_s=1)
            serve.run(application(_config(tiny_llama, shared_root, port), options), name=APP_NAME, route_prefix="/")
            yield Cluster(f"127.0.0.1:{port}", f"127.0.0.1:{http_port}", serve.get_app_handle(APP_NAME), shared_root)
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.address, timeout=120) as c:
        yield c


def _stats(cluster: Cluster) -> list[dict[str, Any]]:
    """Each live replica's numbers (a replica that just died is left out)."""
    return list(cluster.ingress.stats.remote().result(timeout_s=60))


def _tokens(client: Client, adapter: str | None, prompt: list[int], n: int = 8) -> list[int]:
    return list(client.generate(prompt_token_ids=prompt, adapter_id=adapter, max_new_tokens=n, ignore_eos=True).token_ids)


def test_responses_equal_direct_loraplex(client: Client, direct: Client, cluster: Cluster, tiny_llama: TinyModel) -> None:
    assert client.health()
    jobs = [(adapter, prompt) for adapter in [None, *ADAPTERS] for prompt in PROMPTS[:2]]
    with ThreadPoolExecutor(4) as pool:  # concurrent: mixed-adapter batches on both sides
        through_ray = list(pool.map(lambda j: client.generate(prompt_token_ids=j[1], adapter_id=j[0], max_new_tokens=8, ignore_eos=True), jobs))
    for (adapter, prompt), result in zip(jobs, through_ray):
        expected = direct.generate(prompt_token_ids=prompt, adapter_id=adapter, max_new_tokens=8, ignore_eos=True)
        assert (result.token_ids, result.text) == (expected.token_ids, expected.text), adapter
    assert len({tuple(r.token_ids) for r in through_ray}) > len(PROMPTS)  # the adapters change the output
    chunks = list(client.generate_stream(prompt_token_ids=PROMPTS[2], adapter_id="acme/v1", max_new_tokens=8, ignore_eos=True))
    assert [t for c in chunks for t in c.token_ids] == _tokens(direct, "acme/v1", PROMPTS[2])

    # LoadAdapter and UploadAdapter through the ingress; the adapter then serves on any replica.
    info = client.load_adapter("loaded/patterns", "all-r16-patterns")
    assert info.path == "all-r16-patterns"
    assert _tokens(client, "loaded/patterns", PROMPTS[0]) == _tokens(direct, SAME_AS["loaded/patterns"], PROMPTS[0])
    uploaded = client.upload_adapter("uploaded/rs", tiny_llama.adapters["all-r8-rslora"])
    assert uploaded.path.startswith("uploaded/.uploads/rs/")  # under the shared root (beside its namespace): every replica reads it
    assert _tokens(client, "uploaded/rs", PROMPTS[0]) == _tokens(direct, SAME_AS["uploaded/rs"], PROMPTS[0])
    assert {"loaded/patterns", "uploaded/rs"} <= {a.adapter_id for a in client.list_adapters()}
    with pytest.raises(AdapterNotFoundError):
        client.generate(prompt_token_ids=PROMPTS[0], adapter_id="nobody/here", max_new_tokens=2)
    assert client.model_info().max_loras == 2


def test_openai_routes_through_the_cluster(cluster: Cluster, direct_server: BackgroundServer) -> None:
    """The OpenAI API through Ray's HTTP proxy answers as the direct server's does (greedy),
    streamed or not; load / unload by HTTP reach the cluster's registry; errors keep their status."""
    import openai

    direct_url = f"http://127.0.0.1:{direct_server.server.http_port}"
    with openai.OpenAI(base_url=f"http://{cluster.http}/v1", api_key="x", max_retries=0, timeout=120) as ray_oai, \
            openai.OpenAI(base_url=f"{direct_url}/v1", api_key="x", max_retries=0, timeout=120) as direct_oai:
        assert urllib.request.urlopen(f"http://{cluster.http}/health", timeout=30).status == 200
        for model in ["model", "acme/v2", "qv-r4"]:  # the base (its directory's name) and two adapters
            through_ray = ray_oai.completions.create(model=model, prompt="The sun rises", **HTTP_GREEDY)
            expected = direct_oai.completions.create(model=model, prompt="The sun rises", **HTTP_GREEDY)
            assert through_ray.choices[0].text == expected.choices[0].text, model
        stream = ray_oai.chat.completions.create(model="acme/v3", messages=MESSAGES, stream=True, **HTTP_GREEDY)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        expected_chat = direct_oai.chat.completions.create(model="acme/v3", messages=MESSAGES, **HTTP_GREEDY)
        assert streamed == expected_chat.choices[0].message.content and streamed

        # vLLM's load / unload routes: the adapter serves on whichever replica the router picks.
        loaded = _post(cluster.http, "/v1/load_lora_adapter", {"lora_name": "http/v0", "lora_path": str(cluster.root / "acme/v0")})
        assert loaded == (200, "Success: LoRA adapter 'http/v0' added successfully.")
        through_ray = ray_oai.completions.create(model="http/v0", prompt="The sun rises", **HTTP_GREEDY)
        assert through_ray.choices[0].text == direct_oai.completions.create(model="acme/v0", prompt="The sun rises", **HTTP_GREEDY).choices[0].text
        assert {"model", "http/v0", "acme/v3"} <= {m.id for m in ray_oai.models.list().data}
        assert _post(cluster.http, "/v1/unload_lora_adapter", {"lora_name": "http/v0"})[0] == 200
        assert _post(cluster.http, "/v1/unload_lora_adapter", {"lora_name": "http/v0"})[0] == 404
        with pytest.raises(openai.NotFoundError):
            ray_oai.completions.create(model="http/v0", prompt="The sun rises", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            ray_oai.completions.create(model="model", prompt="The sun rises", max_tokens=2, temperature=-1)



def _post(address: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{address}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_affinity_after_warm_up(client: Client, cluster: Cluster) -> None:
    """After each adapter has been served once, >= 90% of requests land on a replica that
    already holds their adapter. Eight adapters, six held ids per replica: routing by
    adapter id fits them all (about four a replica), while a router that ignores adapter ids
    sends each replica all eight and its LRU misses about one request in four."""
    for adapter in ADAPTERS:
        _tokens(client, adapter, PROMPTS[0], n=2)
    time.sleep(1.0)  # replicas push the ids they hold to Serve's controller every 0.1 s
    before = _stats(cluster)
    rng = random.Random(0)
    jobs = [(rng.choice(ADAPTERS), rng.choice(PROMPTS)) for _ in range(80)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: _tokens(client, j[0], j[1], n=4), jobs))
    after = _stats(cluster)
    requests = sum(s["requests"] for s in after) - sum(s["requests"] for s in before)
    misses = sum(s["misses"] for s in after) - sum(s["misses"] for s in before)
    print(f"affinity: {misses} of {requests} requests reached a replica without their adapter")
    assert requests == len(jobs)
    assert (requests - misses) / requests >= 0.9, (misses, requests, after)


def test_unload_reaches_every_replica(client: Client, cluster: Cluster) -> None:
    client.load_adapter("pinned/qv", "qv-r4", pin=True)  # pinned: registered on every replica
    assert all("pinned/qv" in s["held"] for s in _stats(cluster))
    assert len(_tokens(client, "pinned/qv", PROMPTS[0])) == 8
    assert client.unload_adapter("pinned/qv").aborted_requests == 0
    assert not any("pinned/qv" in s["held"] for s in _stats(cluster))
    assert "pinned/qv" not in {a.adapter_id for a in client.list_adapters()}
    with pytest.raises(AdapterNotFoundError):
        client.generate(prompt_token_ids=PROMPTS[0], adapter_id="pinned/qv", max_new_tokens=2)
    with pytest.raises(AdapterNotFoundError):
        client.unload_adapter("pinned/qv")


def test_killed_replica_fails_only_its_in_flight_requests(client: Client, direct: Client, cluster: Cluster) -> None:
    import ray

    stats = _stats(cluster)
    assert len(stats) == 2 and all(len(s["held"]) >= 2 for s in stats)
    # Three long streams per replica over two adapters it holds (it has two device slots).
    jobs = [(f"kill-{r}-{i}", s["held"][-1 - i % 2]) for r, s in enumerate(stats) for i in range(3)]
    outcomes: dict[str, Any] = {}
    first_chunk = threading.Barrier(len(jobs) + 1, timeout=300)

    def stream(rid: str, adapter: str) -> None:
        tokens: list[int] = []
        try:
            for i, chunk in enumerate(client.generate_stream(
                prompt_token_ids=PROMPTS[0], adapter_id=adapter, max_new_tokens=480, ignore_eos=True, request_id=rid
            )):
                tokens.extend(chunk.token_ids)
                if i == 0:
                    first_chunk.wait()
            outcomes[rid] = len(tokens)
        except ServerUnavailableError as e:
            outcomes[rid] = e
        except Exception as e:  # any other outcome fails the test below
            outcomes[rid] = repr(e)
            first_chunk.abort()

    threads = [threading.Thread(target=stream, args=job) for job in jobs]
    for t in threads:
        t.start()
    try:
        first_chunk.wait()
    except threading.BrokenBarrierError:
        pytest.fail(f"a stream failed before the kill: {outcomes}")
    in_flight = {s["replica"]: set(s["in_flight"]) for s in _stats(cluster)}
    victim = next(name for name, rids in in_flight.items() if rids)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=600)

    doomed = in_flight[victim]
    assert doomed and doomed < {rid for rid, _ in jobs}
    for rid, _ in jobs:
        if rid in doomed:
            assert isinstance(outcomes[rid], ServerUnavailableError), (rid, outcomes[rid])
        else:
            assert outcomes[rid] == 480, (rid, outcomes[rid])  # the other replica's streams finished whole

    # Later requests succeed, the dead replica's adapters included; Ray brings a replica back.
    time.sleep(2.0)
    for _, adapter in jobs:
        assert _tokens(client, adapter, PROMPTS[1]) == _tokens(direct, SAME_AS.get(adapter, adapter), PROMPTS[1])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        names = {s["replica"] for s in _stats(cluster)}
        if len(names) == 2 and victim not in names:
            break
        time.sleep(2.0)
    assert len(names) == 2 and victim not in names, names
    print(f"replacement replica serving {time.monotonic() - killed_at:.0f}s after the kill")
