"""The real gRPC server on 127.0.0.1, driven through the client SDK.

Tokens are compared with the in-process engine (same base, same adapters); cancel and
deadline are checked through the engine's own state; each error status is produced."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import POISON_TOKEN, TinyModel, engine_config, make_adapter, poisoned_runner, wait_idle
from loraplex.api.server import BackgroundServer
from loraplex.config import ApiConfig, SchedulerConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex_client import (
    AdapterIncompatibleError,
    AdapterNotFoundError,
    Client,
    DeadlineExceededError,
    InternalServerError,
    InvalidRequestError,
    OverloadedError,
    RequestAbortedError,
    RequestConflictError,
)

BASE_ADAPTERS = ["qv-r4", "all-r8-rslora", "all-r16-patterns", "attn-r8-layer0"]


def _variant(src: Path, dst: Path, seed: int) -> None:
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(dst / "adapter_model.safetensors")
    save_file({k: torch.randn(v.shape, generator=g) * v.std() for k, v in tensors.items()}, dst / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def adapter_root(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api-adapters")
    for name in BASE_ADAPTERS:
        shutil.copytree(tiny_llama.adapters[name], root / name)
    for i in range(4):  # eight adapters in all, two of them namespaced
        _variant(tiny_llama.adapters[BASE_ADAPTERS[i]], root / ("acme" if i < 2 else "globex") / f"v{i}", seed=100 + i)
    make_adapter(tiny_llama.path, root / "dora", seed=0, r=4, target_modules=["q_proj"], use_dora=True)
    return root


ALL_ADAPTERS = [*BASE_ADAPTERS, "acme/v0", "acme/v1", "globex/v2", "globex/v3"]


def _start(
    tiny: TinyModel, root: Path, *, api: ApiConfig | None = None, max_upload_bytes: int = 1 << 30, **overrides: Any
) -> BackgroundServer:
    config = engine_config(tiny, roots=(str(root),), max_loras=4, max_upload_bytes=max_upload_bytes)
    if overrides:
        config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, **overrides))
    server_config = ServerConfig(engine=config, api=api or ApiConfig(port=0, metrics_port=0, http_port=0))
    server = BackgroundServer(server_config, Engine(config))
    server.start()
    return server


@pytest.fixture(scope="module")
def server(tiny_llama: TinyModel, adapter_root: Path) -> Iterator[BackgroundServer]:
    server = _start(tiny_llama, adapter_root)
    yield server
    server.stop()


def _address(server: BackgroundServer) -> str:
    return f"127.0.0.1:{server.server.port}"


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(_address(server), timeout=60) as c:
        yield c


def _engine(server: BackgroundServer) -> Engine:
    return server.server.engine


def _text(tokenizer: Any, prompt: list[int], tokens: list[int]) -> str:
    """What a stream's text should be: the decode of prompt + output past the prompt's own decode."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    context = prompt[-5:]  # the detokenizer's context (CONTEXT_TOKENS)
    return decode(context + tokens)[len(decode(context)) :]


def test_32_concurrent_streams_match_peft(
    client: Client, server: BackgroundServer, tiny_llama: TinyModel, llama_peft: Any, adapter_root: Path
) -> None:
    """Each stream's tokens equal PEFT's greedy generate with its adapter (the namespaced ones are
    copies or new weights of the four PEFT adapters: those are compared with a PEFT model of their own)."""
    jobs = [([5 + i, 17, 33 + 2 * i, 9, 40 + i], ([*ALL_ADAPTERS, None])[i % 9]) for i in range(32)]
    variants = _variant_peft(tiny_llama, adapter_root)
    expected = [
        variants.greedy(p, a.replace("/", "_"), 10) if a is not None and "/" in a else llama_peft.greedy(p, a, 10)
        for p, a in jobs
    ]

    def stream(job: tuple[list[int], str | None]) -> tuple[list[int], str, str | None]:
        prompt, adapter = job
        tokens: list[int] = []
        text = ""
        reason = None
        for chunk in client.generate_stream(prompt_token_ids=prompt, adapter_id=adapter, max_new_tokens=10, ignore_eos=True):
            tokens.extend(chunk.token_ids)
            text += chunk.text
            reason = chunk.finish_reason
        return tokens, text, reason

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, jobs))
    tokenizer = _engine(server).tokenizer
    for (tokens, text, reason), exp, (prompt, adapter) in zip(results, expected, jobs):
        assert tokens == exp, adapter
        assert text == _text(tokenizer, prompt, exp) and reason == "length"
    wait_idle(_engine(server))


