"""SIGHUP reloads the tenants file of a real `loraplex serve` process: a tenant added can call
at once, one removed cannot, a stream it started runs to completion, and a broken file
keeps the table in use."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from tenant_server import TOKENS, tenants_toml
from test_health_drain import ServeProcess, wait_for

from conftest import TinyModel
from loraplex_client import AuthenticationError, Client


def _accepted(address: str, tenant: str) -> bool:
    with Client(address, token=TOKENS[tenant], timeout=10) as client:
        try:
            client.list_adapters()
        except AuthenticationError:
            return False
    return True


def test_sighup_adds_and_removes_tenants_while_a_stream_runs(tiny_llama: TinyModel, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(tiny_llama.adapters["qv-r4"], root / "globex" / "g0")
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(("acme", "globex")))
    server = ServeProcess(tiny_llama, root, tmp_path / "server.log", "--tenants", str(tenants))
    try:
        with Client(server.wait_listening(), token=TOKENS["globex"], timeout=120) as globex:
            server.wait_ready(globex)
            assert _accepted(server.address, "acme") and not _accepted(server.address, "big")
            stream = globex.generate_stream(prompt_token_ids=[5, 6, 7], adapter_id="globex/g0", max_new_tokens=400, ignore_eos=True)
            received = len(next(stream).token_ids)

            tenants.write_text(tenants_toml(("acme", "big")))  # globex goes, big comes
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: _accepted(server.address, "big"), 30, "the new tenant to be accepted")
            assert not _accepted(server.address, "globex") and _accepted(server.address, "acme")
            chunks = list(stream)  # globex's stream, begun before, runs to the end
            assert chunks[-1].finish_reason == "length"
            assert received + sum(len(c.token_ids) for c in chunks) == 400

            tenants.write_text("[[tenant]]\nname = 'broken'\n")
            server.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "keeping the previous 2 tenants" in server.log(), 30, "the broken file to be reported")
            assert _accepted(server.address, "big") and _accepted(server.address, "acme")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
    finally:
        server.close()
    messages = [r["msg"] for r in server.records()]
    assert any(m.startswith("auth: bearer tokens required: 2 tenants (0 admin)") for m in messages), messages
    assert any(m.startswith("reload: 2 tenants from") and "(added: big; removed: globex)" in m for m in messages)
    for token in TOKENS.values():
        assert token not in server.log()


def test_a_broken_tenants_file_stops_the_server_before_the_model_loads(tiny_llama: TinyModel, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[[tenant]]\nname = "acme"\ntoken_sha256 = "nothex"\n')
    server = ServeProcess(tiny_llama, tmp_path, tmp_path / "server.log", "--tenants", str(tenants))
    try:
        code = server.proc.wait(120)
    finally:
        server.close()
    assert code == 2, server.log()
    # --log-format json: the start-up failure is one JSON error line (cli._report).
    (error,) = [r for r in server.records() if r["level"] == "error"]
    assert error["msg"].startswith(f"tenants file {tenants}: tenant 1 (acme): token_sha256 must be 64 hex digits")
    assert "Loading weights" not in server.log()
