"""Free TCP ports chosen up front, for a port that must be named before it is bound (Ray's
agents, a Serve proxy, a demo server's two ports). Each socket is held open until all are
chosen, so one call never hands out the same port twice; a port chosen here may still be
taken by another process before its user binds it, so prefer port 0 wherever the binder can
report the port it got."""

from __future__ import annotations

import socket
from collections.abc import Iterable


def free_ports(count: int, host: str = "127.0.0.1", avoid: Iterable[int] = ()) -> list[int]:
    """count ports free now on host, distinct from each other and from avoid."""
    excluded = set(avoid)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            held.append(s)
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            if port not in excluded and port not in ports:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One port free now on host."""
    return free_ports(1, host)[0]
