"""A real gRPC server on 127.0.0.1 with a fake LoraPlex servicer (pure Python, no engine),
so the SDK is tested over the wire exactly as it talks to the real server.

Not a conftest.py: the suite imports the root tests/conftest.py as `conftest`, and a second
one here would shadow it. Test modules wrap serve_fake() in their own fixture.

The prompt steers the fake:
    "abort:<CODE>"      fail the call with that grpc.StatusCode before any output
    "abort-mid:<CODE>"  (GenerateStream) send two chunks, then fail with that code
    "endless"           (GenerateStream) never finish: only a client cancel ends it
    "slow"              (Generate) wait until the call's deadline has passed
    anything else       echo: one token per character, token id = ord(character)
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loraplex_proto.v1 import loraplex_pb2 as pb
from loraplex_proto.v1 import loraplex_pb2_grpc as pb_grpc

READY_SERVICE = "loraplex.v1.LoraPlex"

# Every documented status code and the exception the SDK raises for it; one undocumented
# code falls back to the base class.
STATUS_ERRORS: list[tuple[grpc.StatusCode, str]] = [
    (grpc.StatusCode.INVALID_ARGUMENT, "InvalidRequestError"),
    (grpc.StatusCode.NOT_FOUND, "AdapterNotFoundError"),
    (grpc.StatusCode.FAILED_PRECONDITION, "AdapterIncompatibleError"),
    (grpc.StatusCode.ALREADY_EXISTS, "RequestConflictError"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "OverloadedError"),
    (grpc.StatusCode.UNAVAILABLE, "ServerUnavailableError"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "DeadlineExceededError"),
    (grpc.StatusCode.UNAUTHENTICATED, "AuthenticationError"),
    (grpc.StatusCode.PERMISSION_DENIED, "PermissionDeniedError"),
    (grpc.StatusCode.INTERNAL, "InternalServerError"),
    (grpc.StatusCode.CANCELLED, "RequestCancelledError"),
    (grpc.StatusCode.ABORTED, "RequestAbortedError"),
    (grpc.StatusCode.DATA_LOSS, "LoraplexError"),
]


def _echo_ids(request: pb.GenerateRequest) -> list[int]:
    return list(request.prompt_token_ids) or [ord(c) for c in request.prompt]


def _usage(n_prompt: int, n_generated: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=n_prompt, generated_tokens=n_generated,
        queue_time_s=0.25, time_to_first_token_s=0.5, total_time_s=1.5,
    )


def _abort_if_asked(prompt: str, prefix: str, context: grpc.ServicerContext) -> None:
    if prompt.startswith(prefix):
        code = grpc.StatusCode[prompt.removeprefix(prefix)]
        context.abort(code, f"fake {code.name}")


def adapter_info(adapter_id: str, **fields: Any) -> pb.AdapterInfo:
    info = pb.AdapterInfo(
        adapter_id=adapter_id, version=2, tier=pb.ADAPTER_TIER_HOST, rank=8,
        target_modules=["q_proj", "v_proj"], host_bytes=4096, active_requests=1,
        content_hash="abc123", path=adapter_id,
        stats=pb.AdapterStats(
            requests=5, host_hits=3, host_misses=2, device_hits=4, device_misses=1,
            loads=2, evictions=1, last_used_unix=1700000000.5, last_load_s=0.125,
        ),
    )
    info.MergeFrom(pb.AdapterInfo(**fields))
    return info


class FakeLoraPlex(pb_grpc.LoraPlexServicer):
    """Records what it receives; answers as the docstring of this module says."""

    def __init__(self) -> None:
        self.generate_requests: list[pb.GenerateRequest] = []
        self.time_remaining: list[float | None] = []
        self.uploads: list[list[pb.UploadAdapterRequest]] = []
        self.stream_ended = threading.Event()  # set when a GenerateStream call terminates

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self.generate_requests.append(request)
        self.time_remaining.append(context.time_remaining())
        _abort_if_asked(request.prompt, "abort:", context)
        if request.prompt == "slow":
            while context.is_active():
                time.sleep(0.01)
        ids = _echo_ids(request)
        return pb.GenerateResponse(
            request_id=request.request_id or "gen-1",
            text="".join(chr(i) for i in ids),
            token_ids=ids,
            finish_reason=pb.FINISH_REASON_LENGTH if request.HasField("max_new_tokens") else pb.FINISH_REASON_STOP,
            usage=_usage(len(ids), len(ids)),
            adapter_id=request.adapter_id,
            adapter_version=3 if request.adapter_id else 0,
        )

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        self.generate_requests.append(request)
        context.add_callback(self.stream_ended.set)
        _abort_if_asked(request.prompt, "abort:", context)
        request_id = request.request_id or "stream-1"
        if request.prompt == "endless":
            for i in range(10_000):  # bounded only so a failing test cannot hang a thread forever
                yield pb.GenerateStreamResponse(request_id=request_id, text="x", token_ids=[i])
                time.sleep(0.005)
            return
        ids = _echo_ids(request)
        for n, token_id in enumerate(ids):
            if n == 2:
                _abort_if_asked(request.prompt, "abort-mid:", context)
            yield pb.GenerateStreamResponse(request_id=request_id, text=chr(token_id), token_ids=[token_id])
        yield pb.GenerateStreamResponse(
            request_id=request_id, finish_reason=pb.FINISH_REASON_STOP, usage=_usage(len(ids), len(ids))
        )

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        if request.path == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter directory {request.path!r}")
        return adapter_info(request.adapter_id, path=request.path, pinned=request.pin)

    def UploadAdapter(
        self, request_iterator: Iterator[pb.UploadAdapterRequest], context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        parts = list(request_iterator)
        self.uploads.append(parts)
        header = parts[0].header
        return adapter_info(header.adapter_id, tier=pb.ADAPTER_TIER_REGISTERED, pinned=header.pin)

    def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        return pb.UnloadAdapterResponse(adapter_id=request.adapter_id, aborted_requests=2 if request.force else 0)

    def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[
            adapter_info("acme/a", tier=pb.ADAPTER_TIER_DEVICE, pinned=True),
            adapter_info("acme/broken", tier=pb.ADAPTER_TIER_REGISTERED, error="DoRA is not supported"),
        ])

    def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        if request.adapter_id != "acme/a":
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown adapter {request.adapter_id!r}")
        return adapter_info(request.adapter_id, tier=pb.ADAPTER_TIER_DEVICE)

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(
            model="tiny-llama", model_type="llama", quantization="nf4", dtype="bfloat16", device="cpu",
            max_model_len=512, vocab_size=320, max_loras=4, max_lora_rank=16, max_num_seqs=8,
            num_kv_blocks=64, block_size=16, server_version="0.1.0", ready=True,
        )


class CallRecorder(grpc.ServerInterceptor):
    """Every call's method and metadata, health checks included."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        self.calls.append((handler_call_details.method, dict(handler_call_details.invocation_metadata)))
        return continuation(handler_call_details)

    def methods(self) -> set[str]:
        return {method for method, _ in self.calls}


