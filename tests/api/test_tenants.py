"""The tenants file, token hashing, identify / reload, and the per-tenant quotas (no server)."""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from loraplex.api.auth import ADMIN_TOKEN, ANONYMOUS, AccessError, Auth, Caller, Outcome, bearer_token
from loraplex.api.quotas import MAX_REQUESTS_RETRY_S, Quotas
from loraplex.api.tenants import (
    Role,
    Tenant,
    TenantFileError,
    load_tenants,
    new_token,
    parse_tenants,
    token_digest,
)


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TABLE = f"""
[[tenant]]
name = "acme"
token_sha256 = "{sha("acme-token")}"
role = "member"
namespaces = ["acme"]
read = ["public"]
max_adapters = 100
max_requests = 32
tokens_per_minute = 0
weight = 1.0

[[tenant]]
name = "boss"
token_sha256 = "{sha("boss-token").upper()}"
role = "admin"
weight = 3
"""


def test_the_documented_format_parses(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(TABLE)
    table = load_tenants(path)
    acme, boss = table.tenants
    assert acme == Tenant("acme", bytes.fromhex(sha("acme-token")), Role.MEMBER, ("acme",), ("public",), 100, 32, 0, 1.0)
    assert boss.role is Role.ADMIN and boss.namespaces == () and boss.weight == 3.0
    assert (boss.max_adapters, boss.max_requests, boss.tokens_per_minute) == (100, 32, 0)  # the defaults
    assert table.find("acme-token") is acme and table.find("boss-token") is boss
    assert table.find("acme-token ") is None and table.find("") is None
    assert "token_sha256" not in repr(acme)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('name = "a"\ntoken_sha256 = "{d}"\nnmae = 1', "unknown key 'nmae'"),
        ('name = "a"\ntoken_sha256 = "abc"', "64 hex digits"),
        ('name = "a"\ntoken_sha256 = "{d}"\nrole = "root"', "role must be one of member, admin"),
        ('name = "a/b"\ntoken_sha256 = "{d}"', "name must be"),
        ('name = "(anonymous)"\ntoken_sha256 = "{d}"', "name must be"),
        ('name = "a"\ntoken_sha256 = "{d}"\nnamespaces = ["acme/.."]', "not a namespace"),
        ('name = "a"\ntoken_sha256 = "{d}"\nread = "public"', "read must be an array of strings"),
        ('name = "a"\ntoken_sha256 = "{d}"\nmax_requests = -1', "max_requests must be an integer >= 0"),
        ('name = "a"\ntoken_sha256 = "{d}"\nmax_adapters = true', "max_adapters must be an integer"),
        ('name = "a"\ntoken_sha256 = "{d}"\ntokens_per_minute = 1.5', "tokens_per_minute must be an integer"),
        ('name = "a"\ntoken_sha256 = "{d}"\nweight = 0', "weight must be a number > 0"),
    ],
)
def test_a_bad_entry_names_the_tenant_and_the_key(entry: str, message: str) -> None:
    text = "[[tenant]]\n" + entry.format(d=sha("t"))
    with pytest.raises(TenantFileError, match="tenant 1") as err:
        parse_tenants(tomllib.loads(text), "t.toml")
    assert message in str(err.value)


def test_the_readmes_tenants_file_parses_and_shows_the_defaults() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"^```toml\n(.*?)^```", readme, flags=re.S | re.M) if "[[tenant]]" in b]
    acme, ops = parse_tenants(tomllib.loads(block)).tenants
    defaults = Tenant("acme", acme.token_sha256, namespaces=("acme",), read=("public",))
    assert acme == defaults and (ops.name, ops.role) == ("ops", Role.ADMIN)


def test_names_and_tokens_are_unique(tmp_path: Path) -> None:
    twice = f'[[tenant]]\nname = "a"\ntoken_sha256 = "{sha("1")}"\n[[tenant]]\nname = "a"\ntoken_sha256 = "{sha("2")}"'
    with pytest.raises(TenantFileError, match="'a' appears twice"):
        parse_tenants(tomllib.loads(twice))
    same = f'[[tenant]]\nname = "a"\ntoken_sha256 = "{sha("1")}"\n[[tenant]]\nname = "b"\ntoken_sha256 = "{sha("1")}"'
    with pytest.raises(TenantFileError, match="'a' and 'b' have the same token_sha256"):
        parse_tenants(tomllib.loads(same))
    with pytest.raises(TenantFileError, match="unknown key 'tenants'"):
        parse_tenants({"tenants": []})
    (tmp_path / "broken.toml").write_text("[[tenant]\n")
    with pytest.raises(TenantFileError, match="broken.toml"):
        load_tenants(tmp_path / "broken.toml")


