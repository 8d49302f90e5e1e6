"""A request's log lines name it: the servicer's INTERNAL-error line and the engine's own."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import TinyModel, engine_config
from loraplex.api.server import BackgroundServer
from loraplex.config import ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.logs import JsonFormatter, RequestIdFilter
from loraplex_client import Client, InternalServerError

POISON = 499


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("loraplex")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_internal_errors_and_request_lines_carry_the_request_id(tiny_llama: TinyModel, json_log: io.StringIO) -> None:
    config = engine_config(tiny_llama, max_loras=2)
    engine = Engine(config)
    background = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=0, http_port=0)), engine)
    address = background.start()
    original = engine.runner.run

    def failing_run(batch: Any) -> Any:
        if any(r.prompt_token_ids[0] == POISON for r in batch.requests):
            raise RuntimeError("injected device failure")
        return original(batch)

    engine.runner.run = failing_run  # type: ignore[method-assign]
    try:
        with Client(address, timeout=60) as client:
            healthy_done = threading.Event()

            def healthy() -> None:
                client.generate(prompt_token_ids=[5, 6], max_new_tokens=20, ignore_eos=True, request_id="healthy-1")
                healthy_done.set()

            thread = threading.Thread(target=healthy)
            thread.start()
            with pytest.raises(InternalServerError, match="poisoned-1"):
                client.generate(prompt_token_ids=[POISON, 6], max_new_tokens=3, request_id="poisoned-1")
            # No request id from the client: the one the server made up is in the status and the log.
            with pytest.raises(InternalServerError) as err:
                client.generate(prompt_token_ids=[POISON, 7], max_new_tokens=3)
            thread.join(30)
            assert healthy_done.is_set()
    finally:
        engine.runner.run = original  # type: ignore[method-assign]
        background.stop()
        engine.close()

    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    service = [r for r in records if r["logger"] == "loraplex.api.service"]
    assert len(service) == 2
    assert all(r["msg"] == "Generate failed" and "injected device failure" in r["exc"] for r in service)
    assert service[0]["request_id"] == "poisoned-1"
    generated = service[1]["request_id"]
    assert generated.startswith("req-") and generated in err.value.details
    engine_lines = [r for r in records if r["logger"] == "loraplex.engine.engine" and r["msg"].startswith("request ")]
    assert {r["request_id"] for r in engine_lines} == {"poisoned-1", generated}
    loop_lines = [r for r in records if r["logger"] == "loraplex.api.engine_loop" and r["msg"].endswith("finished: length")]
    assert "healthy-1" in {r["request_id"] for r in loop_lines}
    # Nothing about the healthy request was logged under another request's id, or vice versa.
    for r in records:
        if "healthy-1" in r["msg"]:
            assert r["request_id"] == "healthy-1"
