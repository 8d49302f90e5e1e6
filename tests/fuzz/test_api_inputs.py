"""Property tests over what a caller sends a real server: GenerateRequest fields and
UploadAdapter message sequences. Every call ends with a definite status that is never
INTERNAL or UNKNOWN (a bad value is INVALID_ARGUMENT naming its field), and afterwards the
server serves a request exactly as before.

Budgets: the "ci" profile in `make test`, "fuzz" in `make fuzz` (tests/conftest.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import TinyModel, engine_config, wait_idle
from loraplex.api.access import upload_home
from loraplex.api.server import BackgroundServer
from loraplex.config import ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex_proto.v1 import loraplex_pb2 as pb
from loraplex_proto.v1 import loraplex_pb2_grpc as pb_grpc

NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
UPLOAD_CAP = 64 << 10


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_llama: TinyModel) -> Path:
    root = tmp_path_factory.mktemp("fuzz-adapters")
    shutil.copytree(tiny_llama.adapters["qv-r4"], root / "qv-r4")
    return root


@pytest.fixture(scope="module")
def server(tiny_llama: TinyModel, root: Path) -> Iterator[BackgroundServer]:
    config = engine_config(tiny_llama, roots=(str(root),), max_loras=2, max_upload_bytes=UPLOAD_CAP)
    server = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=0, http_port=0)), Engine(config))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.server.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.LoraPlexStub:
    return pb_grpc.LoraPlexStub(channel)


REFERENCE = pb.GenerateRequest(prompt_token_ids=[5, 6, 7], adapter_id="qv-r4", max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(stub: pb_grpc.LoraPlexStub) -> list[int]:
    return list(stub.Generate(REFERENCE, timeout=60).token_ids)


def _still_serving(stub: pb_grpc.LoraPlexStub, server: BackgroundServer, reference: list[int]) -> None:
    assert list(stub.Generate(REFERENCE, timeout=60).token_ids) == reference
    wait_idle(server.server.engine)


def _status(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in NEVER, f"{e.code()}: {e.details()}"
        if e.code() is grpc.StatusCode.INVALID_ARGUMENT:
            assert e.details(), "INVALID_ARGUMENT must name the problem"
        return e.code()
    return grpc.StatusCode.OK


floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
texts = st.text(max_size=40) | st.just("") | st.text(min_size=300, max_size=400)
generate_requests = st.builds(
    pb.GenerateRequest,
    prompt=st.one_of(st.just(""), texts, st.just("x" * 3000)),
    prompt_token_ids=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 600), max_size=8),
    adapter_id=st.sampled_from(["", "qv-r4", "no/such", "../x", "a" * 200, "qv-r4/../qv-r4"]) | st.text(max_size=12),
    max_new_tokens=st.none() | st.integers(0, 2**32 - 1) | st.integers(1, 8),
    temperature=st.none() | floats,
    top_p=st.none() | floats,
    top_k=st.none() | st.integers(-(2**31), 2**31 - 1),
    seed=st.none() | st.integers(0, 2**64 - 1),
    stop=st.lists(texts, max_size=20),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 600), max_size=4),
    ignore_eos=st.booleans(),
    repetition_penalty=st.none() | floats,
    n=st.none() | st.integers(0, 2**32 - 1) | st.integers(1, 4),
    request_id=st.just("") | st.text(max_size=10) | st.text(min_size=129, max_size=140),
)


@given(request=generate_requests, streaming=st.booleans())
@example(request=pb.GenerateRequest(prompt_token_ids=[5], max_new_tokens=2**32 - 1), streaming=False)
@example(request=pb.GenerateRequest(prompt_token_ids=[2**32 - 1]), streaming=True)
@example(request=pb.GenerateRequest(prompt="hi", temperature=float("nan")), streaming=False)
@example(request=pb.GenerateRequest(prompt="hi", top_p=float("inf")), streaming=False)
@example(request=pb.GenerateRequest(prompt="hi", stop=["x" * 300]), streaming=False)
@example(request=pb.GenerateRequest(prompt="hi", seed=2**64 - 1), streaming=False)
@example(request=pb.GenerateRequest(prompt="", prompt_token_ids=[]), streaming=False)
@example(request=pb.GenerateRequest(prompt_token_ids=[5], stop_token_ids=[2**32 - 1]), streaming=True)
@example(request=pb.GenerateRequest(prompt_token_ids=[5], n=2**32 - 1), streaming=True)
@example(request=pb.GenerateRequest(prompt_token_ids=list(range(5, 40)), n=3, seed=1, temperature=1.0), streaming=True)
def test_generate_request_fields(
    request: pb.GenerateRequest, streaming: bool, stub: pb_grpc.LoraPlexStub, server: BackgroundServer, reference: list[int]
) -> None:
    # A valid request may generate up to max_model_len tokens: a short deadline keeps the
    # example fast, and DEADLINE_EXCEEDED is a definite status too.
    if streaming:
        _status(lambda: list(stub.GenerateStream(request, timeout=3)))
    else:
        _status(lambda: stub.Generate(request, timeout=3))
    wait_idle(server.server.engine)


def test_generate_request_serves_correctly_afterwards(
    stub: pb_grpc.LoraPlexStub, server: BackgroundServer, reference: list[int]
) -> None:
    _still_serving(stub, server, reference)


def test_invalid_utf8_in_a_stop_string(channel: grpc.Channel, server: BackgroundServer, stub: Any, reference: list[int]) -> None:
    """Bytes that are not UTF-8 where the proto says string: refused, never INTERNAL."""
    raw = pb.GenerateRequest(prompt_token_ids=[5, 6], max_new_tokens=2, stop=["QQQQ"]).SerializeToString()
    raw = raw.replace(b"QQQQ", b"\xff\xfe\xc3\x28")
    call = channel.unary_unary("/loraplex.v1.LoraPlex/Generate", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    code = _status(lambda: call(raw, timeout=10))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    _still_serving(stub, server, reference)


FILES = ["adapter_config.json", "adapter_model.safetensors"]
messages = st.one_of(
    st.builds(lambda a, p: pb.UploadAdapterRequest(header=pb.UploadAdapterHeader(adapter_id=a, pin=p)),
              st.sampled_from(["fuzz/a", "", "../x", "qv-r4"]) | st.text(max_size=8), st.booleans()),
    st.builds(lambda f, d: pb.UploadAdapterRequest(chunk=pb.UploadAdapterChunk(filename=f, data=d)),
              st.sampled_from([*FILES, "adapter_model.bin", "../evil", ""]), st.binary(max_size=64) | st.just(b"\0" * (UPLOAD_CAP + 1))),
)


def _real_upload(root: Path) -> list[pb.UploadAdapterRequest]:
    parts = [pb.UploadAdapterRequest(header=pb.UploadAdapterHeader(adapter_id="fuzz/real"))]
    for name in FILES:
        parts.append(pb.UploadAdapterRequest(chunk=pb.UploadAdapterChunk(filename=name, data=(root / "qv-r4" / name).read_bytes())))
    return parts


@given(sequence=st.lists(messages, max_size=6), real=st.sampled_from(["none", "reversed", "no-header", "header-twice", "whole"]))
@example(sequence=[], real="none")
@example(sequence=[], real="reversed")
@example(sequence=[], real="no-header")
@example(sequence=[], real="header-twice")
def test_upload_message_sequences(
    sequence: list[pb.UploadAdapterRequest], real: str, stub: pb_grpc.LoraPlexStub, server: BackgroundServer, root: Path,
) -> None:
    parts = _real_upload(root)
    if real == "reversed":
        sequence = [*sequence, *reversed(parts)]
    elif real == "no-header":
        sequence = [*sequence, *parts[1:]]
    elif real == "header-twice":
        sequence = [parts[0], *parts]
    elif real == "whole":
        sequence = [*parts, *sequence]
    code = _status(lambda: stub.UploadAdapter(iter(sequence), timeout=30))
    if code is not grpc.StatusCode.OK:
        # Upload files: the staging directory (<root>/.uploads) and the homes beside each id's
        # own directory (access.upload_home: "a/b" -> a/.uploads/b/<content hash>).
        leftovers = [p for p in root.rglob("*") if p.is_file() and ".uploads" in p.relative_to(root).parts]
        registered = {i.adapter_id for i in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters}
        # A failed upload leaves no file, except the homes of adapters it did not touch.
        assert all(
            any(str(p.relative_to(root)).startswith(upload_home(r) + "/") for r in registered) for p in leftovers
        ), leftovers


def test_uploads_serve_correctly_afterwards(stub: pb_grpc.LoraPlexStub, server: BackgroundServer, reference: list[int]) -> None:
    _still_serving(stub, server, reference)
