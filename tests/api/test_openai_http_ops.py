"""The HTTP door under operations: 429 with Retry-After when the queue is full, 503 and a
stream that still finishes while draining, SIGTERM on a real `loraplex serve` process
draining an HTTP stream (uvicorn must not take the signal for itself), and clients that
leave before their answer (their requests are aborted, not run to the end)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import TinyModel, engine_config, logged_port, wait_idle
from loraplex.api.http_app import build_app
from loraplex.api.server import BackgroundServer
from loraplex.config import ANY_PORT, ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import Request, RequestStatus, SamplingParams
from loraplex_client import Client

PROMPT = "The sun rises over the"


@pytest.fixture
def small_server(tiny_llama: TinyModel) -> Iterator[BackgroundServer]:
    """One running sequence and one waiting: a third request finds the queue full."""
    config = engine_config(tiny_llama, num_blocks=64)
    config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, max_num_seqs=1, max_waiting=1))
    api = ApiConfig(port=0, metrics_port=0, http_port=ANY_PORT)
    background = BackgroundServer(ServerConfig(engine=config, api=api), Engine(config))
    background.start()
    yield background
    if not background.server.draining:
        background.stop()
    else:
        background.close_loop()
    background.server.engine.close()


def _client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="x", max_retries=0, timeout=120)


def test_a_full_queue_is_429_with_retry_after(small_server: BackgroundServer) -> None:
    engine = small_server.server.engine
    long = SamplingParams(max_new_tokens=400, ignore_eos=True)
    busy = [engine.add_request(None, long, prompt_token_ids=[5, 6, 7]) for _ in range(2)]
    try:
        with _client(small_server) as oai, pytest.raises(openai.RateLimitError) as e:
            oai.completions.create(model="model", prompt=PROMPT, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        assert "overloaded" in e.value.message
    finally:
        for rid in busy:
            engine.abort(rid)
    wait_idle(engine)


def test_draining_refuses_new_calls_with_503_and_lets_streams_finish(small_server: BackgroundServer) -> None:
    with _client(small_server) as oai:
        stream = oai.completions.create(model="model", prompt=PROMPT, max_tokens=40, stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        texts = [next(chunks).choices[0].text]
        drained = small_server.begin_drain(60.0)
        deadline = time.monotonic() + 10
        while not small_server.server.draining and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError) as e:
            oai.completions.create(model="model", prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"  # the stream in flight ran to its end
        texts += [c.choices[0].text for c in rest]
    drained.result(timeout=60)
    with pytest.raises(urllib.error.URLError):  # no longer listening
        urllib.request.urlopen(f"http://127.0.0.1:{small_server.server.http_port}/health", timeout=5)


def test_sigterm_drains_http_streams_of_a_real_server(tiny_llama: TinyModel, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(tiny_llama.adapters["qv-r4"], root / "qv-r4")
    log_path = tmp_path / "server.log"
    cmd = [
        sys.executable, "-m", "loraplex.cli", "serve", "--model", str(tiny_llama.path), "--adapter-root", str(root),
        "--port", "0", "--metrics-port", "0", "--http-port", "-1", "--num-kv-blocks", "128",
        "--served-model-name", "tiny",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        port, http_port = logged_port(log_path, "gRPC", proc), logged_port(log_path, "OpenAI", proc)
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 240
            while not client.health(timeout=1.0):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.2)
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x", max_retries=0, timeout=120)
        with oai:
            stream = oai.chat.completions.create(
                model="qv-r4", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=60, stream=True,
                temperature=0, extra_body={"ignore_eos": True},
            )
            chunks = iter(stream)
            next(chunks)
            proc.send_signal(signal.SIGTERM)
            rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length", log_path.read_text()[-3000:]
        assert proc.wait(timeout=60) == 0
        log_text = log_path.read_text()
        assert "draining" in log_text and "stopped" in log_text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- clients that leave ------------------------------------------------------------------------

LONG = 500  # tokens; far more than are made before the client leaves


def _completion_body(stream: bool) -> bytes:
    return json.dumps({"model": "model", "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": stream}).encode()


def _finished_after(engine: Any, leave: Any) -> list[Request]:
    """The requests that finished while `leave()` ran and the engine went idle."""
    wait_idle(engine)
    finished: list[Request] = []
    engine.on_finish = finished.append  # no metrics on this server: the hook is free
    try:
        leave()
        wait_idle(engine, timeout=30)
    finally:
        engine.on_finish = None
    return finished


def test_a_client_gone_before_a_whole_answer_aborts_its_request(small_server: BackgroundServer) -> None:
    engine = small_server.server.engine
    body = _completion_body(stream=False)

    def leave() -> None:
        with socket.create_connection(("127.0.0.1", small_server.server.http_port), timeout=30) as sock:
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            sock.sendall(head.encode() + body)
            deadline = time.monotonic() + 30
            while engine.stats().kv_blocks_used == 0:  # it is running: then hang up
                assert time.monotonic() < deadline
                time.sleep(0.005)

    finished = _finished_after(engine, leave)
    assert len(finished) == 1 and finished[0].status is RequestStatus.FINISHED_ABORTED
    assert len(finished[0].output_token_ids) < LONG
    assert engine.stats().kv_blocks_used == 0


def test_a_stream_left_before_its_first_byte_is_aborted(small_server: BackgroundServer) -> None:
    """The client leaves while the response's start is still being sent (its socket is full,
    say): the SSE body's generator never starts, so its own cleanup never runs, and the
    request must still be aborted."""
    assert small_server.server.http_front is not None
    app = build_app(small_server.server.http_front)
    body = _completion_body(stream=True)
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        if received == 2:  # watched while the first outputs are awaited: the client is still there
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}  # then gone before the response starts

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.start":  # the write waits for room, until cancelled
            await asyncio.Event().wait()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    engine = small_server.server.engine
    finished = _finished_after(engine, lambda: small_server.call(app(scope, receive, send)))
    assert received == 3 and [m["type"] for m in sent] == ["http.response.start"]  # no body was sent
    assert len(finished) == 1 and finished[0].status is RequestStatus.FINISHED_ABORTED
    assert len(finished[0].output_token_ids) < LONG