def _variant_peft(tiny: TinyModel, adapter_root: Path) -> Any:
    """PEFT with the four namespaced variants loaded under their ids."""
    from conftest import PeftReference

    names = ["acme/v0", "acme/v1", "globex/v2", "globex/v3"]
    view = TinyModel(tiny.arch, tiny.path, {n.replace("/", "_"): adapter_root / n for n in names}, adapter_root)
    return PeftReference(view)


def test_unary_generate_and_usage(client: Client) -> None:
    result = client.generate(prompt_token_ids=[5, 6, 7], adapter_id="acme/v0", max_new_tokens=4, ignore_eos=True)
    assert len(result.token_ids) == 4 and result.finish_reason == "length"
    assert result.usage.prompt_tokens == 3 and result.usage.generated_tokens == 4
    assert result.usage.time_to_first_token_s > 0 and result.usage.total_time_s >= result.usage.time_to_first_token_s
    assert result.adapter_id == "acme/v0" and result.adapter_version >= 1


def test_n_samples_seeds_and_cached_prompt_tokens(client: Client, server: BackgroundServer) -> None:
    prompt = list(range(100, 140))  # 40 tokens: 2 full KV blocks of 16 (seen by no other test)
    args: dict[str, Any] = dict(
        prompt_token_ids=prompt, adapter_id="acme/v1", max_new_tokens=6, temperature=0.8, top_k=50, ignore_eos=True
    )
    result = client.generate(n=3, seed=7, logprobs=1, **args)
    assert [s.index for s in result.samples] == [0, 1, 2] and result.usage.cached_prompt_tokens == 0
    # each sample's own logprobs; the top-level ones are sample 0's
    assert all(s.logprobs is not None and [lp.token_id for lp in s.logprobs] == s.token_ids for s in result.samples)
    assert result.logprobs == result.samples[0].logprobs
    assert (result.text, result.token_ids, result.finish_reason) == (
        result.samples[0].text, result.samples[0].token_ids, result.samples[0].finish_reason
    )
    assert result.usage.prompt_tokens == 40 and result.usage.generated_tokens == 3 * 6
    # Sample i equals a request of one sample seeded 7 + i, which finds the prompt's blocks cached.
    singles = [client.generate(seed=7 + i, **args) for i in range(3)]
    assert [s.token_ids for s in result.samples] == [r.token_ids for r in singles]
    assert [r.usage.cached_prompt_tokens for r in singles] == [32, 32, 32] and len(singles[0].samples) == 1
    assert len({tuple(s.token_ids) for s in result.samples}) > 1

    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    reasons: dict[int, str] = {}
    chunks = list(client.generate_stream(n=3, seed=7, **args))
    for chunk in chunks:
        tokens[chunk.index].extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            reasons[chunk.index] = chunk.finish_reason
    assert [tokens[i] for i in range(3)] == [s.token_ids for s in result.samples]
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    usage = chunks[-1].usage
    assert usage is not None and usage.generated_tokens == 18 and usage.cached_prompt_tokens == 32
    for n in (0, 17):
        with pytest.raises(InvalidRequestError, match="n must be in"):
            client.generate(n=n, **args)
    wait_idle(_engine(server))
    assert _engine(server).blocks.num_used_blocks == 0


def test_cancelled_stream_frees_blocks_and_slot(client: Client, server: BackgroundServer) -> None:
    engine = _engine(server)
    wait_idle(engine)
    free = engine.blocks.num_free_blocks
    stream = client.generate_stream(prompt_token_ids=list(range(5, 60)), adapter_id="qv-r4", max_new_tokens=400, ignore_eos=True)
    received = 0
    for chunk in stream:
        received += len(chunk.token_ids)
        if received >= 3:
            break
    version = engine.store.resolve("qv-r4")
    assert version.slot_refs == 1 and version.holders == 1  # running: one slot reference, one holder
    stream.close()
    wait_idle(engine)
    assert engine.blocks.num_free_blocks == free
    assert version.slot_refs == 0 and version.holders == 0


