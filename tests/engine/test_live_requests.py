"""The registry of live requests and its inbox, without a model: admission bounds, the order
of admissions and aborts, and the release of an adapter version by its last holder."""

from __future__ import annotations

import pytest

from loraplex.engine.errors import DuplicateRequestError, EngineOverloadedError
from loraplex.engine.live_requests import Abort, AbortHolders, Admit, LiveRequests
from loraplex.engine.request import ErrorKind, Request, SamplingParams


class Version:
    """Stands in for an adapter version: only its identity matters here."""


def _request(rid: str, adapter: object | None = None) -> Request:
    return Request(request_id=rid, prompt_token_ids=[1, 2], params=SamplingParams(), adapter=adapter)


def test_admission_bound_and_duplicate_ids() -> None:
    live = LiveRequests(limit=2)
    held: list[str] = []
    first = _request("a")
    live.admit(first, on_admit=lambda: held.append("a"))
    with pytest.raises(DuplicateRequestError, match="'a'"):
        live.admit(_request("a"), on_admit=lambda: held.append("dup"))
    live.admit(_request("b"))
    with pytest.raises(EngineOverloadedError, match="limit 2"):
        live.admit(_request("c"), on_admit=lambda: held.append("c"))
    assert held == ["a"]  # a refused request never holds its adapter
    assert len(live) == 2 and "a" in live and "c" not in live
    live.remove(first)
    assert len(live) == 1 and "a" not in live
    live.admit(_request("a"))  # the id is free again once its request finished
    assert "a" in live


def test_an_admission_is_drained_before_any_abort_of_it() -> None:
    live = LiveRequests(limit=8)
    a, b = _request("a"), _request("b")
    live.admit(a)
    assert live.abort("a", ErrorKind.CANCELLED, "bye")
    live.admit(b)
    assert not live.abort("nope", ErrorKind.CANCELLED, "bye")  # unknown ids are ignored
    events = list(live.drain())
    assert events == [Admit(a), Abort(a, ErrorKind.CANCELLED, "bye"), Admit(b)]
    assert list(live.drain()) == []
    live.remove(a)
    assert not live.abort("a", ErrorKind.CANCELLED, "late")  # finished: nothing to abort
    later = _request("a")
    live.admit(later)  # a new request reusing the id
    live.abort("a", ErrorKind.SHUTDOWN, "down")
    assert list(live.drain()) == [Admit(later), Abort(later, ErrorKind.SHUTDOWN, "down")]


def test_release_waits_for_the_last_holder_of_a_version() -> None:
    live = LiveRequests(limit=8)
    version, other = Version(), Version()
    r1, r2, r3 = _request("1", version), _request("2", version), _request("3", other)
    for r in (r1, r2, r3):
        live.admit(r)
    assert live.holders(version) == [r1, r2]
    released: list[str] = []
    live.when_released(version, lambda: released.append("v"))
    live.when_released(Version(), lambda: released.append("unheld"))  # nobody holds it: called at once
    assert released == ["unheld"]
    live.remove(r1)
    live.remove(r3)  # another version's holder finishing releases nothing
    assert released == ["unheld"]
    live.remove(r2)
    assert released == ["unheld", "v"]
    live.remove(r2)  # removing twice calls nothing again
    assert released == ["unheld", "v"] and len(live) == 0


def test_abort_holders_is_queued_in_order() -> None:
    live = LiveRequests(limit=8)
    version = Version()
    r = _request("1", version)
    live.admit(r)
    live.abort_holders(version, ErrorKind.UNLOADED, "gone")
    assert list(live.drain()) == [Admit(r), AbortHolders(version, ErrorKind.UNLOADED, "gone")]
