"""Client (blocking) against a real gRPC server running the fake servicer of conftest.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fake_loraplex import STATUS_ERRORS, FakeServer, assert_plain, free_address, make_adapter_dir, serve_fake

import loraplex_client
from loraplex_client import (
    AdapterInfo,
    AdapterNotFoundError,
    AdapterStats,
    Client,
    DeadlineExceededError,
    GenerateChunk,
    InvalidRequestError,
    LoraplexError,
    Usage,
)

GENERATE = "/loraplex.v1.LoraPlex/Generate"
UPLOAD = "/loraplex.v1.LoraPlex/UploadAdapter"
OPTIONAL_FIELDS = ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "n"]


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    with serve_fake() as server:
        yield server


def test_generate_returns_plain_result(fake_server: FakeServer) -> None:
    with Client(fake_server.address) as client:
        result = client.generate("hi", adapter_id="acme/a", request_id="req-7")
        base = client.generate(prompt_token_ids=[72, 105])

    assert result.text == "hi"
    assert result.token_ids == [ord("h"), ord("i")]
    assert result.finish_reason == "stop"
    assert result.usage == Usage(
        prompt_tokens=2, generated_tokens=2, queue_time_s=0.25, time_to_first_token_s=0.5, total_time_s=1.5
    )
    assert (result.request_id, result.adapter_id, result.adapter_version) == ("req-7", "acme/a", 3)
    assert_plain(result)
    # the base model: no adapter id on either side
    assert (base.text, base.adapter_id, base.adapter_version) == ("Hi", None, 0)
    assert fake_server.servicer.generate_requests[1].adapter_id == ""


def test_only_optional_fields_the_caller_set_are_sent(fake_server: FakeServer) -> None:
    with Client(fake_server.address) as client:
        client.generate("x", temperature=0.0, seed=0, stop="END")
        result = client.generate(
            "x", max_new_tokens=5, temperature=0.5, top_p=0.75, top_k=40, seed=7,
            stop=["a", "b"], stop_token_ids=[2, 3], ignore_eos=True, repetition_penalty=1.25, n=3,
        )
    sparse, full = fake_server.servicer.generate_requests

    # An explicit 0 is set (the server must not apply its default), None is not.
    assert sparse.HasField("temperature") and sparse.HasField("seed")
    assert not any(sparse.HasField(name) for name in ["max_new_tokens", "top_p", "top_k", "repetition_penalty"])
    assert list(sparse.stop) == ["END"]  # one stop string, not one per character
    assert not sparse.ignore_eos and not sparse.stop_token_ids

    assert all(full.HasField(name) for name in OPTIONAL_FIELDS)
    assert (full.max_new_tokens, full.temperature, full.top_p, full.top_k, full.seed) == (5, 0.5, 0.75, 40, 7)
    assert full.repetition_penalty == 1.25 and full.ignore_eos and full.n == 3
    assert list(full.stop) == ["a", "b"] and list(full.stop_token_ids) == [2, 3]
    assert result.finish_reason == "length"


def test_out_of_range_value_is_refused_before_sending(fake_server: FakeServer) -> None:
    with Client(fake_server.address) as client, pytest.raises(InvalidRequestError, match="max_new_tokens"):
        client.generate("x", max_new_tokens=-1)
    assert GENERATE not in fake_server.recorder.methods()


def test_generate_stream_yields_deltas_then_the_final_chunk(fake_server: FakeServer) -> None:
    with Client(fake_server.address) as client:
        chunks = list(client.generate_stream("abc", request_id="s-1"))

    assert [c.text for c in chunks] == ["a", "b", "c", ""]
    assert [c.token_ids for c in chunks] == [[97], [98], [99], []]
    assert {c.request_id for c in chunks} == {"s-1"}
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.generated_tokens == 3
    assert all(isinstance(c, GenerateChunk) for c in chunks)


def test_token_is_sent_as_bearer_metadata_on_every_call(fake_server: FakeServer, tmp_path: Path) -> None:
    with Client(fake_server.address, token="s3cret") as client:
        client.generate("hi")
        list(client.generate_stream("hi"))
        client.load_adapter("acme/a", "acme/a")
        client.upload_adapter("acme/up", make_adapter_dir(tmp_path / "a"))
        client.unload_adapter("acme/a")
        client.list_adapters()
        client.get_adapter("acme/a")
        client.model_info()
        assert client.health()

    assert len(fake_server.recorder.methods()) == 9
    for method, metadata in fake_server.recorder.calls:
        assert metadata.get("authorization") == "Bearer s3cret", method

    with Client(fake_server.address) as anonymous:
        anonymous.generate("hi")
    assert "authorization" not in fake_server.recorder.calls[-1][1]


@pytest.mark.parametrize(("code", "error"), STATUS_ERRORS, ids=lambda v: getattr(v, "name", v))
def test_status_code_maps_to_error_type(fake_server: FakeServer, code: grpc.StatusCode, error: str) -> None:
    with Client(fake_server.address) as client, pytest.raises(LoraplexError) as raised:
        client.generate(f"abort:{code.name}")
    assert type(raised.value) is getattr(loraplex_client, error)
    assert raised.value.code == code
    assert raised.value.details == f"fake {code.name}"


@pytest.mark.parametrize(("code", "error"), STATUS_ERRORS, ids=lambda v: getattr(v, "name", v))
def test_status_code_mid_stream_maps_to_error_type(
    fake_server: FakeServer, code: grpc.StatusCode, error: str
) -> None:
    received: list[GenerateChunk] = []
    with Client(fake_server.address) as client, pytest.raises(LoraplexError) as raised:
        for chunk in client.generate_stream(f"abort-mid:{code.name}"):
            received.append(chunk)
    assert [c.text for c in received] == ["a", "b"]  # the chunks before the failure still arrive
    assert type(raised.value) is getattr(loraplex_client, error)
    assert (raised.value.code, raised.value.details) == (code, f"fake {code.name}")


@pytest.mark.parametrize("how", ["break", "break-held", "close", "with"])
def test_leaving_a_stream_early_cancels_the_server_call(fake_server: FakeServer, how: str) -> None:
    with Client(fake_server.address) as client:
        stream = client.generate_stream("endless")
        if how == "break":
            del stream
            for n, _ in enumerate(client.generate_stream("endless")):
                if n == 3:
                    break
        elif how == "break-held":  # the caller still holds the stream after the loop
            for n, _ in enumerate(stream):
                if n == 3:
                    break
        elif how == "close":
            next(stream)
            stream.close()
        else:
            with stream:
                next(stream)
        # The server's endless stream ends only when the client cancels it.
        assert fake_server.servicer.stream_ended.wait(5)
        if how != "break":
            assert list(stream) == []  # a cancelled stream yields nothing more, raises nothing


def test_default_timeout_and_per_call_override(fake_server: FakeServer) -> None:
    with Client(fake_server.address, timeout=30) as client:
        client.generate("a")
        client.generate("b", timeout=5)
        with pytest.raises(DeadlineExceededError) as raised:
            client.generate("slow", timeout=0.2)
    default, override, _ = fake_server.servicer.time_remaining
    # grpc rounds a deadline on the wire up a little
    assert default is not None and 25 < default < 31
    assert override is not None and 3 < override < 6
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_upload_sends_header_then_both_files_in_chunks(fake_server: FakeServer, tmp_path: Path) -> None:
    local = make_adapter_dir(tmp_path / "adapter", size=2500)
    with Client(fake_server.address) as client:
        info = client.upload_adapter("acme/up", local, pin=True, chunk_size=1000)

    (parts,) = fake_server.servicer.uploads
    assert parts[0].WhichOneof("part") == "header"
    assert (parts[0].header.adapter_id, parts[0].header.pin) == ("acme/up", True)
    chunks = [p.chunk for p in parts[1:]]
    assert all(p.WhichOneof("part") == "chunk" for p in parts[1:])
    names = [c.filename for c in chunks]
    # config first, then the weights in 1000-byte pieces; nothing else (no pickle, no README)
    assert names == ["adapter_config.json"] + ["adapter_model.safetensors"] * 3
    assert all(len(c.data) <= 1000 for c in chunks)
    for name in ["adapter_config.json", "adapter_model.safetensors"]:
        sent = b"".join(c.data for c in chunks if c.filename == name)
        assert sent == (local / name).read_bytes()
    assert (info.adapter_id, info.tier, info.pinned) == ("acme/up", "registered", True)


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_upload_refuses_an_incomplete_directory_locally(
    fake_server: FakeServer, tmp_path: Path, missing: str
) -> None:
    local = make_adapter_dir(
        tmp_path / "adapter",
        config=missing != "adapter_config.json",
        safetensors=missing != "adapter_model.safetensors",
    )
    with Client(fake_server.address) as client, pytest.raises(InvalidRequestError, match=f"^INVALID_ARGUMENT: local_dir: .*{missing}") as raised:
        client.upload_adapter("acme/up", local)
    if missing == "adapter_model.safetensors":
        assert "pickle" in str(raised.value)  # says why the .bin next to it was not used
    assert UPLOAD not in fake_server.recorder.methods()


def test_upload_argument_errors_name_the_argument(fake_server: FakeServer, tmp_path: Path) -> None:
    nowhere, a_file = tmp_path / "nowhere", tmp_path / "a-file"
    a_file.write_text("")
    with Client(fake_server.address) as client:
        with pytest.raises(InvalidRequestError, match=f"local_dir: adapter directory '{nowhere}' does not exist"):
            client.upload_adapter("acme/up", nowhere)
        with pytest.raises(InvalidRequestError, match=f"local_dir: adapter directory '{a_file}' is not a directory"):
            client.upload_adapter("acme/up", a_file)
        with pytest.raises(InvalidRequestError, match="chunk_size: must be positive, got 0"):
            client.upload_adapter("acme/up", make_adapter_dir(tmp_path / "ok"), chunk_size=0)
    assert UPLOAD not in fake_server.recorder.methods()


def test_adapter_calls_return_plain_dataclasses(fake_server: FakeServer) -> None:
    with Client(fake_server.address) as client:
        loaded = client.load_adapter("acme/a", "tenants/acme/a", pin=True)
        listed = client.list_adapters()
        got = client.get_adapter("acme/a")
        unloaded = client.unload_adapter("acme/a", force=True)
        kept = client.unload_adapter("acme/a")
        model = client.model_info()
        with pytest.raises(AdapterNotFoundError, match="acme/nope"):
            client.get_adapter("acme/nope")
        with pytest.raises(AdapterNotFoundError, match="missing"):
            client.load_adapter("acme/x", "missing")

    assert isinstance(loaded, AdapterInfo)
    assert (loaded.adapter_id, loaded.path, loaded.pinned, loaded.tier) == ("acme/a", "tenants/acme/a", True, "host")
    assert (loaded.version, loaded.rank, loaded.target_modules, loaded.error) == (2, 8, ["q_proj", "v_proj"], None)
    assert loaded.stats == AdapterStats(
        requests=5, host_hits=3, host_misses=2, device_hits=4, device_misses=1,
        loads=2, evictions=1, last_used_unix=1700000000.5, last_load_s=0.125,
    )
    assert [(a.adapter_id, a.tier, a.pinned, a.error) for a in listed] == [
        ("acme/a", "device", True, None),
        ("acme/broken", "registered", False, "DoRA is not supported"),
    ]
    assert got.tier == "device"
    assert (unloaded.aborted_requests, kept.aborted_requests) == (2, 0)
    assert (model.model, model.quantization, model.max_loras, model.block_size, model.ready) == (
        "tiny-llama", "nf4", 4, 16, True
    )
    for value in [loaded, listed, got, unloaded, model]:
        assert_plain(value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.tier = "device"  # type: ignore[misc]


def test_health_follows_the_ready_service(fake_server: FakeServer) -> None:
    with Client(fake_server.address) as client:
        assert client.health() is True
        fake_server.set_ready(False)
        assert client.health() is False  # live ("" is SERVING) but not warmed up
        fake_server.health.set("loraplex.v1.LoraPlex", 0)  # UNKNOWN
        assert client.health() is False
    with Client(free_address()) as unreachable:
        assert unreachable.health(timeout=2) is False


def test_context_manager_closes_the_channel(fake_server: FakeServer) -> None:
    with Client(fake_server.address) as client:
        assert client.generate("hi").text == "hi"
        stream = client.generate_stream("endless")
        next(stream)
    # closing ends the call still running, on both sides
    assert fake_server.servicer.stream_ended.wait(5)
    with pytest.raises(ValueError, match="closed"):
        client.generate("hi")


def test_samples_and_cached_tokens_are_read_from_the_wire() -> None:
    from loraplex_client import FinishReason, Sample
    from loraplex_client._convert import generate_chunk, generate_result
    from loraplex_proto.v1 import loraplex_pb2 as pb

    one = generate_result(pb.GenerateResponse(text="a", token_ids=[1], finish_reason=pb.FINISH_REASON_STOP))
    assert one.samples == [Sample(0, "a", [1], FinishReason.STOP)]  # n = 1: sample 0 is the result itself
    many = generate_result(pb.GenerateResponse(
        text="a", token_ids=[1], finish_reason=pb.FINISH_REASON_STOP, usage=pb.Usage(cached_prompt_tokens=32),
        samples=[
            pb.Sample(index=0, text="a", token_ids=[1], finish_reason=pb.FINISH_REASON_STOP),
            pb.Sample(index=1, text="bc", token_ids=[2, 3], finish_reason=pb.FINISH_REASON_LENGTH),
        ],
    ))
    assert many.samples == [Sample(0, "a", [1], FinishReason.STOP), Sample(1, "bc", [2, 3], FinishReason.LENGTH)]
    assert many.usage.cached_prompt_tokens == 32
    assert generate_chunk(pb.GenerateStreamResponse(text="x", token_ids=[4], index=2)).index == 2
