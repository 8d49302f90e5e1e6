"""The cluster's parts that need no Ray cluster: the shared registry, the status a failed
replica call ends with, and how the ingress merges the replicas' adapter lists."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the routes' annotations here
from fastapi.responses import StreamingResponse

from loraplex.cluster.calls import REPLICA_DIED, CallError, ReplicaContext, status_of_failure
from loraplex.cluster.registry import AdapterRegistry, RegistryEntry
from loraplex.rules import InvalidFieldError


def test_registry_round_trip(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    assert registry.get("acme/a") is None and registry.entries() == []
    entry = RegistryEntry("acme/a", "s3://bucket/a", pin=True, content_hash="ab" * 8, rank=8, target_modules=("q_proj",))
    registry.put(entry)
    registry.put(RegistryEntry("b", "b"))
    assert AdapterRegistry(tmp_path).get("acme/a") == entry  # another process (replica) reads the same
    assert [e.adapter_id for e in registry.entries()] == ["acme/a", "b"]
    registry.put(RegistryEntry("acme/a", "other"))  # replaced whole
    assert registry.get("acme/a") == RegistryEntry("acme/a", "other")
    assert registry.remove("acme/a") and not registry.remove("acme/a")
    assert [e.adapter_id for e in registry.entries()] == ["b"]
    assert not list(registry.dir.rglob(".put-*"))  # no temporary file left behind
    with pytest.raises(InvalidFieldError):
        registry.put(RegistryEntry("../escape", "x"))


class RayActorError(Exception):  # stands in for ray.exceptions.RayActorError (matched by name)
    pass


class ActorDiedError(RayActorError):
    pass


class BackPressureError(Exception):
    pass


class WrappedTaskError(Exception):  # Ray's RayTaskError keeps the replica's exception as .cause
    def __init__(self, cause: BaseException) -> None:
        super().__init__("task failed")
        self.cause = cause


def test_failed_calls_map_to_statuses() -> None:
    assert status_of_failure(CallError("NOT_FOUND", "adapter 'x' is not registered")) == (
        grpc.StatusCode.NOT_FOUND, "adapter 'x' is not registered"
    )
    assert status_of_failure(WrappedTaskError(CallError("ABORTED", "unloaded"))) == (grpc.StatusCode.ABORTED, "unloaded")
    assert status_of_failure(ActorDiedError("gone")) == (grpc.StatusCode.UNAVAILABLE, REPLICA_DIED)
    assert status_of_failure(BackPressureError("queue full"))[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of_failure(ValueError("bug"))[0] is grpc.StatusCode.INTERNAL
    error = CallError("FAILED_PRECONDITION", "why")
    import pickle

    again = pickle.loads(pickle.dumps(error))  # it crosses the Ray hop
    assert (again.code, again.details, again.status) == ("FAILED_PRECONDITION", "why", grpc.StatusCode.FAILED_PRECONDITION)


def test_replica_context_abort_raises_the_status() -> None:
    import asyncio

    with pytest.raises(CallError) as e:
        asyncio.run(ReplicaContext().abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: is required"))
    assert (e.value.status, e.value.details) == (grpc.StatusCode.INVALID_ARGUMENT, "prompt: is required")


def test_ingress_merges_adapter_lists() -> None:
    pytest.importorskip("ray")
    from loraplex.cluster.ingress import merge_adapter_lists
    from loraplex_proto.v1 import loraplex_pb2 as pb

    def info(replica_version: int, tier: int, requests: int) -> pb.AdapterInfo:
        return pb.AdapterInfo(
            adapter_id="a", version=replica_version, tier=tier, active_requests=1, stats=pb.AdapterStats(requests=requests)
        )

    merged = merge_adapter_lists([[info(1, pb.ADAPTER_TIER_DEVICE, 5)], [info(2, pb.ADAPTER_TIER_HOST, 7)], []])
    assert list(merged) == ["a"]
    a = merged["a"]
    assert (a.tier, a.version, a.active_requests, a.stats.requests) == (pb.ADAPTER_TIER_DEVICE, 2, 2, 12)


def test_asgi_exchange_passes_a_request_through_an_app() -> None:
    """The replica's side of the HTTP route: a request through a FastAPI app in process,
    the response's start then its body chunks as sent (a stream stays a stream)."""
    import asyncio

    from loraplex.cluster.http import asgi_exchange, model_of

    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, object]:
        return {"body": (await request.json()), "query": request.url.query, "who": request.headers.get("x-who")}

    @app.get("/count")
    async def count() -> StreamingResponse:
        async def chunks():  # type: ignore[no-untyped-def]
            for i in range(3):
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def run(method: str, path: str, query: bytes, body: bytes) -> list[dict[str, object]]:
        return [m async for m in asgi_exchange(app, method, path, query, [("X-Who", "me")], body)]

    start, *chunks = asyncio.run(run("POST", "/echo", b"a=1", b'{"model": "acme/a"}'))
    assert start["status"] == 200 and ["content-type", "application/json"] in start["headers"]  # type: ignore[operator]
    import json

    assert json.loads(b"".join(c["body"] for c in chunks)) == {"body": {"model": "acme/a"}, "query": "a=1", "who": "me"}  # type: ignore[misc]
    start, *chunks = asyncio.run(run("GET", "/count", b"", b""))
    assert start["status"] == 200 and [c["body"] for c in chunks] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert asyncio.run(run("GET", "/nowhere", b"", b""))[0]["status"] == 404
    assert (model_of(b'{"model": "acme/a"}'), model_of(b"[1]"), model_of(b"not json"), model_of(b'{"model": 3}')) == ("acme/a", None, None, None)


def test_http_errors_keep_their_status() -> None:
    import json

    from loraplex.cluster.http import error_response

    died = error_response(ActorDiedError("gone"))
    assert died.status_code == 503 and json.loads(bytes(died.body))["error"]["message"] == REPLICA_DIED
    assert error_response(CallError("NOT_FOUND", "adapter 'x' is not registered")).status_code == 404
    assert error_response(CallError("INVALID_ARGUMENT", "path: must be relative")).status_code == 400
    assert error_response(BackPressureError("queue full")).status_code == 429
