"""The blocking client: one gRPC channel to a loraplex server, one method per RPC.

    with Client("localhost:50051", token="...") as client:
        client.load_adapter("acme/support-v3", "acme/support-v3")
        print(client.generate("Hello", adapter_id="acme/support-v3").text)
        for chunk in client.generate_stream("Hello", max_new_tokens=32):
            print(chunk.text, end="")

A Client is safe to share between threads (grpc channels are). AsyncClient (aio.py) is the
same API for asyncio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

import grpc

from loraplex_client import _convert, _upload
from loraplex_client._channel import auth_metadata, channel_credentials, deadline
from loraplex_client._convert import GenerateOptions
from loraplex_client.errors import error_from_rpc
from loraplex_client.stream import GenerateStream
from loraplex_client.types import AdapterInfo, GenerateResult, ModelInfo, TokenizeResult, UnloadResult
from loraplex_proto import health
from loraplex_proto.v1 import loraplex_pb2 as pb
from loraplex_proto.v1 import loraplex_pb2_grpc as pb_grpc

# A probe must answer even when the server is unreachable and no default timeout is set.
HEALTH_TIMEOUT_S = 5.0


class Client:
    """Blocking loraplex client.

    token: sent on every call as `authorization: Bearer <token>` metadata.
    tls: None = an insecure channel; True = TLS with the system's root certificates;
        or any grpc.ChannelCredentials.
    timeout: default deadline of each call in seconds (None: none); a method's own
        `timeout=` overrides it.
    Failed calls raise LoraplexError subclasses (errors.py).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
    ) -> None:
        credentials = channel_credentials(tls)
        if credentials is None:
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(target, credentials)
        self._stub = pb_grpc.LoraPlexStub(self._channel)
        self._health_check = health.check_stub(self._channel)
        self._metadata = auth_metadata(token)
        self._timeout = timeout

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=deadline(timeout, self._timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> GenerateResult:
        """Run one request to completion. Arguments left None take the server's defaults."""
        request = _convert.generate_request(prompt, **options)
        return _convert.generate_result(self._call(self._stub.Generate, request, timeout))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateOptions],
    ) -> GenerateStream:
        """Start a request and iterate its chunks as the engine produces them.

        Leaving the iteration early cancels the request on the server (see stream.py);
        timeout bounds the whole stream, not each chunk.
        """
        request = _convert.generate_request(prompt, **options)
        call = self._stub.GenerateStream(
            request, timeout=deadline(timeout, self._timeout), metadata=self._metadata
        )
        return GenerateStream(call)

    def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        adapter_id: str | None = None,
        timeout: float | None = None,
    ) -> TokenizeResult:
        """The prompt ids the server makes of a prompt, or of chat messages with the adapter's
        chat template (else the base model's), exactly as generate would; nothing runs."""
        request = _convert.tokenize_request(prompt, messages, adapter_id)
        return _convert.tokenize_result(self._call(self._stub.Tokenize, request, timeout))

    def load_adapter(
        self, adapter_id: str, path: str, pin: bool = False, *, timeout: float | None = None
    ) -> AdapterInfo:
        """Register a PEFT LoRA directory that lies under the server's adapter root."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path, pin=pin)
        return _convert.adapter_info(self._call(self._stub.LoadAdapter, request, timeout))

    def upload_adapter(
        self,
        adapter_id: str,
        local_dir: str | Path,
        pin: bool = False,
        chunk_size: int = 1 << 20,
        *,
        timeout: float | None = None,
    ) -> AdapterInfo:
        """Send a local PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

        Raises InvalidRequestError naming local_dir, before anything is sent, when the
        directory or either file is missing.
        """
        _upload.check_chunk_size(chunk_size)
        files = _upload.adapter_files(local_dir)
        requests = _upload.upload_requests(adapter_id, files, pin, chunk_size)
        return _convert.adapter_info(self._call(self._stub.UploadAdapter, requests, timeout))

    def unload_adapter(
        self, adapter_id: str, force: bool = False, *, timeout: float | None = None
    ) -> UnloadResult:
        """Forget an adapter; its running requests finish first unless force aborts them."""
        request = pb.UnloadAdapterRequest(adapter_id=adapter_id, force=force)
        return _convert.unload_result(self._call(self._stub.UnloadAdapter, request, timeout))

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        """Every registered adapter id (its current version), sorted by id."""
        response = self._call(self._stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [_convert.adapter_info(a) for a in response.adapters]

    def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        """One adapter's current version: tier, rank, targets, bytes, use counters."""
        request = pb.GetAdapterRequest(adapter_id=adapter_id)
        return _convert.adapter_info(self._call(self._stub.GetAdapter, request, timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The base model and the server's limits (max_model_len, slots, KV blocks, ...)."""
        response = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return _convert.model_info(response)

    def health(self, *, timeout: float | None = None) -> bool:
        """True once the server is ready to serve (warmed up); False when unreachable or not ready."""
        request = health.HealthCheckRequest(service=health.READY_SERVICE)
        default = HEALTH_TIMEOUT_S if self._timeout is None else self._timeout
        try:
            response = self._health_check(
                request, timeout=deadline(timeout, default), metadata=self._metadata
            )
        except grpc.RpcError:
            # Unreachable, still warming up, or no health service: all mean "not ready".
            return False
        return bool(response.status == health.SERVING)

    def close(self) -> None:
        """Close the channel; calls still running end with RequestCancelledError."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
