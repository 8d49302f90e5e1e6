"""loraplex.ports: ports chosen up front are distinct and never an avoided one (Ray's agents
got the same port twice when each was chosen by its own bind-and-close)."""

from __future__ import annotations

import socket
from typing import ClassVar

import pytest

from loraplex.ports import free_port, free_ports


def test_ports_of_one_call_are_distinct_and_bindable() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


class _ScriptedSocket:
    """A socket whose bind(port 0) gets the next port of a script, as a kernel might hand them out."""

    script: ClassVar[list[int]] = []

    def __init__(self) -> None:
        self.port = _ScriptedSocket.script.pop(0)

    def bind(self, address: tuple[str, int]) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        pass


def test_avoided_and_repeated_ports_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    _ScriptedSocket.script = [52365, 4001, 4001, 52365, 4002, 4003]
    monkeypatch.setattr(socket, "socket", _ScriptedSocket)
    assert free_ports(2, avoid=[52365]) == [4001, 4002]
    assert free_port() == 4003
