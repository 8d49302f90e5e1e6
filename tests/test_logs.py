"""Log lines: JSON or text, with the request id from the record or from the call's context."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from loraplex.logs import (
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    configure,
    current_request_id,
    progress_bars,
)


@pytest.fixture
def stream_logger() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("loraplex.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, out, handler
    logger.removeHandler(handler)


def test_json_lines_carry_the_request_id_of_the_call(stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, out, handler = stream_logger
    handler.setFormatter(JsonFormatter())

    def in_a_call() -> None:
        current_request_id.set("req-from-context")
        logger.info("serving %s", "x")
        logger.info("explicit wins", extra={"request_id": "req-explicit"})

    contextvars.copy_context().run(in_a_call)
    logger.warning("outside any call")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["msg"] == "serving x" and lines[0]["request_id"] == "req-from-context"
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "loraplex.test-logs" and lines[0]["ts"].endswith("Z")
    assert lines[1]["request_id"] == "req-explicit"
    assert "request_id" not in lines[2]  # the context did not leak out of the call
    assert "RuntimeError: boom" in lines[3]["exc"]


def test_audit_lines_are_structured_in_json(stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    from loraplex.api.auth import Outcome, audit

    _, out, handler = stream_logger
    handler.setFormatter(JsonFormatter())
    audit_log = logging.getLogger("loraplex.audit")
    audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)
    try:
        audit("acme", "LoadAdapter", Outcome.OK, adapter_id="acme/x", version=2, content_hash="ab12")
    finally:
        audit_log.removeHandler(handler)
    line = json.loads(out.getvalue())
    assert line["logger"] == "loraplex.audit"
    assert line["msg"] == "audit tenant=acme rpc=LoadAdapter adapter_id=acme/x version=2 content_hash=ab12 outcome=ok"
    assert line["audit"] == {
        "tenant": "acme", "rpc": "LoadAdapter", "adapter_id": "acme/x", "version": 2, "content_hash": "ab12", "outcome": "ok",
    }


def test_text_lines_append_the_request_id(stream_logger: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, out, handler = stream_logger
    handler.setFormatter(TextFormatter())
    token = current_request_id.set("req-7")
    try:
        logger.info("hello")
    finally:
        current_request_id.reset(token)
    logger.info("bye")
    first, second = out.getvalue().splitlines()
    assert first.endswith("loraplex.test-logs: hello [request_id=req-7]")
    assert second.endswith("loraplex.test-logs: bye")


def test_configure_installs_one_handler_with_the_filter() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure("warning", "json")
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        handler = root.handlers[0]
        assert isinstance(handler.formatter, JsonFormatter)
        assert any(isinstance(f, RequestIdFilter) for f in handler.filters)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)


def test_json_mode_has_only_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logging.captureWarnings(False)  # the state an earlier configure() in this process left behind
    try:
        configure("info", "json")
        assert not progress_bars()  # never between JSON lines, terminal or not
        # bitsandbytes' advice on a CPU with AVX512-BF16: noise to a user, dropped
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"
        )
        # a library's warnings.warn() (pytest records those itself, so call the display hook)
        warnings.showwarning(UserWarning("a library's warning"), UserWarning, "lib.py", 1)  # a JSON line
        logging.getLogger("loraplex").info("ready")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["logger"] for r in records] == ["py.warnings", "loraplex"]
    assert "a library's warning" in records[0]["msg"] and records[1]["msg"] == "ready"
