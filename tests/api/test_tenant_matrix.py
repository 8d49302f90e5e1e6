"""Tenants over a real server: every RPC × {own id, other tenant's id, read-namespace id, unknown
ids, admin} gives the expected status; no way to learn another tenant's ids or paths; the
audit trail and the per-tenant metrics. One server for the module (tenant_server.py)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from tenant_server import TOKENS, TenantServer, start_tenant_server

from conftest import TinyModel, free_port
from loraplex_client import AdapterNotFoundError, Client, LoraplexError

OK = "OK"
NOT_FOUND, DENIED, UNAUTH = "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED"


@pytest.fixture(scope="module")
def ts(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantServer]:
    server = start_tenant_server(tiny_llama, tmp_path_factory.mktemp("tenants"), metrics_port=free_port())
    yield server
    server.close()


@pytest.fixture(scope="module")
def local_adapter(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "adapter"
    shutil.copytree(tiny_llama.adapters["all-r8-rslora"], out)
    return out


def outcome(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except LoraplexError as e:
        return e.code.name
    return OK


def run(client: Client, rpc: str, adapter_id: str, path: str, local: Path) -> str:
    """One call of `rpc` naming `adapter_id` (`path`: LoadAdapter's directory); its status name."""
    if rpc == "Generate":
        return outcome(lambda: client.generate(prompt_token_ids=[5, 6, 7], adapter_id=adapter_id, max_new_tokens=2))
    if rpc == "GenerateStream":
        return outcome(lambda: list(client.generate_stream(prompt_token_ids=[5, 6], adapter_id=adapter_id, max_new_tokens=2)))
    if rpc == "GetAdapter":
        return outcome(lambda: client.get_adapter(adapter_id))
    if rpc == "LoadAdapter":
        return outcome(lambda: client.load_adapter(adapter_id, path))
    if rpc == "UploadAdapter":
        return outcome(lambda: client.upload_adapter(adapter_id, local))
    if rpc == "UnloadAdapter":
        return outcome(lambda: client.unload_adapter(adapter_id))
    raise AssertionError(rpc)


# (rpc, kind) -> (adapter id, LoadAdapter path, acme's expected status, boss's expected status)
KINDS = ("own", "other", "read", "unknown", "unknown-elsewhere")
IDS = {
    "own": ("acme/a0", "acme/a0"),
    "other": ("globex/g0", "globex/g0"),
    "read": ("public/p0", "public/p0"),
    "unknown": ("acme/nope-{rpc}", "acme/a1"),  # unregistered, in acme's namespace
    "unknown-elsewhere": ("globex/nope-{rpc}", "acme/a1"),  # unregistered, outside it
}
USE = {"own": OK, "other": NOT_FOUND, "read": OK, "unknown": NOT_FOUND, "unknown-elsewhere": NOT_FOUND}
CHANGE = {"own": OK, "other": DENIED, "read": DENIED, "unknown": OK, "unknown-elsewhere": DENIED}
UNLOAD = {**CHANGE, "unknown": NOT_FOUND}
EXPECTED = {"Generate": USE, "GenerateStream": USE, "GetAdapter": USE, "LoadAdapter": CHANGE, "UploadAdapter": CHANGE,
            "UnloadAdapter": UNLOAD}
# The admin may do everything: on ids that exist, and loads / uploads of new ids anywhere.
ADMIN = {**{rpc: {k: OK if k in ("own", "other", "read") else NOT_FOUND for k in KINDS} for rpc in EXPECTED},
         "LoadAdapter": dict.fromkeys(KINDS, OK), "UploadAdapter": dict.fromkeys(KINDS, OK)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rpc", list(EXPECTED))
def test_member_matrix(ts: TenantServer, local_adapter: Path, rpc: str, kind: str) -> None:
    acme = ts.client("acme")
    adapter_id, path = IDS[kind]
    adapter_id = adapter_id.format(rpc=rpc.lower())
    if rpc == "UnloadAdapter" and kind == "own":
        adapter_id = "acme/disposable"
        acme.load_adapter(adapter_id, "acme/a0")
    registered = {a.adapter_id for a in ts.client("boss").list_adapters()}
    assert run(acme, rpc, adapter_id, path, local_adapter) == EXPECTED[rpc][kind]
    after = {a.adapter_id for a in ts.client("boss").list_adapters()}
    if EXPECTED[rpc][kind] != OK:
        assert after == registered  # a refused call changes nothing


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rpc", list(EXPECTED))
def test_admin_matrix(ts: TenantServer, local_adapter: Path, rpc: str, kind: str) -> None:
    boss = ts.client("boss")
    adapter_id, path = IDS[kind]
    adapter_id = adapter_id.format(rpc=f"admin-{rpc.lower()}")
    if rpc in ("LoadAdapter", "UploadAdapter", "UnloadAdapter") and kind in ("own", "other", "read"):
        adapter_id = f"{adapter_id}-admin-copy"  # never unload or replace the shared fixtures
        boss.load_adapter(adapter_id, path)
    assert run(boss, rpc, adapter_id, path, local_adapter) == ADMIN[rpc][kind]


@pytest.mark.parametrize("who", [None, "not-a-token", TOKENS["acme"] + "x"])
def test_every_rpc_needs_a_known_token_and_health_stays_open(ts: TenantServer, local_adapter: Path, who: str | None) -> None:
    client = ts.client(who)
    for rpc in EXPECTED:
        assert run(client, rpc, "acme/a0", "acme/a0", local_adapter) == UNAUTH, rpc
    assert outcome(client.list_adapters) == UNAUTH
    assert outcome(client.model_info) == UNAUTH
    assert client.health()
    # The --auth-token still works, as an admin.
    assert run(ts.client("admin-token"), "Generate", "globex/g0", "", local_adapter) == OK


def test_lists_show_only_own_and_read_namespaces(ts: TenantServer) -> None:
    def ids(who: str) -> set[str]:
        return {a.adapter_id for a in ts.client(who).list_adapters()}

    everything = ids("boss")
    assert {"acme/a0", "globex/g0", "public/p0"} <= everything
    assert ids("acme") == {i for i in everything if i.startswith(("acme/", "public/"))}
    assert ids("globex") == {i for i in everything if i.startswith(("globex/", "public/"))}
    assert ids("big") == {i for i in everything if i.startswith("big/")}
    assert ts.client("acme").model_info().ready  # the base model and its info are open to every tenant
    assert ts.client("globex").generate(prompt_token_ids=[5, 6], max_new_tokens=2).finish_reason in ("length", "stop")


def test_a_hidden_id_gets_the_unknown_ids_message_byte_for_byte(ts: TenantServer) -> None:
    acme, globex, boss = ts.client("acme"), ts.client("globex"), ts.client("boss")
    globex.load_adapter("globex/secret", "globex/g0")
    hidden: list[str] = []
    for call in (
        lambda: acme.generate(prompt_token_ids=[5, 6], adapter_id="globex/secret", max_new_tokens=2),
        lambda: list(acme.generate_stream(prompt_token_ids=[5, 6], adapter_id="globex/secret", max_new_tokens=2)),
        lambda: acme.get_adapter("globex/secret"),
    ):
        with pytest.raises(AdapterNotFoundError) as err:
            call()
        hidden.append(err.value.details)
    globex.unload_adapter("globex/secret")
    unknown: list[str] = []
    for call in (
        lambda: boss.generate(prompt_token_ids=[5, 6], adapter_id="globex/secret", max_new_tokens=2),
        lambda: list(boss.generate_stream(prompt_token_ids=[5, 6], adapter_id="globex/secret", max_new_tokens=2)),
        lambda: boss.get_adapter("globex/secret"),
    ):
        with pytest.raises(AdapterNotFoundError) as err:
            call()
        unknown.append(err.value.details)
    assert hidden == unknown  # the admin sees the truly unknown id; acme saw an existing one
    assert len(set(hidden)) == 1 and "globex/secret" in hidden[0]


# -- paths --------------------------------------------------------------------------------------


def test_a_member_cannot_register_another_tenants_files(ts: TenantServer) -> None:
    acme = ts.client("acme")
    before = {a.adapter_id for a in ts.client("boss").list_adapters()}
    refused = {
        "globex/g0": DENIED,  # another tenant's directory under its own id
        "acme/../globex/g0": DENIED,
        str(ts.root / "globex" / "g0"): DENIED,  # absolute
        "acme/link": DENIED,  # a symlink in its namespace into globex's
        "acme/%2e%2e/globex/g0": NOT_FOUND,  # no decoding: a directory of that name does not exist
        "acme/\uff0e\uff0e/globex/g0": NOT_FOUND,  # fullwidth dots are not dots
        "acme/a0\x00": "INVALID_ARGUMENT",
    }
    for path, code in refused.items():
        assert outcome(lambda path=path: acme.load_adapter("acme/stolen", path)) == code, path
    # Auto-register follows no symlink out of the id's namespace either, and says nothing more.
    with pytest.raises(AdapterNotFoundError) as err:
        acme.generate(prompt_token_ids=[5, 6], adapter_id="acme/link", max_new_tokens=2)
    assert err.value.details == "adapter 'acme/link' is not registered"
    assert {a.adapter_id for a in ts.client("boss").list_adapters()} == before


paths = st.lists(st.sampled_from(["acme", "globex", "g0", "a0", "a1", "link", "..", ".", "", "public", "p0"]),
                 min_size=1, max_size=5).map("/".join)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=paths)
def test_whatever_a_member_loads_lies_under_its_namespace(ts: TenantServer, path: str) -> None:
    acme = ts.client("acme")
    try:
        info = acme.load_adapter("acme/fuzzed", path)
    except LoraplexError as e:
        refusals = ("PERMISSION_DENIED", "NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT")
        assert e.code.name in refusals, (path, e)
        assert str(ts.root) not in e.details
        return
    real = os.path.realpath(ts.root / info.path)
    assert real.startswith(os.path.realpath(ts.root / "acme") + os.sep), (path, info.path)


def test_messages_and_infos_name_paths_relative_to_the_root(ts: TenantServer, local_adapter: Path) -> None:
    acme = ts.client("acme")
    with pytest.raises(LoraplexError) as err:
        acme.load_adapter("acme/broken", "acme/broken")
    assert err.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details.startswith("acme/broken: adapter_config.json is not valid JSON")
    assert str(ts.root) not in err.value.details
    assert acme.get_adapter("public/p0").path == "public/p0"
    uploaded = acme.upload_adapter("acme/uploaded", local_adapter)
    assert uploaded.path == f"acme/.uploads/uploaded/{uploaded.content_hash}"


# -- audit and metrics ------------------------------------------------------------------------


def _audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.audit for r in caplog.records if r.name == "loraplex.audit"]  # type: ignore[attr-defined]


