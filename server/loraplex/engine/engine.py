"""The engine: requests in, one step at a time, outputs out.

    step():  drain inbox (new requests, aborts) → schedule → run model → sample → postprocess

The face the API and metrics use (nothing else of the engine is read from outside):
  add_request, abort                    any thread; hand work to the engine thread (live_requests.py)
  step, has_unfinished, wait_for_work   the engine thread only (the API's engine loop, or `generate`)
  last_step                             what the last step did (StepStats), read after step()
  stats()                               any thread: a snapshot of requests, KV blocks and adapter tiers
  chat_prompt_ids, prompts              any thread: chats and text to prompt ids (Jinja, tokenizer), token texts
  lookup_adapter                        any thread, no disk
  resolve_adapter, register_adapter     any thread but the event loop: they may read adapter files
  unregister_adapter, adapter_info(s)   any thread
  on_finish, set_adapter_listener       metrics hooks
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from loraplex.config import EngineConfig
from loraplex.engine import attention, offline
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.detokenizer import Detokenizer
from loraplex.engine.errors import EngineClosedError
from loraplex.engine.kv_cache import KVCache, plan_num_blocks
from loraplex.engine.live_requests import Abort, AbortHolders, Admit, LiveRequests
from loraplex.engine.logprobs import TokenLogprobs
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.prompts import ChatMessage, Prompts
from loraplex.engine.request import (
    ANONYMOUS_TENANT,
    CompletionResult,
    ErrorKind,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    StepStats,
)
from loraplex.engine.sampler import SampledTokens, Sampler
from loraplex.engine.samples import cache_key, fan_out
from loraplex.engine.scheduler import ScheduledBatch, Scheduler
from loraplex.engine.stats import EngineStats
from loraplex.lora.adapter_store import AdapterStore
from loraplex.lora.adapter_version import AdapterInfo, AdapterVersion, StoreListener
from loraplex.lora.adapter_weights import load_weights
from loraplex.lora.lora_backend import LoraBackend
from loraplex.lora.lora_layer import LoraModel
from loraplex.model.loader import LoadedModel, load_base_model
from loraplex.rules import check_request_id, new_request_id

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel | None = None, *, lora_backend: LoraBackend[Any] | None = None
    ) -> None:
        """lora_backend: the grouped LoRA op's implementation; by default chosen for the device
        (backends.select_lora_backend). Tests pass stand-ins here."""
        self.config = config
        self.loaded = loaded or load_base_model(config.model)
        model = self.loaded.model
        attention.register()
        model.set_attn_implementation(attention.ATTENTION_NAME)
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = self.loaded.max_model_len
        device, dtype = self.loaded.device, self.loaded.dtype

        lc = config.lora
        self.lora = LoraModel(model, lc.max_loras, lc.max_lora_rank, dtype, device, lora_backend)
        cc = config.cache
        per_block = KVCache.bytes_per_block(
            self.loaded.num_layers, cc.block_size, self.loaded.num_kv_heads, self.loaded.head_dim, dtype.itemsize
        )
        num_blocks = plan_num_blocks(
            cc.num_blocks, config.scheduler.max_num_seqs, self.max_model_len, cc.block_size, per_block,
            device, cc.memory_fraction,
        )
        self.kv_cache = KVCache(
            self.loaded.num_layers, num_blocks, cc.block_size, self.loaded.num_kv_heads, self.loaded.head_dim, dtype, device
        )
        self.blocks = BlockManager(num_blocks, cc.block_size, prefix_caching=cc.prefix_caching)
        # A sequence can never outgrow the whole cache: past it, preemption could not make room.
        self.max_seq_len = min(self.max_model_len, num_blocks * cc.block_size)
        self._wake = threading.Event()
        self.store = AdapterStore(
            self.lora.layer_infos,
            self.lora,
            partial(load_weights, dtype=dtype, pin_memory=device.type == "cuda"),
            max_rank=lc.max_lora_rank,
            host_budget=lc.max_host_adapter_bytes,
            itemsize=dtype.itemsize,
            adapter_roots=lc.adapter_roots,
            auto_register=lc.auto_register,
            on_ready=self._wake.set,
        )
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.store)
        self.runner = ModelRunner(self.loaded, self.lora, self.kv_cache)
        self.sampler = Sampler(config.seed)

        self.num_kv_blocks = num_blocks
        self._live = LiveRequests(config.scheduler.max_waiting + config.scheduler.max_num_seqs)
        self.prompts = Prompts(self.tokenizer, self.loaded.vocab_size, self.max_seq_len, self.max_model_len)
        self._closed = False
        self.last_step: StepStats | None = None
        self.on_finish: Callable[[Request], None] | None = None  # metrics hook, engine thread
        log.info(
            "engine ready: %d KV blocks of %d tokens (%.1f MiB), %d LoRA layers x %d adapter slots x rank %d (%.1f MiB), %s",
            num_blocks, cc.block_size, self.kv_cache.nbytes / 2**20, len(self.lora.layers), lc.max_loras,
            lc.max_lora_rank, self.lora.pool_bytes / 2**20, f"{self.lora.backend.name} LoRA backend",
        )

    # -- requests (any thread) ---------------------------------------------------------

    def add_request(
        self,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        request_id: str | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        adapter: AdapterVersion | None = None,
        tenant: str = ANONYMOUS_TENANT,
        weight: float = 1.0,
        priority: int = 0,
    ) -> str:
        """Queue a request; returns its id. `adapter` is a version from resolve_adapter, given
        instead of adapter_id when the caller resolved it off its own thread (the API does).
        With params.n > 1, its samples share the id (RequestOutput.index tells them apart).
        `tenant` names whose request it is (the API's caller) and `weight` that tenant's share
        when tenants compete (the scheduler's fair share); `priority` (lower first) orders it
        among the same tenant's requests only.

        Raises InvalidFieldError on bad input, AdapterNotFoundError for an unknown adapter,
        EngineOverloadedError when the queue is full, DuplicateRequestError for an id in flight.
        """
        if self._closed:
            raise EngineClosedError("the engine is shutting down")
        params = params or SamplingParams()
        request_id = new_request_id() if request_id is None else check_request_id(request_id)
        ids = self.prompts.request_ids(prompt, prompt_token_ids)
        self.prompts.check_vocab("stop_token_ids", params.stop_token_ids)
        if adapter is None and adapter_id:
            adapter = self.resolve_adapter(adapter_id)
        leader = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            adapter_id=adapter.adapter_id if adapter is not None else None,
            tenant=tenant,
            weight=weight,
            priority=priority,
            adapter=adapter,
            eos_token_ids=frozenset() if params.ignore_eos else self.loaded.eos_token_ids,
            detokenizer=Detokenizer(self.tokenizer, ids, params.stop),
            cache_key=cache_key(adapter, self.config.cache.prefix_caching, params.n),
        )
        samples = fan_out(leader, partial(Detokenizer, self.tokenizer, ids, params.stop))
        self._live.admit(*samples, on_admit=partial(self.store.hold, adapter, len(samples)) if adapter is not None else None)
        self._wake.set()
        return request_id

    def chat_prompt_ids(self, messages: Sequence[ChatMessage], adapter: AdapterVersion | None) -> list[int]:
        """A chat's prompt ids with the adapter's own chat template, else the base's (prompts.py)."""
        template = adapter.spec.chat_template if adapter is not None else None
        return self.prompts.chat(messages, template, adapter.adapter_id if adapter is not None else None)

    def abort(
        self, request_id: str, kind: ErrorKind = ErrorKind.CANCELLED, message: str = "cancelled by the client"
    ) -> None:
        """End a request ABORTED (cancel, deadline, shutdown); its KV blocks and adapter slot come
        back at the next step. Aborts the request that has this id now, not a later one reusing the id.
        """
        if self._live.abort(request_id, kind, message):
            self._wake.set()

    # -- the step (engine thread) ---------------------------------------------------------

    def has_unfinished(self) -> bool:
        return len(self._live) > 0

    @property
    def num_unfinished(self) -> int:
        return len(self._live)

    def stats(self) -> EngineStats:
        """A snapshot for metrics and the API (any thread; counts read without stopping the engine)."""
        adapters = self.store.snapshot()
        running = len(self.scheduler.running)
        return EngineStats(
            running=running,
            waiting=max(0, len(self._live) - running),
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_free=self.blocks.num_free_blocks,
            prefix_cache=self.blocks.prefix_cache_stats(),
            adapters=adapters,
            adapter_slot_bytes=self.lora.pool_bytes // max(1, adapters.device_slots),
            last_step=self.last_step,
            tenants=self.scheduler.tenant_loads,  # replaced, never changed, by each step: safe to read here
        )

    def wake(self) -> None:
        """Make a sleeping engine loop look at its queues (new adapter, new request)."""
        self._wake.set()

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until a request, an abort or a loaded adapter arrives (engine loop)."""
        self._wake.wait(timeout)
        self._wake.clear()

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        outputs = self._drain_inbox()
        batch = self.scheduler.schedule()
        self.store.compact_slots()  # one slot exchange at most: adapters of one rank side by side
        num_decodes = sum(
            1 for r, n in zip(batch.requests, batch.num_new_tokens) if n == 1 and r.num_computed_tokens >= r.num_prompt_tokens
        )
        for request in batch.failed:
            outputs.append(self._end(request, ErrorKind.ADAPTER, request.error or "adapter failed to load"))
        num_adapters = 0
        if batch.requests:
            try:
                num_adapters = self._run(batch, outputs)
            except Exception:
                log.exception("step failed for %d requests; running them one by one", len(batch))
                self._run_isolated(batch, outputs)
        self.scheduler.record_loads()
        self.last_step = StepStats(
            len(batch), batch.num_tokens, num_adapters, len(batch.preempted), time.perf_counter() - start, num_decodes
        )
        return outputs

    def _run(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> int:
        result = self.runner.run(batch)
        sampled = self.sampler.sample(result.logits, result.sampling)
        outputs.extend(self._postprocess(batch, result.sampling, sampled))
        return result.num_adapters

    def _run_isolated(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> None:
        """After a failed step: run each request alone, so only the one that fails ends.

        Re-running is safe: nothing advanced, and the KV rows a failed step wrote are
        written again.
        """
        for request, n in zip(list(batch.requests), list(batch.num_new_tokens)):
            single = ScheduledBatch(requests=[request], num_new_tokens=[n])
            try:
                self._run(single, outputs)
            except Exception as e:
                log.exception("request %s failed", request.request_id, extra={"request_id": request.request_id})
                message = f"internal error in request {request.request_id}: {type(e).__name__}: {e}"
                outputs.append(self._end(request, ErrorKind.INTERNAL, message))

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        for event in self._live.drain():
            if isinstance(event, Admit):
                if not event.request.finished:  # not ended by an AbortHolders before it got here
                    self.scheduler.add(event.request)
            elif isinstance(event, Abort):
                if not event.request.finished:
                    outputs.append(self._end(event.request, event.kind, event.message))
            elif isinstance(event, AbortHolders):
                for request in self._live.holders(event.version):
                    if not request.finished:
                        outputs.append(self._end(request, event.kind, event.message))
        return outputs

    def _postprocess(self, batch: ScheduledBatch, sampling: list[Request], sampled: SampledTokens) -> list[RequestOutput]:
        now = time.monotonic()
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n
        outputs = []
        for request, token, lp in zip(sampling, sampled.tokens, sampled.logprobs):
            logprobs = None if lp is None else [lp]
            text, status = request.append_token(token, now, self.max_seq_len)
            if status is None:
                outputs.append(
                    RequestOutput(
                        request.request_id, [token], text, finished=False, logprobs=logprobs, index=request.index,
                        tenant=request.tenant,
                    )
                )
            else:
                outputs.append(self._finish(request, status, [token], text, logprobs))
        return outputs

    def _end(self, request: Request, kind: ErrorKind, message: str) -> RequestOutput:
        """Finish a request ABORTED or ERROR, as its kind says."""
        request.error, request.error_kind = message, kind
        return self._finish(request, kind.status)

    def _finish(
        self, request: Request, status: RequestStatus, new_tokens: list[int] | None = None, text: str = "",
        logprobs: list[TokenLogprobs] | None = None,
    ) -> RequestOutput:
        # A request ended before the engine thread admitted it is in no scheduler queue:
        # finish() then only frees its (empty) block table.
        self.scheduler.finish(request, status)
        if request.adapter is not None:
            self.store.unhold(request.adapter)
        self._live.remove(request)
        if request.error_kind is None:
            text += request.detokenizer.flush()
        if self.on_finish is not None:
            self.on_finish(request)
        return RequestOutput(
            request.request_id,
            new_tokens or [],
            text,
            finished=True,
            finish_reason=status.finish_reason,
            error=request.error,
            error_kind=request.error_kind,
            usage=request.usage(),
            adapter_version=request.adapter.version if request.adapter is not None else None,
            logprobs=logprobs,
            index=request.index,
            tenant=request.tenant,
        )

    # -- whole runs ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter_ids: Sequence[str | None] | None = None,
    ) -> list[CompletionResult]:
        """Run requests to completion in one continuous batch on this thread; results in input order."""
        return offline.generate(self, prompts, params, adapter_ids)

    # -- adapters (any thread) ------------------------------------------------------------

    def lookup_adapter(self, adapter_id: str) -> AdapterVersion | None:
        """The current version of a registered id, or None. No disk work."""
        return self.store.lookup(adapter_id)

    def resolve_adapter(self, adapter_id: str) -> AdapterVersion:
        """The current version of an id; with auto-register, registers a directory of that name
        under an adapter root first (reads and hashes its files: never on the event loop)."""
        return self.store.resolve(adapter_id)

    def register_adapter(
        self, adapter_id: str, path: str | Path, *, pin: bool = False, relative_only: bool = False
    ) -> AdapterInfo:
        """Register (or re-register, as a new version) a PEFT directory; reads and hashes its files."""
        self.store.register(adapter_id, path, pin=pin, relative_only=relative_only)
        self._wake.set()
        return self.store.get(adapter_id)

    def unregister_adapter(
        self, adapter_id: str, *, force: bool = False, on_released: Callable[[], None] | None = None
    ) -> int:
        """Forget an adapter id; returns how many live requests hold its version. With force,
        they end ABORTED (ErrorKind.UNLOADED). `on_released` is called (now, or later from the
        engine thread) once none of them is live any more."""
        version = self.store.unregister(adapter_id)
        holders = len(self._live.holders(version))
        if force:
            self._live.abort_holders(version, ErrorKind.UNLOADED, f"adapter {adapter_id!r} was unloaded")
            self._wake.set()
        if on_released is not None:
            self._live.when_released(version, on_released)
        return holders

    def adapter_info(self, adapter_id: str) -> AdapterInfo:  # NOT_FOUND: AdapterNotFoundError
        return self.store.get(adapter_id)

    def adapter_infos(self) -> list[AdapterInfo]:  # sorted by id
        return self.store.infos()

    @property
    def adapter_roots(self) -> tuple[Path, ...]:
        """Where adapters may be read from (resolved); uploads go under the first."""
        return self.store.roots

    def set_adapter_listener(self, listener: StoreListener | None) -> None:
        """Adapter load timings go to `listener.on_load` (metrics); None stops them."""
        self.store.listener = listener

    def stop_accepting(self) -> None:
        """New add_request calls fail with EngineClosedError; running requests go on."""
        self._closed = True

    def close(self) -> None:
        self._closed = True
        self.store.close()