@dataclass
class FakeServer:
    address: str
    servicer: FakeLoraPlex
    health: health.HealthServicer
    recorder: CallRecorder

    def set_ready(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(READY_SERVICE, status)


@contextmanager
def serve_fake() -> Iterator[FakeServer]:
    recorder = CallRecorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[recorder])
    servicer = FakeLoraPlex()
    pb_grpc.add_LoraPlexServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake = FakeServer(f"127.0.0.1:{port}", servicer, health_servicer, recorder)
    fake.set_ready(True)
    try:
        yield fake
    finally:
        server.stop(grace=None)


# helpers the client tests share


def free_address() -> str:
    """An address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def make_adapter_dir(root: Path, config: bool = True, safetensors: bool = True, size: int = 2500) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config:
        (root / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16, "peft_type": "LORA"}')
    if safetensors:
        (root / "adapter_model.safetensors").write_bytes(bytes(i % 251 for i in range(size)))
    (root / "adapter_model.bin").write_bytes(b"\x80\x04pickle")  # must never be sent
    (root / "README.md").write_text("notes")
    return root


def assert_plain(value: object) -> None:
    """No protobuf type anywhere inside a returned value."""
    assert not isinstance(value, Message)
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            assert_plain(getattr(value, field.name))
    elif isinstance(value, list):
        for item in value:
            assert_plain(item)
