"""The LoraPlex gRPC service: generation, streaming, and adapter management.

Each handler takes its caller from the auth seam (auth.current_caller, set by the
interceptor) and goes through the engine loop's stream (generation) or AdapterAccess
(adapters), where the tenant rules are applied; refusals come back as typed errors, mapped
to statuses in `_abort`, which also writes the denial's audit line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from loraplex import __version__
from loraplex.api.access import upload_home
from loraplex.api.auth import Auth, current_caller
from loraplex.api.engine_loop import EngineLoop
from loraplex.api.errors import ApiError, ended_status, invalid, rich_status, status_of
from loraplex.api.uploads import Upload
from loraplex.api.validation import MAX_PROMPT_CHARS, GenerateArgs, messages_from_proto, parse_generate
from loraplex.config import ServerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import FinishReason, RequestOutput
from loraplex.logs import current_request_id
from loraplex.lora.adapter_spec import ADAPTER_FILES
from loraplex.lora.adapter_version import AdapterInfo
from loraplex.rules import check_adapter_id, new_request_id
from loraplex_proto.v1 import loraplex_pb2 as pb
from loraplex_proto.v1 import loraplex_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# FinishReason.X is FINISH_REASON_X on the wire (ERROR has no value: it ends the call with a
# status); a reason the proto lacks fails here, at import.
FINISH: dict[FinishReason, Any] = {r: pb.FinishReason.Value(f"FINISH_REASON_{r.name}") for r in FinishReason if r is not FinishReason.ERROR}
TIERS = {"registered": pb.ADAPTER_TIER_REGISTERED, "host": pb.ADAPTER_TIER_HOST, "device": pb.ADAPTER_TIER_DEVICE}
UPLOAD_FILES = ADAPTER_FILES
SHUTDOWN_REASON = "the server is shutting down"

F = TypeVar("F", bound=Callable[..., Any])


async def _abort(service: LoraPlexService, context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    code, message = status_of(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=error)
    service.auth.denied(current_caller(), method, error)
    details = rich_status(error)
    if details is not None:
        await context.abort_with_status(details)
    await context.abort(code, message)


def _check_open(service: LoraPlexService) -> None:
    if service.draining:
        raise ApiError(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_REASON)


def unary(method: F) -> F:
    """Map exceptions of a unary handler to statuses."""

    @functools.wraps(method)
    async def run(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_open(self)
            return await method(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _abort(self, context, e, method.__name__)

    return run  # type: ignore[return-value]


def streaming(method: F) -> F:
    """Map exceptions of a streaming handler to statuses."""

    @functools.wraps(method)
    async def run(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_open(self)
            async for item in method(self, request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _abort(self, context, e, method.__name__)

    return run  # type: ignore[return-value]


def _logprobs(out: RequestOutput) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in out.logprobs or ()
    ]


def _usage(finals: dict[int, RequestOutput], started: float) -> pb.Usage:
    """One request's usage from its samples' final outputs: the prompt once (sample 0's
    queue time and cached tokens: it computes the prompt), the tokens of all, the first token of any."""
    usages = [out.usage for out in finals.values() if out.usage is not None]
    u = finals[0].usage
    if u is None:
        return pb.Usage(total_time_s=time.monotonic() - started)
    first_tokens = [x.time_to_first_token_s for x in usages if x.time_to_first_token_s is not None]
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        generated_tokens=sum(x.generated_tokens for x in usages),
        queue_time_s=u.queue_time_s,
        time_to_first_token_s=min(first_tokens, default=0.0),
        total_time_s=time.monotonic() - started,
        cached_prompt_tokens=u.cached_prompt_tokens,
    )


class LoraPlexService(pb_grpc.LoraPlexServicer):
    def __init__(self, engine_loop: EngineLoop, config: ServerConfig, auth: Auth | None = None) -> None:
        self.engine_loop = engine_loop
        self.engine: Engine = engine_loop.engine
        self.access = engine_loop.access
        self.auth = auth or Auth()
        self.config = config
        self.ready = False
        self.draining = False  # set by Server.drain: new calls get UNAVAILABLE

    # -- generation ------------------------------------------------------------------------

    def _args(self, request: pb.GenerateRequest) -> GenerateArgs:
        args = parse_generate(request, max_model_len=self.engine.max_model_len)
        # The id is fixed here so that every log line of this call names it (logs.current_request_id).
        request_id = args.request_id or new_request_id()
        current_request_id.set(request_id)
        return dataclasses.replace(args, request_id=request_id)

    @unary
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        started = time.monotonic()
        args = self._args(request)
        n = args.params.n
        text: list[list[str]] = [[] for _ in range(n)]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[pb.TokenLogprob]] = [[] for _ in range(n)]
        finals: dict[int, RequestOutput] = {}
        async for out in self.engine_loop.stream(args, current_caller()):
            text[out.index].append(out.new_text)
            tokens[out.index].extend(out.new_token_ids)
            logprobs[out.index].extend(_logprobs(out))
            if out.finished:
                error = ended_status(out)
                if error is not None:
                    raise error
                finals[out.index] = out
        if len(finals) < n:
            raise ApiError(grpc.StatusCode.INTERNAL, "the request ended without a final output")
        reasons = [finals[i].finish_reason for i in range(n)]
        samples = [
            pb.Sample(
                index=i, text="".join(text[i]), token_ids=tokens[i], finish_reason=FINISH[reason], logprobs=logprobs[i]
            )
            for i, reason in enumerate(reasons)
            if reason is not None
        ]
        return pb.GenerateResponse(
            request_id=finals[0].request_id,
            text=samples[0].text,
            token_ids=samples[0].token_ids,
            finish_reason=samples[0].finish_reason,
            usage=_usage(finals, started),
            adapter_id=args.adapter_id or "",
            adapter_version=finals[0].adapter_version or 0,
            logprobs=samples[0].logprobs,
            samples=samples if n > 1 else [],
        )

    @streaming
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        started = time.monotonic()
        args = self._args(request)
        finals: dict[int, RequestOutput] = {}
        async for out in self.engine_loop.stream(args, current_caller()):
            if not out.finished:
                if out.new_token_ids or out.new_text:
                    yield pb.GenerateStreamResponse(
                        request_id=out.request_id, text=out.new_text, token_ids=out.new_token_ids,
                        logprobs=_logprobs(out), index=out.index,
                    )
                continue
            error = ended_status(out)
            if error is not None:
                raise error
            assert out.finish_reason is not None
            finals[out.index] = out
            message = pb.GenerateStreamResponse(
                request_id=out.request_id,
                text=out.new_text,
                token_ids=out.new_token_ids,
                finish_reason=FINISH[out.finish_reason],
                logprobs=_logprobs(out),
                index=out.index,
            )
            if len(finals) == args.params.n:  # the stream's last message
                message.usage.CopyFrom(_usage(finals, started))
            yield message

    @unary
    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise invalid("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        adapter_id = None
        if request.adapter_id:
            check_adapter_id(request.adapter_id)
            adapter_id = request.adapter_id
        messages = messages_from_proto(request.messages)
        ids = await self.engine_loop.tokenize(request.prompt or None, messages, adapter_id, current_caller())
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.engine.max_model_len)

    # -- adapters ----------------------------------------------------------------------------

    def _adapter_id(self, adapter_id: str) -> str:
        if not adapter_id:
            raise invalid("adapter_id", "is required")
        check_adapter_id(adapter_id)
        return adapter_id

    def _info(self, info: AdapterInfo) -> pb.AdapterInfo:
        s = info.stats
        return pb.AdapterInfo(
            adapter_id=info.adapter_id,
            version=info.version,
            tier=TIERS[info.tier],
            rank=info.rank,
            target_modules=list(info.target_modules),
            host_bytes=info.host_bytes,
            pinned=info.pinned,
            loading=info.loading,
            error=info.error or "",
            active_requests=info.active_requests,
            content_hash=info.content_hash,
            path=info.path,  # relative to its adapter root
            stats=pb.AdapterStats(
                requests=s.requests, host_hits=s.host_hits, host_misses=s.host_misses, device_hits=s.device_hits,
                device_misses=s.device_misses, loads=s.loads, evictions=s.evictions, last_used_unix=s.last_used,
                last_load_s=s.last_load_s,
            ),
        )

    @unary
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.AdapterInfo:
        adapter_id = self._adapter_id(request.adapter_id)
        # Reading and hashing the files is disk work: off the event loop.
        info = await asyncio.to_thread(
            self.access.register, current_caller(), "LoadAdapter", adapter_id, request.path, pin=request.pin
        )
        return self._info(info)

    @unary
    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context: grpc.aio.ServicerContext
    ) -> pb.AdapterInfo:
        roots = self.engine.adapter_roots
        if not roots:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "no adapter root is configured for uploads")
        caller = current_caller()
        limit = self.config.engine.lora.max_upload_bytes
        upload = Upload(roots[0])
        try:
            header: pb.UploadAdapterHeader | None = None
            adapter_id = ""
            received = 0
            async for part in request_iterator:
                if part.HasField("header"):
                    if header is not None:
                        raise invalid("header", "sent twice")
                    header = part.header
                    adapter_id = self._adapter_id(header.adapter_id)
                    self.access.before_upload(caller, adapter_id)  # refused before a byte is stored
                    continue
                if header is None:
                    raise invalid("header", "the first message must be the header with adapter_id")
                chunk = part.chunk
                if chunk.filename not in UPLOAD_FILES:
                    raise invalid("chunk.filename", f"{chunk.filename!r}: only {' and '.join(UPLOAD_FILES)} are accepted")
                received += len(chunk.data)
                if received > limit:
                    raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"upload larger than the limit of {limit} bytes")
                upload.write(chunk.filename, chunk.data)
            if header is None:
                raise invalid("header", "missing")
            missing = [f for f in UPLOAD_FILES if f not in upload.names]
            if missing:
                raise invalid("chunk.filename", f"missing {', '.join(missing)}")
            # Immutable, content-addressed home beside the id's own directory (so inside the
            # namespaces that own the id): an older version stays readable while in use.
            rel = await asyncio.to_thread(upload.commit, upload_home(adapter_id))
            try:
                info = await asyncio.to_thread(
                    self.access.register, caller, "UploadAdapter", adapter_id, str(rel), pin=header.pin
                )
            except BaseException:
                upload.discard()  # refused (or the call ended): no files stay behind
                raise
            return self._info(info)
        finally:
            upload.close()

    @unary
    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        adapter_id = self._adapter_id(request.adapter_id)
        loop = asyncio.get_running_loop()
        released = loop.create_future()

        def set_released() -> None:
            if not released.done():
                released.set_result(None)

        def on_released() -> None:  # now, or from the engine thread when the last holder finishes
            loop.call_soon_threadsafe(set_released)

        in_use = self.access.unregister(
            current_caller(), "UnloadAdapter", adapter_id, force=request.force, on_released=on_released
        )
        # New requests already get NOT_FOUND; wait for the ones holding it (or their abort).
        await released
        return pb.UnloadAdapterResponse(adapter_id=adapter_id, aborted_requests=in_use if request.force else 0)

    @unary
    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[self._info(i) for i in self.access.visible(current_caller())])

    @unary
    async def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext) -> pb.AdapterInfo:
        return self._info(self.access.get(current_caller(), self._adapter_id(request.adapter_id)))

    @unary
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        e, c = self.engine, self.config.engine
        return pb.ModelInfo(
            model=e.loaded.path,
            model_type=e.loaded.model_type,
            quantization=e.loaded.quantization,
            dtype=str(e.loaded.dtype).removeprefix("torch."),
            device=str(e.loaded.device),
            max_model_len=e.max_model_len,
            vocab_size=e.loaded.vocab_size,
            max_loras=c.lora.max_loras,
            max_lora_rank=c.lora.max_lora_rank,
            max_num_seqs=c.scheduler.max_num_seqs,
            num_kv_blocks=e.num_kv_blocks,
            block_size=c.cache.block_size,
            server_version=__version__,
            ready=self.ready,
        )
