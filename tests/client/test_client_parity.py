"""Client and AsyncClient are one API twice: the same methods with the same parameters,
defaults, annotations and docstrings; only the blocking / awaitable form differs. This test
fails as soon as one of them changes without the other."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from loraplex_client import AsyncClient, Client

# Where the two differ on purpose: the context-manager protocol, and the stream type returned.
SYNC_ONLY = {"__enter__", "__exit__"}
ASYNC_ONLY = {"__aenter__", "__aexit__"}
RETURNS = {"GenerateStream": "AsyncGenerateStream", "Client": "AsyncClient"}
NOT_AWAITABLE = {"generate_stream"}  # returns its (async) stream at once


def _methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {
        name: member
        for name, member in vars(cls).items()
        if callable(member) and (not name.startswith("_") or name in SYNC_ONLY | ASYNC_ONLY | {"__init__"})
    }


def test_the_same_methods() -> None:
    sync, aio = _methods(Client), _methods(AsyncClient)
    assert set(sync) - SYNC_ONLY == set(aio) - ASYNC_ONLY
    assert set(sync) >= SYNC_ONLY and set(aio) >= ASYNC_ONLY


def test_the_same_signatures_and_docstrings() -> None:
    sync, aio = _methods(Client), _methods(AsyncClient)
    for name in sorted(set(sync) - SYNC_ONLY):
        s, a = inspect.signature(sync[name]), inspect.signature(aio[name])
        assert list(s.parameters.values()) == list(a.parameters.values()), name
        expected = RETURNS.get(str(s.return_annotation), s.return_annotation)
        assert a.return_annotation == expected, name
        assert inspect.getdoc(sync[name]) == inspect.getdoc(aio[name]), name
        if name != "__init__":
            assert inspect.iscoroutinefunction(aio[name]) == (name not in NOT_AWAITABLE), name
            assert not inspect.iscoroutinefunction(sync[name]), name


def test_every_public_method_is_documented_once_for_both() -> None:
    missing = [name for name, m in _methods(Client).items() if not name.startswith("_") and not inspect.getdoc(m)]
    assert missing == [], f"document these in Client and AsyncClient alike: {missing}"