def test_loraplex_token_prints_a_token_and_its_line() -> None:
    run = subprocess.run([sys.executable, "-m", "loraplex.cli", "token"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    token, line = run.stdout.strip().splitlines()
    assert len(token) >= 43
    assert tomllib.loads(line) == {"token_sha256": sha(token)}
    other, other_line = new_token()
    assert other != token and tomllib.loads(other_line)["token_sha256"] == token_digest(other).hex()


def test_identify(tmp_path: Path) -> None:
    assert Auth().identify(None) is ANONYMOUS and Auth().open
    path = tmp_path / "tenants.toml"
    path.write_text(TABLE)
    auth = Auth.from_options(str(path), admin_tokens=("legacy",))
    acme = auth.identify("acme-token")
    assert acme is not None and (acme.name, acme.admin, acme.owned) == ("acme", False, ("acme",))
    boss = auth.identify("boss-token")
    assert boss is not None and (boss.name, boss.admin) == ("boss", True)
    assert auth.identify("legacy") == Caller(ADMIN_TOKEN, admin=True)
    assert auth.identify("nope") is None and auth.identify("") is None and auth.identify(None) is None
    assert auth.label("acme") == "acme" and auth.label(ADMIN_TOKEN) == "(anonymous)"


def test_bearer_token_reads_one_authorization_value_for_every_transport() -> None:
    assert bearer_token("Bearer acme-token") == "acme-token"
    assert bearer_token("Bearer  acme-token ") == "acme-token"
    assert bearer_token("bearer acme-token") == "acme-token"  # the scheme is case-insensitive (RFC 7235)
    for value in (None, "", "Bearer ", "Bearer", "Basic YWNtZTpw", "acme-token", "Beareracme-token"):
        assert bearer_token(value) is None, value


def test_reload_swaps_the_table_and_a_broken_file_keeps_the_old_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(TABLE)
    auth = Auth.from_options(str(path), admin_tokens=())
    before = auth.table
    path.write_text(TABLE.replace('"acme"', '"initech"', 1) + "\n[[tenant]]\nbroken")
    with caplog.at_level(logging.INFO):
        assert not auth.reload()
    assert auth.table is before and auth.identify("acme-token") is not None
    assert "keeping the previous 2 tenants" in caplog.text and str(path) in caplog.text

    path.write_text(TABLE.replace('name = "acme"', 'name = "initech"'))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert auth.reload()
    caller = auth.identify("acme-token")
    assert caller is not None and caller.name == "initech"
    assert "added: initech; removed: acme" in caplog.text
    assert "acme-token" not in caplog.text and sha("acme-token") not in caplog.text


# -- quotas ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _caller(**limits: int) -> Caller:
    return Caller("t", admin=False, tenant=Tenant("t", token_digest("t"), namespaces=("t",), **limits))  # type: ignore[arg-type]


def test_max_requests_counts_requests_in_flight() -> None:
    quotas = Quotas()
    caller, other = _caller(max_requests=2), Caller("u", admin=False, tenant=Tenant("u", token_digest("u")))
    quotas.admit(caller)
    quotas.admit(caller)
    with pytest.raises(AccessError) as err:
        quotas.admit(caller)
    assert (err.value.outcome, err.value.limit, err.value.retry_after_s) == (
        Outcome.RESOURCE_EXHAUSTED, "max_requests", MAX_REQUESTS_RETRY_S
    )
    assert "max_requests (2)" in err.value.message
    quotas.admit(other)  # another tenant is not affected
    quotas.release(caller)
    quotas.admit(caller)
    assert quotas.in_flight("t") == 2 and quotas.in_flight("u") == 1


def test_tokens_per_minute_is_a_sliding_window_with_the_exact_retry_delay() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    caller = _caller(tokens_per_minute=100, max_requests=0)
    quotas.admit(caller)
    quotas.charge("t", 60)  # second 1000
    clock.now = 1020.5
    quotas.admit(caller)
    quotas.charge("t", 50)  # second 1020: 110 in the window
    with pytest.raises(AccessError) as err:
        quotas.admit(caller)
    assert err.value.limit == "tokens_per_minute" and "110 tokens" in err.value.message
    assert err.value.retry_after_s == pytest.approx(1060.0 - 1020.5)  # when the first 60 slide out
    clock.now = 1059.9
    with pytest.raises(AccessError):
        quotas.admit(caller)
    clock.now = 1060.0
    quotas.admit(caller)  # 50 left in the window
    quotas.charge("t", 60)
    with pytest.raises(AccessError) as err:
        quotas.admit(caller)
    assert err.value.retry_after_s == pytest.approx(20.0)  # second 1020's 50 slide out at 1080
