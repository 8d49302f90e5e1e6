"""Ports are bound exclusively: a second server on a taken gRPC, metrics or HTTP port fails at once
with StartupError ("port N is already in use"), releases what it had bound and never
touches the engine; the first server keeps serving every call."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest

from conftest import TinyModel, engine_config, free_port
from loraplex import startup
from loraplex.api.server import BackgroundServer
from loraplex.config import ANY_PORT, ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex_client import Client


@pytest.fixture(scope="module")
def engine(tiny_llama: TinyModel) -> Iterator[Engine]:
    engine = Engine(engine_config(tiny_llama))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def first(engine: Engine, tiny_llama: TinyModel) -> Iterator[BackgroundServer]:
    server = BackgroundServer(ServerConfig(engine.config, ApiConfig(port=0, metrics_port=0, http_port=ANY_PORT)), engine)
    server.start()
    yield server
    server.stop()


def _start_second(engine: Engine, api: ApiConfig) -> tuple[BackgroundServer, startup.StartupError]:
    """A second server whose start must fail, and its error."""
    second = BackgroundServer(ServerConfig(engine.config, api), engine)
    with pytest.raises(startup.StartupError) as raised:
        second.start(warm_up=False)
    second.close_loop()
    return second, raised.value


def test_a_second_grpc_server_on_the_port_is_refused(engine: Engine, first: BackgroundServer) -> None:
    port = first.server.port
    second, error = _start_second(engine, ApiConfig(port=port, metrics_port=0, http_port=0))
    assert error.cause == f"port {port} is already in use (gRPC on 127.0.0.1:{port})"
    assert error.fix == "stop the process that holds it, or choose another port with --port"
    assert second.server.engine_loop is not None and not second.server.engine_loop.started
    with Client(f"127.0.0.1:{port}", timeout=60) as client:  # every call reaches the first server
        results = [client.generate(prompt_token_ids=[5, 6, 7], adapter_id="qv-r4", max_new_tokens=3) for _ in range(6)]
    assert len({tuple(r.token_ids) for r in results}) == 1


def test_a_taken_metrics_port_is_refused_and_the_grpc_port_released(engine: Engine) -> None:
    grpc_port = free_port()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        metrics_port = other.getsockname()[1]
        _, error = _start_second(engine, ApiConfig(port=grpc_port, metrics_port=metrics_port, http_port=0))
    assert error.cause == f"port {metrics_port} is already in use (metrics on 127.0.0.1:{metrics_port})"
    assert error.fix.endswith("with --metrics-port")
    startup.check_port_free("127.0.0.1", grpc_port, "gRPC", "--port")  # released again


def test_a_second_http_server_on_the_port_is_refused_and_its_other_ports_released(
    engine: Engine, first: BackgroundServer
) -> None:
    http_port, grpc_port = first.server.http_port, free_port()
    second, error = _start_second(engine, ApiConfig(port=grpc_port, metrics_port=0, http_port=http_port))
    assert error.cause == f"port {http_port} is already in use (HTTP on 127.0.0.1:{http_port})"
    assert error.fix == "stop the process that holds it, or choose another port with --http-port"
    assert second.server.engine_loop is not None and not second.server.engine_loop.started
    startup.check_port_free("127.0.0.1", grpc_port, "gRPC", "--port")  # released again
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=60) as response:
        assert response.status == 200  # the first server's HTTP API answers on


def test_check_port_free() -> None:
    startup.check_port_free("127.0.0.1", 0, "gRPC", "--port")  # any free port: nothing to check
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(startup.StartupError, match=f"^port {port} is already in use \\(HTTP on 127.0.0.1:{port}\\); .* --http-port$"):
            startup.check_port_free("127.0.0.1", port, "HTTP", "--http-port")
        with pytest.raises(startup.StartupError, match=f"port {port} is already in use"), startup.binding("HTTP", "127.0.0.1", port, "--http-port"):
            socket.create_server(("127.0.0.1", port))
    with pytest.raises(startup.StartupError, match="not an address of this machine|cannot listen on '192.0.2.1'"):
        startup.check_port_free("192.0.2.1", free_port(), "gRPC", "--port")
