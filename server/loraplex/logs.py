"""Logging set-up: text or JSON lines, with the request id when a record carries one.

A record gets its request id from `extra={"request_id": ...}` (the engine thread logs a
request this way) or, failing that, from the `current_request_id` context variable, which the gRPC
servicer sets for the call it handles: every log line written while serving a call names it.
Audit lines (logger `loraplex.audit`, api/auth.py) carry their fields as a JSON object
under "audit": tenant, rpc, adapter_id, version, content_hash, outcome (and reason).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("loraplex_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Gives each record the request id of the call being served, unless it has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        audit = getattr(record, "audit", None)  # api/auth.py's audit lines: their fields, structured
        if audit is not None:
            entry["audit"] = audit
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [request_id={request_id}]" if request_id is not None else line


_progress_bars: bool | None = None  # None: not configured, bars on a terminal


def progress_bars() -> bool:
    """Whether a progress bar may be drawn: on a terminal, and never between JSON log lines."""
    return sys.stderr.isatty() if _progress_bars is None else _progress_bars


def configure(level: str = "info", fmt: str = "text") -> None:
    global _progress_bars
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # Start-up noise that means nothing to a user, e.g. bitsandbytes' advice to `pip install kernels`.
    for noisy in ("httpx", "urllib3", "bitsandbytes", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.captureWarnings(True)  # warnings.warn() lines go through the handler (JSON when asked)
    _progress_bars = fmt == "text" and sys.stderr.isatty()