def test_deadline_exceeded_frees_everything(client: Client, server: BackgroundServer) -> None:
    engine = _engine(server)
    wait_idle(engine)
    free = engine.blocks.num_free_blocks
    with pytest.raises(DeadlineExceededError):
        client.generate(prompt_token_ids=[5, 6, 7], adapter_id="all-r8-rslora", max_new_tokens=500, ignore_eos=True, timeout=0.3)
    wait_idle(engine)
    assert engine.blocks.num_free_blocks == free
    assert engine.store.resolve("all-r8-rslora").slot_refs == 0


def test_loaded_and_uploaded_adapters_serve_the_next_request(
    client: Client, tiny_llama: TinyModel, adapter_root: Path, tmp_path: Path
) -> None:
    shutil.copytree(tiny_llama.adapters["all-r16-patterns"], adapter_root / "runtime" / "loaded")
    info = client.load_adapter("runtime/loaded", "runtime/loaded")
    assert info.adapter_id == "runtime/loaded" and info.rank == 16 and info.path == "runtime/loaded"
    via_load = client.generate(prompt_token_ids=[8, 9, 10], adapter_id="runtime/loaded", max_new_tokens=6, ignore_eos=True)
    direct = client.generate(prompt_token_ids=[8, 9, 10], adapter_id="all-r16-patterns", max_new_tokens=6, ignore_eos=True)
    assert via_load.token_ids == direct.token_ids

    local = tmp_path / "local-adapter"
    _variant(tiny_llama.adapters["qv-r4"], local, seed=77)
    info = client.upload_adapter("acme/uploaded", local)
    assert info.adapter_id == "acme/uploaded" and info.version == 1  # versions count per id
    uploaded = client.generate(prompt_token_ids=[8, 9, 10], adapter_id="acme/uploaded", max_new_tokens=6, ignore_eos=True)
    base = client.generate(prompt_token_ids=[8, 9, 10], max_new_tokens=6, ignore_eos=True)
    assert uploaded.token_ids != base.token_ids
    listed = {a.adapter_id: a for a in client.list_adapters()}
    assert {"runtime/loaded", "acme/uploaded"} <= set(listed)
    assert listed["acme/uploaded"].stats.requests >= 1
    got = client.get_adapter("acme/uploaded")
    assert got.tier in ("host", "device") and got.content_hash


def test_error_statuses(client: Client, server: BackgroundServer, tiny_llama: TinyModel) -> None:
    with pytest.raises(InvalidRequestError, match="top_p"):
        client.generate("hi", top_p=1.5)
    with pytest.raises(InvalidRequestError, match="prompt"):
        client.generate(prompt="hi", prompt_token_ids=[1])
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        client.generate(prompt_token_ids=[10**6])
    with pytest.raises(InvalidRequestError, match="adapter_id"):
        client.generate("hi", adapter_id="bad id!")
    with pytest.raises(AdapterNotFoundError, match="no-such-adapter"):
        client.generate("hi", adapter_id="no-such-adapter")
    with pytest.raises(AdapterNotFoundError, match="no-such-adapter"):
        client.get_adapter("no-such-adapter")
    with pytest.raises(AdapterIncompatibleError, match="DoRA"):
        client.load_adapter("dora", "dora")
    with pytest.raises(AdapterIncompatibleError, match="outside the adapter roots"):
        client.load_adapter("escape", "../../etc")
    with pytest.raises(AdapterNotFoundError, match="'no/such/dir' does not exist under the adapter roots"):
        client.load_adapter("x", "no/such/dir")
    with pytest.raises(InvalidRequestError, match="path"):
        client.load_adapter("x", "")

    # ALREADY_EXISTS: a request id already in flight
    first = client.generate_stream(prompt_token_ids=[5, 6], max_new_tokens=200, ignore_eos=True, request_id="dup-1")
    next(first)
    with pytest.raises(RequestConflictError, match="dup-1"):
        client.generate(prompt_token_ids=[5, 6], request_id="dup-1")
    first.close()


