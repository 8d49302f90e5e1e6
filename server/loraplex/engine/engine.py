"""The engine: requests in, one step at a time, outputs out.

    step():  drain inbox (new requests, aborts) → schedule → run model → sample → postprocess

`add_request`, `abort` and the adapter calls are safe to call from any thread; they hand
work to the engine thread through an inbox. `step` runs on one thread only (the API's engine
loop, or the caller of `generate`).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from loraplex.config import EngineConfig
from loraplex.engine import attention
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.detokenizer import Detokenizer
from loraplex.engine.errors import DuplicateRequestError, EngineClosedError, EngineOverloadedError
from loraplex.engine.kv_cache import KVCache, plan_num_blocks
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.request import (
    CompletionResult,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    StepStats,
)
from loraplex.engine.sampler import Sampler
from loraplex.engine.scheduler import ScheduledBatch, Scheduler
from loraplex.lora.adapter_store import AdapterStore
from loraplex.lora.adapter_version import AdapterInfo, AdapterVersion, StoreListener
from loraplex.lora.adapter_weights import load_weights
from loraplex.lora.lora_backend import LoraBackend
from loraplex.lora.lora_layer import LoraModel
from loraplex.model.loader import LoadedModel, load_base_model

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        *,
        store_listener: StoreListener | None = None,
        lora_backend: LoraBackend[Any] | None = None,
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
        self.blocks = BlockManager(num_blocks, cc.block_size)
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
            listener=store_listener,
            on_ready=self._wake.set,
        )
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.store, self.max_model_len)
        self.runner = ModelRunner(self.loaded, self.lora, self.kv_cache)
        self.sampler = Sampler(config.seed)

        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        # (a request, or an adapter version whose requests all end; reason)
        self._abort_inbox: queue.SimpleQueue[tuple[Request | AdapterVersion, str | None]] = queue.SimpleQueue()
        self._requests: dict[str, Request] = {}  # unfinished and drained from the inbox; engine thread only
        self._count_lock = threading.Lock()
        self._live: dict[str, Request] = {}  # every unfinished request by id; under _count_lock
        self._tokenizer_lock = threading.Lock()
        self._ids = itertools.count()
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
    ) -> str:
        """Queue a request; returns its id. Raises ValueError on bad input, AdapterNotFoundError
        for an unknown adapter, EngineOverloadedError when the queue is full."""
        if self._closed:
            raise EngineClosedError("the engine is shutting down")
        params = params or SamplingParams()
        ids = self._prompt_ids(prompt, prompt_token_ids)
        if len(ids) >= self.max_seq_len:
            bound = "max_model_len" if self.max_seq_len == self.max_model_len else "the KV cache (num_kv_blocks x block_size)"
            raise ValueError(
                f"prompt has {len(ids)} tokens; {bound} holds {self.max_seq_len} (room for at least one new token needed)"
            )
        if request_id is not None and not request_id:
            raise ValueError("request_id must not be empty")
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        version = self.store.resolve(adapter_id) if adapter_id else None
        request = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            adapter_id=adapter_id or None,
            adapter=version,
            eos_token_ids=frozenset() if params.ignore_eos else self.loaded.eos_token_ids,
            detokenizer=Detokenizer(self.tokenizer, ids, params.stop),
        )
        with self._count_lock:
            limit = self.config.scheduler.max_waiting + self.config.scheduler.max_num_seqs
            if len(self._live) >= limit:
                raise EngineOverloadedError(f"{len(self._live)} requests are queued or running (limit {limit})")
            if request_id in self._live:
                raise DuplicateRequestError(f"request_id {request_id!r} is already in flight")
            self._live[request_id] = request
        if version is not None:
            self.store.hold(version)
        self._inbox.put(request)
        self._wake.set()
        return request_id

    def _prompt_ids(self, prompt: str | None, prompt_token_ids: Sequence[int] | None) -> list[int]:
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        if prompt_token_ids is not None:
            ids = [int(t) for t in prompt_token_ids]
            bad = [t for t in ids if not 0 <= t < self.loaded.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids has ids outside the vocabulary [0, {self.loaded.vocab_size}): {bad[:5]}")
        else:
            with self._tokenizer_lock:
                ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def abort(self, request_id: str, reason: str | None = None) -> None:
        """End a request (cancel, deadline); its KV blocks and adapter slot come back at the next step.

        Aborts the request that has this id now: a later request reusing the id is not hit.
        """
        with self._count_lock:
            request = self._live.get(request_id)
        if request is not None:
            self._abort_inbox.put((request, reason))
        self._wake.set()

    # -- the step (engine thread) ---------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._live)

    @property
    def num_unfinished(self) -> int:
        return len(self._live)

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
        num_decodes = sum(
            1 for r, n in zip(batch.requests, batch.num_new_tokens) if n == 1 and r.num_computed_tokens >= r.num_prompt_tokens
        )
        for request in batch.failed:
            request.error_kind = "adapter"
            outputs.append(self._finish(request, RequestStatus.FINISHED_ERROR))
        num_adapters = 0
        if batch.requests:
            try:
                num_adapters = self._run(batch, outputs)
            except Exception:
                log.exception("step failed for %d requests; running them one by one", len(batch))
                self._run_isolated(batch, outputs)
        self.last_step = StepStats(
            len(batch), batch.num_tokens, num_adapters, len(batch.preempted), time.perf_counter() - start, num_decodes
        )
        return outputs

    def _run(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> int:
        result = self.runner.run(batch)
        tokens = self.sampler(result.logits, result.sampling)
        outputs.extend(self._postprocess(batch, result.sampling, tokens))
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
                request.error = f"internal error in request {request.request_id}: {type(e).__name__}: {e}"
                request.error_kind = "internal"
                outputs.append(self._finish(request, RequestStatus.FINISHED_ERROR))

    def _drain_inbox(self) -> list[RequestOutput]:
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._requests[request.request_id] = request
            self.scheduler.add(request)
        outputs = []
        while True:
            try:
                target, reason = self._abort_inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(target, Request):
                victims = [target] if self._requests.get(target.request_id) is target else []
            else:
                victims = [r for r in self._requests.values() if r.adapter is target]
            for request in victims:
                request.error = reason
                outputs.append(self._finish(request, RequestStatus.FINISHED_ABORTED))
        return outputs

    def _postprocess(self, batch: ScheduledBatch, sampling: list[Request], tokens: list[int]) -> list[RequestOutput]:
        now = time.monotonic()
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n
        outputs = []
        for request, token in zip(sampling, tokens):
            if request.first_token_time is None:
                request.first_token_time = now
            request.output_token_ids.append(token)
            p = request.params
            stop_token = token in p.stop_token_ids or token in request.eos_token_ids
            text = request.detokenizer.add(token, skip=stop_token)
            status = None
            if stop_token or request.detokenizer.stopped:
                status = RequestStatus.FINISHED_STOPPED
            elif len(request.output_token_ids) >= p.max_new_tokens or request.num_tokens >= self.max_seq_len:
                status = RequestStatus.FINISHED_LENGTH
            if status is None:
                outputs.append(RequestOutput(request.request_id, [token], text, finished=False))
            else:
                outputs.append(self._finish(request, status, [token], text))
        return outputs

    def _finish(
        self, request: Request, status: RequestStatus, new_tokens: list[int] | None = None, text: str = ""
    ) -> RequestOutput:
        if request.status in (RequestStatus.WAITING, RequestStatus.RUNNING):
            self.scheduler.finish(request, status)
        else:
            request.status = status
        if request.adapter is not None:
            self.store.unhold(request.adapter)
        self._requests.pop(request.request_id, None)
        with self._count_lock:
            if self._live.get(request.request_id) is request:
                del self._live[request.request_id]
        if status is not RequestStatus.FINISHED_ERROR and status is not RequestStatus.FINISHED_ABORTED:
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
        )

    # -- whole runs ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter_ids: Sequence[str | None] | None = None,
    ) -> list[CompletionResult]:
        """Run requests to completion in one continuous batch; results in input order."""
        n = len(prompts)
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * n
        adapters = list(adapter_ids) if adapter_ids is not None else [None] * n
        if len(params_list) != n or len(adapters) != n:
            raise ValueError("prompts, params and adapter_ids must have the same length")
        ids = []
        for prompt, p, adapter in zip(prompts, params_list, adapters):
            if isinstance(prompt, str):
                ids.append(self.add_request(prompt, p, adapter))
            else:
                ids.append(self.add_request(None, p, adapter, prompt_token_ids=prompt))
        texts: dict[str, list[str]] = {i: [] for i in ids}
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        done: dict[str, RequestOutput] = {}
        while len(done) < n:
            outputs = self.step()
            if not outputs and not self.scheduler.running:
                self.wait_for_work(0.01)  # adapters loading
            for out in outputs:
                if out.request_id in texts:
                    texts[out.request_id].append(out.new_text)
                    tokens[out.request_id].extend(out.new_token_ids)
                    if out.finished:
                        done[out.request_id] = out
        results = []
        for i in ids:
            out = done[i]
            if out.finish_reason == "error":
                raise RuntimeError(out.error or f"request {i} failed")
            assert out.usage is not None and out.finish_reason is not None
            results.append(CompletionResult(i, "".join(texts[i]), tokens[i], out.finish_reason, out.usage))
        return results

    # -- adapters (any thread) ------------------------------------------------------------

    def register_adapter(self, adapter_id: str, path: str, *, pin: bool = False) -> AdapterInfo:
        self.store.register(adapter_id, path, pin=pin)
        self._wake.set()
        return self.store.get(adapter_id)

    def unregister_adapter(self, adapter_id: str, *, force: bool = False) -> AdapterVersion:
        """Forget an adapter id; with force, end the requests using it with a clear error."""
        version = self.store.unregister(adapter_id)
        if force:
            self._abort_inbox.put((version, f"adapter {adapter_id!r} was unloaded"))
            self._wake.set()
        return version

    def stop_accepting(self) -> None:
        """New add_request calls fail with EngineClosedError; running requests go on."""
        self._closed = True

    def close(self) -> None:
        self._closed = True
        self.store.close()
