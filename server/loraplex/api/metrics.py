"""Prometheus metrics, one place: names, where each value comes from, the /metrics endpoint.

    engine thread ── Engine.on_finish(request) ──> requests, tokens, latency histograms
                  ── EngineLoop.on_step(outputs) ─> inter-token latency, step histograms (Engine.last_step)
    loader thread ── StoreListener.on_load ───────> adapter load latency per tier
    scrape (HTTP) ── StateCollector (metrics_state.py) > gauges from Engine.stats() (per tenant too:
                                                    running, waiting, fair-share service), and
                                                    the adapter store's own counters in it (they
                                                    include what happened before the server started)

    auth seam ───── Auth.on_denied(tenant, outcome) ─> denied calls

A request with n > 1 samples counts as n requests (each sample finishes on its own), its
prompt tokens once.

Every name starts with `loraplex_`; counters end in `_total`, durations are `_seconds`.
Labels stay bounded: finish_reason (4 values), tier (3), tenant (the names configured in
the tenants file, everyone else as "(anonymous)"), outcome (4), and — only with
`--metrics-top-adapters N` — adapter, held to the N busiest ids plus "(other)".

Each Metrics owns its CollectorRegistry, so one process can run several servers (tests).
The hooks run on the engine and loader threads: they never raise into them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

from loraplex import __version__
from loraplex.api.auth import Outcome
from loraplex.api.metrics_state import LOAD_TIERS, StateCollector, anonymous
from loraplex.engine.request import ANONYMOUS_TENANT, FinishReason

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from loraplex.api.engine_loop import EngineLoop
    from loraplex.engine.engine import Engine
    from loraplex.engine.request import Request, RequestOutput
    from loraplex.lora.adapter_version import Tier

log = logging.getLogger(__name__)

FINISH_REASONS = tuple(r.value for r in FinishReason)  # stop, length, aborted, error
DENIALS = tuple(o.value for o in Outcome if o not in (Outcome.OK, Outcome.FAILED))  # the auth seam's refusals
BASE_LABEL = "(base)"  # parentheses never occur in an adapter id, so these cannot clash
OTHER_LABEL = "(other)"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ADAPTER_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(
        self, engine: Engine, *, top_adapters: int = 0, tenant_label: Callable[[str], str] = anonymous
    ) -> None:
        """tenant_label: a request's tenant name -> its label (auth.Auth.label: configured names only)."""
        if top_adapters < 0:
            raise ValueError(f"top_adapters must be >= 0, got {top_adapters}")
        self.engine = engine
        self.tenant_label = tenant_label
        disable_created_metrics()  # no `_created` twin of every counter and histogram (process-wide)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests_total", "Finished requests by final status and tenant", ["finish_reason", "tenant"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.requests.labels(reason, ANONYMOUS_TENANT)
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens_total", "Prompt tokens of finished requests", ["tenant"], registry=r
        )
        self.generated_tokens = Counter(
            "loraplex_generated_tokens_total", "Tokens generated and streamed", ["tenant"], registry=r
        )
        self.denied = Counter(
            "loraplex_denied_calls_total", "Calls refused by the auth seam: no token, hidden id, no right, tenant limit",
            ["tenant", "outcome"], registry=r,
        )
        # Series exist from the start (rate() needs them); a tenant's appear with its first call.
        self.prompt_tokens.labels(ANONYMOUS_TENANT)
        self.generated_tokens.labels(ANONYMOUS_TENANT)
        for outcome in DENIALS:
            self.denied.labels(ANONYMOUS_TENANT, outcome)
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds", "Arrival to first generated token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds", "Time between a request's successive token outputs",
            buckets=ITL_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "loraplex_e2e_request_latency_seconds", "Arrival to finish, any final status", buckets=E2E_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "loraplex_request_queue_time_seconds", "Arrival to first scheduled (or to the end, if never scheduled)",
            ["tenant"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue.labels(ANONYMOUS_TENANT)
        self.batch_size = Histogram(
            "loraplex_step_requests", "Batch size: requests in one engine step", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_tokens = Histogram(
            "loraplex_step_tokens", "Tokens computed in one engine step (prefill + decode)", buckets=TOKEN_BUCKETS, registry=r
        )
        self.step_adapters = Histogram(
            "loraplex_step_adapters", "Distinct adapters in one engine step", buckets=ADAPTER_BUCKETS, registry=r
        )
        self.step_duration = Histogram(
            "loraplex_step_duration_seconds", "Wall time of one engine step", buckets=STEP_BUCKETS, registry=r
        )
        self.preemptions = Counter(
            "loraplex_preemptions_total", "Running requests preempted for KV blocks (recomputed later)", registry=r
        )
        self.load_latency = Histogram(
            "loraplex_adapter_load_duration_seconds", "Bringing an adapter into a tier", ["tier"],
            buckets=LOAD_BUCKETS, registry=r,
        )
        for tier in LOAD_TIERS:
            self.load_latency.labels(tier)
        self.adapter_requests = TopAdapters(top_adapters, r) if top_adapters else None
        loaded = engine.loaded
        Info("loraplex_build", "Server version and model", registry=r).info({
            "version": __version__, "model_type": str(loaded.model_type), "quantization": str(loaded.quantization),
            "device": str(loaded.device),
        })
        ProcessCollector(registry=r)
        r.register(StateCollector(engine, tenant_label))

        self._last_token: dict[tuple[str, int], float] = {}  # (request id, sample) -> time of its last token output
        self._attached: EngineLoop | None = None
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self._hook_failed = False

    # -- wiring --------------------------------------------------------------------------

    def attach(self, engine_loop: EngineLoop) -> None:
        """Install the hooks; call before the engine loop starts so nothing is missed."""
        self.engine.on_finish = self._guard(self.on_finish)
        engine_loop.on_step = self._guard(self.on_step)
        self.engine.set_adapter_listener(self)
        self._attached = engine_loop

    def detach(self) -> None:
        if self._attached is not None:
            self.engine.on_finish = None
            self.engine.set_adapter_listener(None)
            self._attached.on_step = None
            self._attached = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on its own thread; returns the bound port."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        self.detach()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None

    def render(self) -> bytes:
        """The text exposition, as a scrape would see it."""
        return generate_latest(self.registry)

    def _guard(self, hook: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(arg: Any) -> None:
            try:
                hook(arg)
            except Exception:  # metrics must never take the engine loop down
                if not self._hook_failed:
                    self._hook_failed = True
                    log.exception("a metrics hook failed (reported once; metrics may be incomplete)")

        return run

    # -- hooks (engine thread) -------------------------------------------------------------

    def on_finish(self, request: Request) -> None:
        now = time.monotonic()
        usage = request.usage()
        reason = request.status.finish_reason
        assert reason is not None
        tenant = self.tenant_label(request.tenant)
        self.requests.labels(reason.value, tenant).inc()
        if request.index == 0:  # the samples of one request share its prompt
            self.prompt_tokens.labels(tenant).inc(usage.prompt_tokens)
        self.e2e.observe(now - request.arrival_time)
        self.queue.labels(tenant).observe(usage.queue_time_s)
        if usage.time_to_first_token_s is not None:
            self.ttft.observe(usage.time_to_first_token_s)
        if self.adapter_requests is not None:
            self.adapter_requests.count(request.adapter_id or BASE_LABEL)

    def on_step(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        generated: dict[str, int] = {}
        for out in outputs:
            if out.new_token_ids:
                generated[out.tenant] = generated.get(out.tenant, 0) + len(out.new_token_ids)
                last = self._last_token.get((out.request_id, out.index))
                if last is not None:
                    self.itl.observe(now - last)
                self._last_token[(out.request_id, out.index)] = now
            if out.finished:
                self._last_token.pop((out.request_id, out.index), None)
        for tenant, n in generated.items():
            self.generated_tokens.labels(self.tenant_label(tenant)).inc(n)
        step = self.engine.last_step
        if step is not None and step.num_requests:
            self.batch_size.observe(step.num_requests)
            self.step_tokens.observe(step.num_tokens)
            self.step_adapters.observe(step.num_adapters)
            self.step_duration.observe(step.duration_s)
        if step is not None and step.num_preempted:
            self.preemptions.inc(step.num_preempted)

    def on_denied(self, tenant_label: str, outcome: str) -> None:
        """A call refused by the auth seam (event loop); the label is already bounded."""
        self.denied.labels(tenant_label, str(outcome)).inc()

    # -- StoreListener (loader and engine threads) ----------------------------------------

    def on_load(self, tier: Tier, seconds: float) -> None:
        try:
            self.load_latency.labels(tier.value).observe(seconds)
        except Exception:
            log.exception("metrics: adapter load latency not recorded")


class TopAdapters:
    """Finished requests per adapter, with a label for at most the `top` busiest ids.

    Labels are sticky so that every series only ever grows: an id that overtakes the
    quietest labelled one takes its label from then on (its past stays in "(other)"); the
    demoted id's series is removed and its later requests count as "(other)". rate() over
    any series, and over their sum, stays right.
    """

    def __init__(self, top: int, registry: CollectorRegistry) -> None:
        self.top = top
        self.counter = Counter(
            "loraplex_adapter_requests_total",
            f"Finished requests per adapter: the {top} busiest ids, the rest as {OTHER_LABEL}",
            ["adapter"], registry=registry,
        )
        self.counter.labels(OTHER_LABEL)
        self.counts: dict[str, int] = {}  # id -> finished requests (ids are registered adapters: bounded)
        self.labelled: set[str] = set()

    def count(self, key: str) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        if key not in self.labelled:
            if len(self.labelled) < self.top:
                self.labelled.add(key)
            else:
                quietest = min(self.labelled, key=lambda k: counts[k])
                if counts[key] > counts[quietest]:
                    self.labelled.discard(quietest)
                    self.counter.remove(quietest)
                    self.labelled.add(key)
        self.counter.labels(key if key in self.labelled else OTHER_LABEL).inc()
