"""Per-tenant limits over a real server: each one trips with RESOURCE_EXHAUSTED for its tenant
(typed QuotaExceededError naming the limit, with the retry delay when waiting helps) while
another tenant's requests in the same moment succeed. One server for the module."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from tenant_server import TOKENS, TenantServer, start_tenant_server

from conftest import TinyModel
from loraplex.api.quotas import MAX_REQUESTS_RETRY_S
from loraplex_client import (
    AdapterNotFoundError,
    AsyncClient,
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    QuotaExceededError,
)


@pytest.fixture(scope="module")
def ts(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantServer]:
    server = start_tenant_server(tiny_llama, tmp_path_factory.mktemp("quotas"), metrics_port=0)
    yield server
    server.close()


def in_flight(ts: TenantServer, name: str) -> int:
    loop = ts.background.server.engine_loop
    assert loop is not None
    return loop.quotas.in_flight(name)


def wait_released(ts: TenantServer, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while in_flight(ts, name) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert in_flight(ts, name) == 0


def test_max_requests_trips_for_that_tenant_only(ts: TenantServer) -> None:
    busy, big = ts.client("busy"), ts.client("big")
    first = busy.generate_stream(prompt_token_ids=[5, 6, 7], max_new_tokens=400, ignore_eos=True)
    next(first)  # running: busy's one place is taken
    assert in_flight(ts, "busy") == 1
    for call in (
        lambda: busy.generate(prompt_token_ids=[5, 6], max_new_tokens=2),
        lambda: list(busy.generate_stream(prompt_token_ids=[5, 6], max_new_tokens=2)),
    ):
        with pytest.raises(QuotaExceededError) as err:
            call()
        e = err.value
        assert isinstance(e, OverloadedError) and e.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (e.limit, e.retry_delay) == ("max_requests", MAX_REQUESTS_RETRY_S)
        assert "max_requests (1) reached" in e.details
    # The same moment, another tenant: unaffected.
    assert len(big.generate(prompt_token_ids=[5, 6], max_new_tokens=3, ignore_eos=True).token_ids) == 3
    first.close()
    wait_released(ts, "busy")
    assert len(busy.generate(prompt_token_ids=[5, 6], max_new_tokens=2, ignore_eos=True).token_ids) == 2


def test_every_way_a_request_ends_gives_its_place_back(ts: TenantServer) -> None:
    busy = ts.client("busy")
    with pytest.raises(DeadlineExceededError):
        busy.generate(prompt_token_ids=[5, 6], max_new_tokens=450, ignore_eos=True, timeout=0.3)
    wait_released(ts, "busy")
    with pytest.raises(AdapterNotFoundError):
        busy.generate(prompt_token_ids=[5, 6], adapter_id="busy/none", max_new_tokens=2)
    assert in_flight(ts, "busy") == 0
    with pytest.raises(InvalidRequestError):
        busy.generate(prompt_token_ids=[5] * 600, max_new_tokens=2)  # longer than the model: add_request refuses it
    assert in_flight(ts, "busy") == 0
    stream = busy.generate_stream(prompt_token_ids=[5, 6], max_new_tokens=400, ignore_eos=True)
    next(stream)
    stream.close()  # cancelled by the client
    wait_released(ts, "busy")
    assert busy.generate(prompt_token_ids=[5, 6], max_new_tokens=2).usage.prompt_tokens == 2


def test_tokens_per_minute_trips_with_the_time_to_wait(ts: TenantServer) -> None:
    chatty, big = ts.client("chatty"), ts.client("big")
    for _ in range(2):  # 5 prompt + 10 generated tokens each: 30, the limit
        result = chatty.generate(prompt_token_ids=[5, 6, 7, 8, 9], max_new_tokens=10, ignore_eos=True)
        assert result.usage.prompt_tokens + result.usage.generated_tokens == 15
    with pytest.raises(QuotaExceededError) as err:
        chatty.generate(prompt_token_ids=[5, 6], max_new_tokens=2)
    e = err.value
    assert e.limit == "tokens_per_minute" and "used 30 tokens in the last minute" in e.details
    assert e.retry_delay is not None and 0 < e.retry_delay <= 60
    assert big.generate(prompt_token_ids=[5, 6, 7, 8, 9], max_new_tokens=10, ignore_eos=True).usage.generated_tokens == 10

    async def via_asyncio() -> QuotaExceededError:
        async with AsyncClient(ts.address, token=TOKENS["chatty"]) as client:
            try:
                await client.generate(prompt_token_ids=[5, 6], max_new_tokens=2)
            except QuotaExceededError as e:
                return e
        raise AssertionError("not refused")

    refused = asyncio.run(via_asyncio())
    assert refused.limit == "tokens_per_minute" and refused.retry_delay is not None and refused.retry_delay <= e.retry_delay


def test_max_adapters_counts_ids_in_the_tenants_namespaces(ts: TenantServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    hoarder, big = ts.client("hoarder"), ts.client("big")
    hoarder.load_adapter("hoarder/h0", "hoarder/h0")
    hoarder.load_adapter("hoarder/h1", "hoarder/h1")
    refusals = [
        lambda: hoarder.load_adapter("hoarder/h2", "hoarder/h2"),
        lambda: hoarder.generate(prompt_token_ids=[5, 6], adapter_id="hoarder/h2", max_new_tokens=2),  # auto-register
        lambda: hoarder.upload_adapter("hoarder/up", ts.root / "hoarder" / "h2"),
    ]
    for call in refusals:
        with pytest.raises(QuotaExceededError) as err:
            call()
        assert err.value.limit == "max_adapters" and err.value.retry_delay is None  # waiting does not help
        assert "max_adapters (2) reached" in err.value.details
    assert not (ts.root / "hoarder" / ".uploads").exists()  # refused before a byte was stored
    assert hoarder.load_adapter("hoarder/h0", "hoarder/h1").adapter_id == "hoarder/h0"  # an id it has: no new place
    assert big.load_adapter("big/b0", "big/b0").version == 1  # the same moment, another tenant
    hoarder.unload_adapter("hoarder/h1")
    assert hoarder.load_adapter("hoarder/h2", "hoarder/h2").adapter_id == "hoarder/h2"
    assert sorted(a.adapter_id for a in hoarder.list_adapters()) == ["hoarder/h0", "hoarder/h2"]
