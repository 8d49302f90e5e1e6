"""Readiness and liveness through grpc.health.v1, and the SIGTERM / SIGINT drain of a real
`python -m loraplex.cli serve` process."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import TinyModel, engine_config
from loraplex import cli
from loraplex.api import server as server_module
from loraplex.api.server import SERVICE_NAME, BackgroundServer
from loraplex.config import ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex_client import (
    AuthenticationError,
    Client,
    DeadlineExceededError,
    OverloadedError,
    ServerUnavailableError,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SECRET = "s3cret-token-for-the-drain-test"


def status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def healthcheck(address: str, service: str | None = None) -> int:
    """`loraplex healthcheck` in this process (the subprocess form is in tests/test_deploy.py)."""
    argv = ["healthcheck", "--address", address] + ([] if service is None else ["--service", service])
    args = cli.build_parser().parse_args(argv)
    return int(args.func(args))


def _background(tiny: TinyModel, api: ApiConfig, **scheduler: Any) -> tuple[BackgroundServer, Engine]:
    config = engine_config(tiny, roots=(str(tiny.adapter_root),), max_loras=2)
    if scheduler:
        config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, **scheduler))
    engine = Engine(config)
    return BackgroundServer(ServerConfig(engine=config, api=api), engine), engine


@pytest.fixture
def fast_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "WATCHDOG_PERIOD_S", 0.05)


def test_readiness_waits_for_warm_up_liveness_does_not(tiny_llama: TinyModel) -> None:
    background, engine = _background(tiny_llama, ApiConfig(port=0, metrics_port=0, http_port=0))
    address = background.start(warm_up=False)
    try:
        assert status(address, "") == SERVING
        assert status(address, SERVICE_NAME) == NOT_SERVING
        assert healthcheck(address) == 1 and healthcheck(address, service="") == 0
        with pytest.raises(grpc.RpcError) as err:
            status(address, "no.such.Service")
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert healthcheck(address, service="no.such.Service") == 1
        background.call(background.server.warm_up())
        assert status(address, SERVICE_NAME) == SERVING and status(address, "") == SERVING
        assert healthcheck(address) == 0
    finally:
        background.stop()
        engine.close()
    assert healthcheck(address) == 1  # nobody listening: UNAVAILABLE, exit 1


def test_a_stalled_step_turns_readiness_off_and_on_again(tiny_llama: TinyModel, fast_watchdog: None) -> None:
    background, engine = _background(tiny_llama, ApiConfig(port=0, metrics_port=0, http_port=0, heartbeat_timeout_s=0.3))
    address = background.start()
    runner = engine.runner
    original = runner.run
    release = threading.Event()
    blocked = threading.Event()

    def stuck_run(batch: Any) -> Any:
        if any(r.prompt_token_ids[0] == 499 for r in batch.requests):
            blocked.set()
            release.wait(30)
        return original(batch)

    runner.run = stuck_run  # type: ignore[method-assign]
    try:
        with Client(address, timeout=60) as client:
            result: list[Any] = []
            caller = threading.Thread(
                target=lambda: result.append(client.generate(prompt_token_ids=[499, 6, 7], max_new_tokens=3, ignore_eos=True))
            )
            caller.start()
            assert blocked.wait(10)
            wait_for(lambda: status(address, SERVICE_NAME) == NOT_SERVING, 5, "readiness NOT_SERVING while stuck")
            assert status(address, "") == SERVING  # liveness stays up: a restart is not the answer to a slow step
            assert healthcheck(address) == 1
            release.set()
            wait_for(lambda: status(address, SERVICE_NAME) == SERVING, 5, "readiness SERVING again")
            caller.join(10)
            assert result and result[0].finish_reason == "length"
    finally:
        release.set()
        runner.run = original  # type: ignore[method-assign]
        background.stop()
        engine.close()


@pytest.mark.engine_may_hold  # its engine loop is dead: the request it took stays live
def test_a_dead_engine_loop_turns_readiness_off(tiny_llama: TinyModel, fast_watchdog: None) -> None:
    background, engine = _background(tiny_llama, ApiConfig(port=0, metrics_port=0, http_port=0))
    address = background.start()
    loop = background.server.engine_loop
    assert loop is not None

    def crash(outputs: Any) -> None:
        raise RuntimeError("injected engine loop crash")

    loop.on_step = crash
    try:
        with Client(address, timeout=10) as client, pytest.raises(DeadlineExceededError):
            client.generate(prompt_token_ids=[5, 6], max_new_tokens=2, timeout=2)  # no step will ever answer
        wait_for(lambda: not loop.alive, 5, "the engine loop to stop")
        wait_for(lambda: status(address, SERVICE_NAME) == NOT_SERVING, 5, "readiness NOT_SERVING")
        assert status(address, "") == SERVING
    finally:
        background.stop()
        engine.close()


# -- a real process, a real signal ---------------------------------------------------------


class ServeProcess:
    """`loraplex serve` on a port the OS picks when it binds (--port 0): its address is read
    from its own "listening on" line, so no port is chosen here and bound later by another."""

    def __init__(self, tiny: TinyModel, adapter_root: Path, log_path: Path, *extra: str) -> None:
        self.port = 0
        self.address = ""
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny.path), "--adapter-root", str(adapter_root),
            "--port", "0", "--metrics-port", "0", "--http-port", "0", "--max-loras", "2", "--log-format", "json", *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORAPLEX_AUTH_TOKEN": SECRET, "LORAPLEX_NUM_KV_BLOCKS": "256"}
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_listening(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.port:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())
            if match:
                self.port = int(match[1])
                self.address = f"127.0.0.1:{self.port}"
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not listen; its log:\n{self.log()[-4000:]}")
            else:
                time.sleep(0.1)
        return self.address

    def wait_ready(self, client: Client, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not client.health(timeout=1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not become ready; its log:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """Every line of the run (stdout and stderr): each one must be JSON, progress bars and
        third-party start-up noise included."""
        return [json.loads(line) for line in self.log().splitlines()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def serve_process(tiny_llama: TinyModel, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []
    root = tmp_path / "adapters"
    shutil.copytree(tiny_llama.adapters["qv-r4"], root / "qv-r4")

    def start(*extra: str) -> ServeProcess:
        process = ServeProcess(tiny_llama, root, tmp_path / f"server-{len(started)}.log", *extra)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def _streams(client: Client, n: int, max_new_tokens: int) -> list[Any]:
    streams = [
        client.generate_stream(
            prompt_token_ids=[5 + i, 6, 7], adapter_id="qv-r4" if i % 2 else None, max_new_tokens=max_new_tokens, ignore_eos=True
        )
        for i in range(n)
    ]
    for s in streams:
        next(s)  # each one is running
    return streams


def test_sigterm_lets_three_live_streams_finish_and_exits_0(serve_process: Callable[..., ServeProcess]) -> None:
    server = serve_process()
    with Client(server.wait_listening(), token=SECRET, timeout=120) as client:
        server.wait_ready(client)
        max_new_tokens = 400
        streams = _streams(client, 3, max_new_tokens)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: status(server.address, SERVICE_NAME) == NOT_SERVING, 10, "readiness NOT_SERVING on SIGTERM")
        with pytest.raises(ServerUnavailableError, match="shutting down"):
            client.generate(prompt_token_ids=[5, 6], max_new_tokens=2)
        for s in streams:
            chunks = list(s)
            assert chunks[-1].finish_reason == "length"
            assert 1 + sum(len(c.token_ids) for c in chunks) == max_new_tokens  # the first chunk was read above
    assert server.proc.wait(60) == 0
    records = server.records()
    messages = [r["msg"] for r in records]
    assert any(m.startswith("draining: 3 streams in flight") for m in messages), messages
    assert not any("drain timeout" in m for m in messages)
    # The configuration is printed once, with its sources, and the token masked.
    config_lines = [m for m in messages if m.startswith("configuration")]
    assert len(config_lines) == 1
    assert "auth_token = ['****']  ($LORAPLEX_AUTH_TOKEN)" in config_lines[0]
    assert "num_kv_blocks = 256  ($LORAPLEX_NUM_KV_BLOCKS)" in config_lines[0]
    assert "\n  port = 0  (--port)" in config_lines[0]
    assert SECRET not in server.log()


def test_a_too_short_drain_ends_streams_unavailable_and_exits_0(serve_process: Callable[..., ServeProcess]) -> None:
    server = serve_process("--drain-timeout", "0.2")
    with Client(server.wait_listening(), token=SECRET, timeout=120) as client:
        server.wait_ready(client)
        streams = _streams(client, 3, 480)
        server.proc.send_signal(signal.SIGINT)
        for s in streams:
            received = 0
            with pytest.raises(ServerUnavailableError, match="shutting down") as err:
                for chunk in s:
                    received += len(chunk.token_ids)
            assert err.value.code is grpc.StatusCode.UNAVAILABLE
            assert received < 479
    assert server.proc.wait(60) == 0
    assert any(r["msg"].startswith("drain timeout: ending 3 streams") for r in server.records())


def test_overload_auth_and_shutdown(tiny_llama: TinyModel) -> None:
    server, engine = _background(
        tiny_llama, ApiConfig(port=0, metrics_port=0, http_port=0, auth_tokens=("s3cret",)), max_num_seqs=1, max_waiting=1
    )
    address = server.start()
    engine_loop = server.server.engine_loop
    assert engine_loop is not None
    # The streams must still be in flight when the drain timeout fires, however fast the machine:
    # once both run, every step waits at a gate that only the drain's abort opens.
    gate, run, abort_all = threading.Event(), engine.runner.run, engine_loop.abort_all

    def gated_run(batch: Any) -> Any:
        if not gate.is_set() and engine.num_unfinished >= 2:
            gate.wait(60)
        return run(batch)

    def opening_abort_all(*args: Any) -> None:
        abort_all(*args)
        gate.set()

    engine.runner.run = gated_run  # type: ignore[method-assign]
    engine_loop.abort_all = opening_abort_all  # type: ignore[method-assign]
    try:
        with pytest.raises(AuthenticationError):
            Client(address).generate("hi")
        with pytest.raises(AuthenticationError):
            Client(address, token="wrong").generate("hi")
        with Client(address, token="s3cret", timeout=60) as client:
            assert client.health()
            streams = [
                client.generate_stream(prompt_token_ids=[5, 6], max_new_tokens=400, ignore_eos=True) for _ in range(2)
            ]
            deadline = time.monotonic() + 10
            while engine.num_unfinished < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(OverloadedError, match="overloaded"):
                client.generate(prompt_token_ids=[5, 6], max_new_tokens=2)
            # Shutting down: new calls are UNAVAILABLE; the in-flight streams end UNAVAILABLE at the drain timeout.
            drain = server.begin_drain(1.0)
            service = server.server.service
            assert service is not None
            while not service.draining and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(ServerUnavailableError):
                client.generate(prompt_token_ids=[5, 6], max_new_tokens=2)
            for s in streams:
                with pytest.raises(ServerUnavailableError, match="shutting down"):
                    list(s)
            drain.result(10)
            assert gate.is_set()  # the streams were still running when the drain timeout fired
    finally:
        gate.set()
        server.close_loop()
    assert server.server.engine.blocks.num_free_blocks == server.server.engine.blocks.num_blocks