def test_one_audit_line_per_change_and_per_denied_call_never_a_token(
    ts: TenantServer, local_adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    acme = ts.client("acme")
    with caplog.at_level(logging.INFO):
        info = acme.load_adapter("acme/audited", "acme/a1")
        assert _audit(caplog) == [{
            "tenant": "acme", "rpc": "LoadAdapter", "adapter_id": "acme/audited", "version": info.version,
            "content_hash": info.content_hash, "outcome": "ok",
        }]
        caplog.clear()
        acme.unload_adapter("acme/audited")
        outcome(lambda: acme.load_adapter("globex/mine", "acme/a0"))
        outcome(lambda: acme.get_adapter("globex/g0"))
        outcome(lambda: ts.client("nobody").list_adapters())
        outcome(lambda: acme.load_adapter("acme/broken", "acme/broken"))
    lines = _audit(caplog)
    assert [(a["tenant"], a["rpc"], a["adapter_id"], a["outcome"]) for a in lines] == [
        ("acme", "UnloadAdapter", "acme/audited", "ok"),
        ("acme", "LoadAdapter", "globex/mine", "permission_denied"),
        ("acme", "GetAdapter", "globex/g0", "not_found"),
        ("(unauthenticated)", "ListAdapters", None, "unauthenticated"),
        ("acme", "LoadAdapter", "acme/broken", "failed"),
    ]
    assert lines[0]["version"] == info.version and lines[0]["content_hash"] == info.content_hash
    for token in TOKENS.values():
        assert token not in caplog.text


def _samples(ts: TenantServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    metrics = ts.background.server.metrics
    assert metrics is not None
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_requests_tokens_and_denials_are_counted_by_tenant(ts: TenantServer) -> None:
    before = _samples(ts)
    ts.client("globex").generate(prompt_token_ids=[5, 6, 7], adapter_id="public/p0", max_new_tokens=4, ignore_eos=True)
    ts.client("admin-token").generate(prompt_token_ids=[5, 6], max_new_tokens=3, ignore_eos=True)
    outcome(lambda: ts.client("globex").get_adapter("acme/a0"))
    after = _samples(ts)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("loraplex_requests_total", finish_reason="length", tenant="globex") == 1
    assert delta("loraplex_prompt_tokens_total", tenant="globex") == 3
    assert delta("loraplex_generated_tokens_total", tenant="globex") == 4
    assert delta("loraplex_requests_total", finish_reason="length", tenant="(anonymous)") == 1  # the admin token
    assert delta("loraplex_denied_calls_total", tenant="globex", outcome="not_found") == 1
    tenants = {v for (_, labels) in after for k, v in labels if k == "tenant"}
    assert tenants <= {*TOKENS, "(anonymous)"}  # configured names only
