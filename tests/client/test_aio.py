"""AsyncClient against the fake server: the same behaviour as Client, through grpc.aio.

Each test drives its coroutine with asyncio.run (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fake_loraplex import STATUS_ERRORS, FakeServer, assert_plain, free_address, make_adapter_dir, serve_fake

import loraplex_client
from loraplex_client import (
    AdapterNotFoundError,
    AsyncClient,
    AsyncGenerateStream,
    DeadlineExceededError,
    GenerateChunk,
    InvalidRequestError,
    LoraplexError,
    Usage,
)

UPLOAD = "/loraplex.v1.LoraPlex/UploadAdapter"


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    with serve_fake() as server:
        yield server


def test_generate_and_stream(fake_server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake_server.address) as client:
            result = await client.generate("hi", adapter_id="acme/a", temperature=0.0)
            chunks = [c async for c in client.generate_stream("abc")]

        assert (result.text, result.token_ids, result.finish_reason) == ("hi", [104, 105], "stop")
        assert (result.adapter_id, result.adapter_version) == ("acme/a", 3)
        assert result.usage == Usage(2, 2, 0.25, 0.5, 1.5)
        assert [c.text for c in chunks] == ["a", "b", "c", ""]
        assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
        assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None

    asyncio.run(main())
    sent = fake_server.servicer.generate_requests[0]
    assert sent.HasField("temperature") and not sent.HasField("max_new_tokens")


def test_token_is_sent_on_every_call(fake_server: FakeServer, tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncClient(fake_server.address, token="s3cret") as client:
            await client.generate("hi")
            [c async for c in client.generate_stream("hi")]
            await client.load_adapter("acme/a", "acme/a")
            await client.upload_adapter("acme/up", make_adapter_dir(tmp_path / "a"))
            await client.unload_adapter("acme/a")
            await client.list_adapters()
            await client.get_adapter("acme/a")
            await client.model_info()
            assert await client.health()

    asyncio.run(main())
    assert len(fake_server.recorder.methods()) == 9
    for method, metadata in fake_server.recorder.calls:
        assert metadata.get("authorization") == "Bearer s3cret", method


@pytest.mark.parametrize(("code", "error"), STATUS_ERRORS, ids=lambda v: getattr(v, "name", v))
def test_status_code_maps_to_error_type(fake_server: FakeServer, code: grpc.StatusCode, error: str) -> None:
    async def main() -> tuple[LoraplexError, LoraplexError, list[GenerateChunk]]:
        received: list[GenerateChunk] = []
        async with AsyncClient(fake_server.address) as client:
            with pytest.raises(LoraplexError) as unary:
                await client.generate(f"abort:{code.name}")
            with pytest.raises(LoraplexError) as mid_stream:
                async for chunk in client.generate_stream(f"abort-mid:{code.name}"):
                    received.append(chunk)
        return unary.value, mid_stream.value, received

    unary, mid_stream, received = asyncio.run(main())
    for raised in (unary, mid_stream):
        assert type(raised) is getattr(loraplex_client, error)
        assert (raised.code, raised.details) == (code, f"fake {code.name}")
    assert [c.text for c in received] == ["a", "b"]


@pytest.mark.parametrize("how", ["break", "break-held", "close", "with"])
def test_leaving_a_stream_early_cancels_the_server_call(fake_server: FakeServer, how: str) -> None:
    async def read_three(stream: AsyncGenerateStream) -> None:
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break

    async def main() -> list[GenerateChunk]:
        rest: list[GenerateChunk] = []
        async with AsyncClient(fake_server.address) as client:
            if how == "break":
                await read_three(client.generate_stream("endless"))
            else:
                stream = client.generate_stream("endless")
                if how == "break-held":  # the caller still holds the stream after the loop
                    await read_three(stream)
                elif how == "close":
                    await stream.__anext__()
                    stream.close()
                else:
                    async with stream:
                        await stream.__anext__()
                rest = [c async for c in stream]  # nothing more, and no error
            # The server's endless stream ends only when the client cancels it. Wait in a
            # thread: asyncio finalizes a generator left by `break` on a later loop turn.
            ended = await asyncio.to_thread(fake_server.servicer.stream_ended.wait, 5)
            assert ended, "the server-side call is still running"
        return rest

    assert asyncio.run(main()) == []


def test_default_timeout_raises_deadline_exceeded(fake_server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake_server.address, timeout=0.2) as client:
            assert (await client.generate("fast", timeout=30)).text == "fast"
            with pytest.raises(DeadlineExceededError):
                await client.generate("slow")

    asyncio.run(main())
    assert fake_server.servicer.time_remaining[0] is not None and fake_server.servicer.time_remaining[0] > 25


def test_upload_and_refusal(fake_server: FakeServer, tmp_path: Path) -> None:
    local = make_adapter_dir(tmp_path / "ok", size=2500)
    incomplete = make_adapter_dir(tmp_path / "bin-only", safetensors=False)

    async def main() -> None:
        async with AsyncClient(fake_server.address) as client:
            info = await client.upload_adapter("acme/up", local, chunk_size=1000)
            assert (info.adapter_id, info.tier) == ("acme/up", "registered")
            with pytest.raises(InvalidRequestError, match="local_dir: .*adapter_model.safetensors"):
                await client.upload_adapter("acme/bad", incomplete)

    asyncio.run(main())
    (parts,) = fake_server.servicer.uploads
    assert parts[0].header.adapter_id == "acme/up"
    assert [p.chunk.filename for p in parts[1:]] == ["adapter_config.json"] + ["adapter_model.safetensors"] * 3
    sent = b"".join(p.chunk.data for p in parts[1:] if p.chunk.filename == "adapter_model.safetensors")
    assert sent == (local / "adapter_model.safetensors").read_bytes()
    assert [m for m, _ in fake_server.recorder.calls].count(UPLOAD) == 1


def test_adapter_calls_and_health(fake_server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake_server.address) as client:
            listed = await client.list_adapters()
            assert [(a.adapter_id, a.tier, a.error) for a in listed] == [
                ("acme/a", "device", None), ("acme/broken", "registered", "DoRA is not supported"),
            ]
            assert (await client.unload_adapter("acme/a", force=True)).aborted_requests == 2
            model = await client.model_info()
            assert (model.model, model.max_lora_rank) == ("tiny-llama", 16)
            with pytest.raises(AdapterNotFoundError):
                await client.get_adapter("acme/nope")
            for value in [listed, model, await client.load_adapter("acme/a", "acme/a")]:
                assert_plain(value)

            assert await client.health() is True
            fake_server.set_ready(False)
            assert await client.health() is False
        async with AsyncClient(free_address()) as unreachable:
            assert await unreachable.health(timeout=2) is False

    asyncio.run(main())


def test_context_manager_closes_the_channel(fake_server: FakeServer) -> None:
    async def main() -> AsyncClient:
        async with AsyncClient(fake_server.address) as client:
            stream = client.generate_stream("endless")
            await stream.__anext__()
        await asyncio.to_thread(fake_server.servicer.stream_ended.wait, 5)
        with pytest.raises(grpc.aio.UsageError, match="closed"):
            await client.generate("hi")
        return client

    asyncio.run(main())
    assert fake_server.servicer.stream_ended.is_set()
