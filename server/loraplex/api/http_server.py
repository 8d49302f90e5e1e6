"""uvicorn in the server's own event loop: the HTTP door beside gRPC, one process, one engine loop.

    bind():   host:port exclusively (a taken port fails at once), before the engine loop starts
    start():  uvicorn.Server.serve on that socket, as a task in the server's event loop
    stop():   once the drain has let the streams finish: stop listening, close connections

uvicorn's Server takes SIGINT / SIGTERM for itself while it serves (and re-raises them when
it stops); `_NoSignals` leaves them to loraplex's drain (api/server.py), which decides when
HTTP stops. The socket is bound here, not by uvicorn: port 0 then reports the port the OS
chose, and SO_REUSEADDR without SO_REUSEPORT never lets a second server share the port.

With --tls-cert the HTTP door is HTTPS with the same certificate as gRPC, and with
--tls-client-ca it requires client certificates from that CA too (mTLS): bearer tokens
never cross the network in clear on one door while the other is encrypted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5.0  # idle keep-alive connections; streams have ended before stop()


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: str  # PEM certificate chain
    key: str  # PEM private key
    client_ca: str | None = None  # PEM CA bundle: client certificates required (mTLS)


class _NoSignals(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_exclusive(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port that no other server may share."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse TIME_WAIT ports
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, tls: TlsFiles | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        ssl_options: dict[str, Any] = {}
        if tls is not None:
            ssl_options = dict(ssl_certfile=tls.cert, ssl_keyfile=tls.key)
            if tls.client_ca is not None:
                ssl_options.update(ssl_ca_certs=tls.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S), access_log=False,
            **ssl_options,
        )
        self._server = _NoSignals(config)
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    def bind(self) -> int:
        """Take the port (OSError, EADDRINUSE, if it is taken); returns the bound port."""
        self._socket = bind_exclusive(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        return self.port

    async def start(self) -> None:
        """Serve on the bound socket."""
        assert self._socket is not None, "bind() first"
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http")
        while not self._server.started:
            if self._task.done():  # it failed to start: its exception says why
                await self._task
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:  # bound, perhaps, but never served
            if self._socket is not None:
                self._socket.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, GRACEFUL_SHUTDOWN_S + 5.0)
        except (TimeoutError, asyncio.CancelledError):
            log.warning("the HTTP server did not stop in time")
        finally:
            if self._socket is not None:
                self._socket.close()
