"""Property tests for the namespace rules over ids and paths (Hypothesis), against an
independent reference: ids compared part by part, paths resolved by os.path.realpath."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loraplex.api.auth import (
    AccessError,
    Caller,
    HiddenAdapterError,
    authorize_change,
    authorize_use,
    check_load_path,
)
from loraplex.api.tenants import Role, Tenant, token_digest
from loraplex.lora.adapter_version import not_registered
from loraplex.rules import adapter_id_problem

# The namespace rules are the tenants' isolation: more examples than the suite's small default
# (conftest's "ci" profile), and at least as many as a longer profile asks for.
ACCESS_EXAMPLES = settings(max_examples=max(100, settings().max_examples))

ACME = Tenant("acme", token_digest("a"), Role.MEMBER, namespaces=("acme", "shared/acme"), read=("public",))
MEMBER = Caller("acme", admin=False, tenant=ACME)
ADMIN = Caller("boss", admin=True, tenant=Tenant("boss", token_digest("b"), Role.ADMIN))

# Parts that look like a namespace without being one: case, Cyrillic 'а', zero-width space,
# fullwidth dots, one-dot leader, percent-encoding, suffixes.
LOOKALIKES = ["acme", "ACME", "\u0430cme", "acme\u200b", "acme2", "acme-evil", "acme.", "shared", "public", "publicx",
              "globex", "..", ".", "", "%2e%2e", "\uff0e\uff0e", "\u2025", "x", "v1", ".uploads"]
id_parts = st.one_of(st.sampled_from(LOOKALIKES), st.text(alphabet="abcme.-_/%\u0430", min_size=0, max_size=6))
ids = st.lists(id_parts, min_size=1, max_size=4).map("/".join)


def _reference_in(adapter_id: str, namespaces: tuple[str, ...]) -> bool:
    """Part by part: the id's leading parts are the namespace's, and at least one part follows."""
    parts = adapter_id.split("/")
    return any(parts[: len(ns.split("/"))] == ns.split("/") and len(parts) > len(ns.split("/")) for ns in namespaces)


@ACCESS_EXAMPLES
@given(ids)
@example("acme/x")
@example("acme")
@example("acme2/x")
@example("shared/acme/x")
@example("shared/acmex/y")
@example("public/p")
def test_use_and_change_follow_the_namespaces_part_by_part(adapter_id: str) -> None:
    if adapter_id_problem(adapter_id) is not None:
        return  # the API refuses it (INVALID_ARGUMENT) before any namespace is looked at
    may_use = _reference_in(adapter_id, ACME.namespaces + ACME.read)
    may_change = _reference_in(adapter_id, ACME.namespaces)
    if may_use:
        authorize_use(MEMBER, adapter_id)
    else:
        with pytest.raises(HiddenAdapterError) as hidden:
            authorize_use(MEMBER, adapter_id)
        assert str(hidden.value) == str(not_registered(adapter_id))  # byte-identical to an unknown id
    if may_change:
        authorize_change(MEMBER, adapter_id)
    else:
        with pytest.raises(AccessError):
            authorize_change(MEMBER, adapter_id)
    authorize_use(ADMIN, adapter_id)
    authorize_change(ADMIN, adapter_id)


# -- paths ----------------------------------------------------------------------------------


def _adapter_dir(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 8)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/acme/{a0, in -> a0, out -> globex/g0, up -> .., mixed (config file -> globex's)},
    root/globex/g0, root/public/p0, root/shared/acme/s0, and a directory outside the root."""
    base = tmp_path_factory.mktemp("paths")
    outside = base / "outside"
    _adapter_dir(outside / "o0")
    root = base / "root"
    for d in ("acme/a0", "globex/g0", "public/p0", "shared/acme/s0", "acme/.uploads/a1/abc"):
        _adapter_dir(root / d)
    (root / "acme" / "in").symlink_to(root / "acme" / "a0")
    (root / "acme" / "out").symlink_to(root / "globex" / "g0")
    (root / "acme" / "up").symlink_to(root)
    (root / "acme" / "away").symlink_to(outside / "o0")
    mixed = root / "acme" / "mixed"
    mixed.mkdir()
    (mixed / "adapter_config.json").symlink_to(root / "globex" / "g0" / "adapter_config.json")
    (mixed / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    return root


PATH_PARTS = ["acme", "globex", "public", "shared", "a0", "g0", "p0", "s0", "in", "out", "up", "away", "mixed",
              ".uploads", "a1", "abc", "..", ".", "", "%2e%2e", "\uff0e\uff0e", "\u2025", "\u0430cme", "ACME", "outside", "o0"]
paths = st.tuples(
    st.sampled_from(["", "/", "./", "//"]),
    st.lists(st.one_of(st.sampled_from(PATH_PARTS), st.text(max_size=4)), min_size=1, max_size=6),
).map(lambda t: t[0] + "/".join(t[1]))


def _inside(path: str, home: str) -> bool:
    return os.path.commonpath([path, home]) == home and path != home


def _store_reads(root: Path, path: str) -> list[str]:
    """What the adapter store would read for this path: the directory and its two files, resolved."""
    where = os.path.join(str(root), path)
    return [os.path.realpath(os.path.join(where, f)) for f in ("", "adapter_config.json", "adapter_model.safetensors")]


@ACCESS_EXAMPLES
@given(paths)
@example("acme/a0")
@example("acme/in")
@example("acme/out")
@example("acme/up/globex/g0")
@example("acme/../globex/g0")
@example("acme/in/../../globex/g0")
@example("acme/out/../p0")
@example("acme/away")
@example("acme/mixed")
@example("/acme/a0")
@example("acme/%2e%2e/globex/g0")
@example("acme/\uff0e\uff0e/globex/g0")
@example("acme/a0\x00")
@example("shared/acme/s0")
def test_a_member_registers_only_files_under_its_own_namespaces(root: Path, path: str) -> None:
    if "\x00" in path:
        return  # the API refuses it as INVALID_ARGUMENT (tested over the server)
    homes = [os.path.realpath(root / ns) for ns in ACME.namespaces]
    reads = _store_reads(root, path)
    exists = os.path.isdir(reads[0]) and not os.path.isabs(path)
    safe = all(any(_inside(r, h) for h in homes) for r in reads if os.path.lexists(r))
    try:
        check_load_path(MEMBER, (root,), path)
    except AccessError:
        allowed = False
    else:
        allowed = True
    if allowed and exists:
        assert safe, f"{path!r} was allowed but reads {reads}"
    if exists and safe and not os.path.isabs(path) and _reference_in(os.path.normpath(path), ACME.namespaces):
        assert allowed, f"{path!r} lies under acme's namespaces but was refused"
    check_load_path(ADMIN, (root,), path)  # admins are not limited by namespaces


def test_path_examples_come_out_as_expected(root: Path) -> None:
    for path in ("acme/a0", "acme/in", "shared/acme/s0", "acme/.uploads/a1/abc"):
        check_load_path(MEMBER, (root,), path)
    for path in ("acme/out", "acme/up/globex/g0", "acme/../globex/g0", "acme/away", "acme/mixed", "/acme/a0",
                 str(root / "acme" / "a0"), "globex/g0", "public/p0", "acme", "acme/in/../../globex/g0"):
        with pytest.raises(AccessError):
            check_load_path(MEMBER, (root,), path)