def test_internal_error_names_the_request_and_others_keep_running(client: Client, server: BackgroundServer) -> None:
    engine = _engine(server)
    poison = POISON_TOKEN
    with poisoned_runner(engine):
        healthy = client.generate_stream(prompt_token_ids=[5, 6, 7], adapter_id="qv-r4", max_new_tokens=30, ignore_eos=True)
        next(healthy)
        with pytest.raises(InternalServerError, match=r"poisoned-1.*injected device failure"):
            client.generate(prompt_token_ids=[poison, 6, 7], request_id="poisoned-1", max_new_tokens=5)
        rest = list(healthy)
        assert rest[-1].finish_reason == "length"
    after = client.generate(prompt_token_ids=[5, 6], max_new_tokens=2, ignore_eos=True)
    assert after.finish_reason == "length" and len(after.token_ids) == 2


def test_unload_waits_or_forces(client: Client, server: BackgroundServer, tiny_llama: TinyModel, adapter_root: Path) -> None:
    shutil.copytree(tiny_llama.adapters["qv-r4"], adapter_root / "temp" / "a")
    client.load_adapter("temp/a", "temp/a")
    stream = client.generate_stream(prompt_token_ids=[5, 6], adapter_id="temp/a", max_new_tokens=300, ignore_eos=True)
    next(stream)
    result = client.unload_adapter("temp/a", force=True)
    assert result.aborted_requests == 1
    with pytest.raises(RequestAbortedError) as err:
        list(stream)
    assert err.value.code is grpc.StatusCode.ABORTED and "unloaded" in err.value.details

    client.load_adapter("temp/b", "temp/a")
    done: list[str] = []
    stream = client.generate_stream(prompt_token_ids=[5, 6], adapter_id="temp/b", max_new_tokens=40, ignore_eos=True)
    first = next(stream)
    reader = threading.Thread(target=lambda: done.extend(c.finish_reason or "" for c in [first, *stream]))
    reader.start()
    assert client.unload_adapter("temp/b").aborted_requests == 0  # waited for the stream
    reader.join(10)
    assert done[-1] == "length"


def test_model_info_and_health(client: Client, server: BackgroundServer) -> None:
    info = client.model_info()
    assert info.quantization == "nf4" and info.max_loras == 4 and info.ready
    assert client.health()


def test_scheduler_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)


def test_server_reflection_lists_the_services(server: BackgroundServer) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(_address(server)) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"loraplex.v1.LoraPlex", "grpc.health.v1.Health"} <= services
        described = database.FindFileContainingSymbol("loraplex.v1.GenerateRequest")
        assert "GenerateRequest" in [m.name for m in described.message_type]


def test_upload_over_the_size_cap_is_refused_and_leaves_nothing(tiny_llama: TinyModel, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    server = _start(tiny_llama, root, max_upload_bytes=4096)
    try:
        with Client(_address(server), timeout=60) as client:
            with pytest.raises(OverloadedError, match="larger than the limit of 4096 bytes"):
                client.upload_adapter("acme/too-big", tiny_llama.adapters["all-r16-patterns"])
            with pytest.raises(AdapterNotFoundError):
                client.get_adapter("acme/too-big")
        assert not any((root / ".uploads").iterdir())  # the partial upload was removed
    finally:
        server.stop()


def test_auto_register_reads_adapter_files_off_the_event_loop(
    client: Client, server: BackgroundServer, tiny_llama: TinyModel, adapter_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Generate naming an unregistered directory registers it (reading and hashing its files)
    on a worker thread; LoadAdapter likewise. The event loop only ever waits for it."""
    engine = _engine(server)
    event_loop_thread = server._thread
    store = engine.store
    register = store.register
    threads: list[threading.Thread] = []

    def recording_register(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return register(*args, **kwargs)

    monkeypatch.setattr(store, "register", recording_register)
    shutil.copytree(tiny_llama.adapters["qv-r4"], adapter_root / "auto" / "fresh")
    shutil.copytree(tiny_llama.adapters["qv-r4"], adapter_root / "auto" / "loaded")
    via_auto = client.generate(prompt_token_ids=[5, 6, 7], adapter_id="auto/fresh", max_new_tokens=3, ignore_eos=True)
    assert via_auto.adapter_id == "auto/fresh" and via_auto.adapter_version >= 1
    assert len(threads) == 1  # registered once, by the Generate
    client.load_adapter("auto/loaded", "auto/loaded")
    again = client.generate(prompt_token_ids=[5, 6, 7], adapter_id="auto/fresh", max_new_tokens=3, ignore_eos=True)
    assert again.token_ids == via_auto.token_ids
    assert len(threads) == 2  # the LoadAdapter; the second Generate found it registered
    assert event_loop_thread not in threads
