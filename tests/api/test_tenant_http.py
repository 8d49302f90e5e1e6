"""The HTTP door keeps the tenant rules of the gRPC door, through the same auth seam: a real
server with both doors (tenant_server.py's tenants), the official `openai` package, and
plain HTTP where the SDK would hide the status line.

    no / unknown bearer token          401 invalid_api_key (health stays open)
    GET /v1/models                     the base + the caller's own and read namespaces' ids
    another tenant's adapter           404 model_not_found, worded as for an unknown id
    vLLM load / unload outside its own 403 (also: another tenant's files under one's own id)
    max_requests, tokens_per_minute    429 with Retry-After; HTTP tokens count in the window
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from tenant_server import TOKENS, TenantServer, start_tenant_server

from conftest import TinyModel
from loraplex_client import QuotaExceededError


@pytest.fixture(scope="module")
def ts(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantServer]:
    server = start_tenant_server(tiny_llama, tmp_path_factory.mktemp("tenant-http"), metrics_port=0, http=True)
    yield server
    server.close()


def oai(ts: TenantServer, who: str) -> openai.OpenAI:
    """The SDK as tenant `who` (a name in TOKENS), or with `who` itself as a token nobody has."""
    return openai.OpenAI(base_url=f"{ts.http_url}/v1", api_key=TOKENS.get(who, who), max_retries=0, timeout=60)


def call(ts: TenantServer, method: str, path: str, who: str | None, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], Any]:
    """Plain HTTP: (status, headers, JSON or text) for a tenant, or without a token (None)."""
    headers = {"Content-Type": "application/json"}
    if who is not None:
        headers["Authorization"] = f"Bearer {TOKENS.get(who, who)}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(ts.http_url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, got, text = response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as e:
        status, got, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, got, json.loads(text)
    except json.JSONDecodeError:
        return status, got, text


def base_name(ts: TenantServer) -> str:
    front = ts.background.server.http_front
    assert front is not None
    return front.served_model_name


def model_ids(ts: TenantServer, who: str) -> list[str]:
    with oai(ts, who) as client:
        return [m.id for m in client.models.list().data]


def test_models_lists_only_what_the_caller_may_use(ts: TenantServer) -> None:
    base = base_name(ts)
    assert model_ids(ts, "acme") == [base, "acme/a0", "public/p0"]
    assert model_ids(ts, "globex") == [base, "globex/g0", "public/p0"]
    assert model_ids(ts, "big") == [base]
    assert model_ids(ts, "boss") == [base, "acme/a0", "globex/g0", "public/p0"]  # an admin sees every id
    with oai(ts, "acme") as client:
        assert {m.id: getattr(m, "parent", None) for m in client.models.list().data} == {
            base: None, "acme/a0": base, "public/p0": base,
        }


def test_no_token_or_a_bad_one_is_401(ts: TenantServer) -> None:
    for who in (None, "nobody-has-this-token"):
        status, _, body = call(ts, "GET", "/v1/models", who)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
        status, _, body = call(ts, "POST", "/v1/completions", who, {"model": base_name(ts), "prompt": "hi", "max_tokens": 2})
        assert status == 401, body
    with oai(ts, "nobody-has-this-token") as client, pytest.raises(openai.AuthenticationError):
        client.completions.create(model=base_name(ts), prompt="hi", max_tokens=2)
    assert call(ts, "GET", "/health", None)[0] == 200  # health stays open


def test_another_tenants_adapter_is_not_found_as_an_unknown_one(ts: TenantServer) -> None:
    with oai(ts, "acme") as client:
        messages = {}
        for model in ("globex/g0", "globex/none"):  # another tenant's id, and an id nobody has
            with pytest.raises(openai.NotFoundError) as e:
                client.completions.create(model=model, prompt="hi", max_tokens=2)
            assert e.value.code == "model_not_found"
            messages[model] = e.value.message.replace(model, "<id>")
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            with pytest.raises(openai.NotFoundError):  # before the stream starts: a status, not an event
                client.completions.create(model=model, prompt="hi", max_tokens=2, stream=True)
            status, _, _ = call(ts, "POST", "/tokenize", "acme", {"model": model, "prompt": "hi"})
            assert status == 404
        assert messages["globex/g0"] == messages["globex/none"]  # nothing tells them apart
        # Its own and its read namespace's adapters work.
        for model in ("acme/a0", "public/p0"):
            out = client.completions.create(model=model, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
            assert out.usage is not None and out.usage.completion_tokens == 2
    with oai(ts, "globex") as client:  # its owner uses it
        assert client.completions.create(model="globex/g0", prompt="hi", max_tokens=1).choices[0].finish_reason


def test_load_and_unload_obey_the_tenant_rights(ts: TenantServer) -> None:
    refused = [
        {"lora_name": "globex/mine", "lora_path": "globex/g0"},  # an id outside its namespaces
        {"lora_name": "acme/stolen", "lora_path": "globex/g0"},  # another tenant's files under its own id
        {"lora_name": "acme/stolen", "lora_path": str(ts.root / "globex" / "g0")},  # the same, absolute (vLLM style)
        {"lora_name": "acme/stolen", "lora_path": "acme/link"},  # the same, through a symlink
        {"lora_name": "acme/stolen", "lora_path": "acme/../globex/g0"},
    ]
    for body in refused:
        status, _, answer = call(ts, "POST", "/v1/load_lora_adapter", "acme", body)
        assert status == 403, (body, answer)
        assert answer["error"]["type"] == "permission_error" and str(ts.root) not in answer["error"]["message"]
    status, _, answer = call(ts, "POST", "/v1/unload_lora_adapter", "acme", {"lora_name": "globex/g0"})
    assert status == 403, answer
    assert "globex/g0" in model_ids(ts, "globex") and "acme/stolen" not in model_ids(ts, "boss")
    # Inside its own namespace: the vLLM round trip works, absolute path and all.
    status, _, answer = call(
        ts, "POST", "/v1/load_lora_adapter", "acme", {"lora_name": "acme/a1", "lora_path": str(ts.root / "acme" / "a1")}
    )
    assert status == 200, answer
    assert "acme/a1" in model_ids(ts, "acme") and "acme/a1" not in model_ids(ts, "globex")
    assert call(ts, "POST", "/v1/unload_lora_adapter", "acme", {"lora_name": "acme/a1"})[0] == 200
    assert "acme/a1" not in model_ids(ts, "acme")


def test_over_max_requests_is_429_with_retry_after_for_that_tenant_only(ts: TenantServer) -> None:
    first = ts.client("busy").generate_stream(prompt_token_ids=[5, 6, 7], max_new_tokens=400, ignore_eos=True)
    next(first)  # running: busy's one place is taken
    try:
        with oai(ts, "busy") as client, pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=base_name(ts), prompt="hi", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.code == "rate_limit_exceeded" and "max_requests (1) reached" in e.value.message
        with oai(ts, "big") as client:  # the same moment, another tenant
            assert client.completions.create(model=base_name(ts), prompt="hi", max_tokens=1).choices
    finally:
        first.close()


def test_tokens_per_minute_counts_http_requests(ts: TenantServer) -> None:
    with oai(ts, "chatty") as client:
        for _ in range(2):  # 5 prompt + 10 generated tokens each: 30, the limit
            out = client.completions.create(
                model=base_name(ts), prompt=[5, 6, 7, 8, 9], max_tokens=10, extra_body={"ignore_eos": True}
            )
            assert out.usage is not None and out.usage.total_tokens == 15
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=base_name(ts), prompt="hi", max_tokens=2)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    assert "tokens_per_minute (30) reached" in e.value.message
    with pytest.raises(QuotaExceededError):  # one window for both doors
        ts.client("chatty").generate(prompt_token_ids=[5, 6], max_new_tokens=2)
