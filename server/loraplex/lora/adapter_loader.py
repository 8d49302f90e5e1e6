"""The adapter store's loader thread: disk reads off the engine and API threads. No torch here.

    AdapterStore ──take()──> the oldest queued version that is wanted and fits the host budget
        │                      (host bytes reserved; store lock held)
        └── this thread: load_fn(spec) ─ read, validate, cast (adapter_weights.load_weights)
                 └──finish(version, weights | None, error | None, transient, seconds)──> host tier,
                                                    or the version's error (store lock held)

An AdapterError becomes the version's error with its reason; any other exception is logged
and becomes an error too, so a bug or an I/O failure never kills the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from loraplex.lora.adapter_spec import AdapterError, AdapterReadError, AdapterSpec
from loraplex.lora.adapter_version import AdapterVersion

if TYPE_CHECKING:
    from loraplex.lora.adapter_weights import AdapterWeights

log = logging.getLogger(__name__)


class AdapterLoader:
    def __init__(
        self,
        changed: threading.Condition,
        take: Callable[[], AdapterVersion | None],
        load_fn: Callable[[AdapterSpec], AdapterWeights],
        finish: Callable[[AdapterVersion, AdapterWeights | None, str | None, bool, float], None],
        on_ready: Callable[[], None],
    ) -> None:
        self._changed = changed  # the store's condition: notified whenever a load may start
        self._take = take
        self._load_fn = load_fn
        self._finish = finish
        self._on_ready = on_ready
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="adapter-loader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                version = self._take()
                while version is None:
                    if self._closed:
                        return
                    self._changed.wait(timeout=0.5)
                    version = self._take()
            start = time.perf_counter()
            weights: AdapterWeights | None = None
            error: str | None = None
            transient = False
            try:
                weights = self._load_fn(version.spec)
            except AdapterError as e:
                error, transient = str(e), isinstance(e, AdapterReadError)
            except Exception as e:  # a bug or I/O failure must not kill the loader
                log.exception("loading adapter %s failed", version.key)
                error = f"adapter {version.adapter_id!r} failed to load ({type(e).__name__}; the server log has the details)"
            with self._changed:
                self._finish(version, weights, error, transient, time.perf_counter() - start)
                self._changed.notify_all()
            self._on_ready()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=5)
