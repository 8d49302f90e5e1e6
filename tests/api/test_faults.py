"""Faults while adapters are stored and read, through a real server: a broken file refused
whole, a full disk during an upload, a read error while an adapter loads or registers. Each
ends only the call it hits, with a status naming the problem, and leaves no partial file."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import TinyModel, engine_config
from loraplex.api import uploads
from loraplex.api.server import BackgroundServer
from loraplex.config import ApiConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.lora import adapter_spec
from loraplex.lora.adapter_spec import WEIGHTS_FILE
from loraplex_client import (
    AdapterIncompatibleError,
    AdapterNotFoundError,
    Client,
    LoraplexError,
    OverloadedError,
    ServerUnavailableError,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tiny_llama: TinyModel) -> Path:
    root = tmp_path_factory.mktemp("fault-adapters")
    shutil.copytree(tiny_llama.adapters["qv-r4"], root / "good")
    return root


@pytest.fixture(scope="module")
def server(tiny_llama: TinyModel, root: Path) -> Iterator[BackgroundServer]:
    config = engine_config(tiny_llama, roots=(str(root),), max_loras=2)
    server = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=0, http_port=0)), Engine(config))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.server.port}", timeout=60) as c:
        yield c


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def _uploaded_files(root: Path) -> list[Path]:
    """Files in any upload directory: the staging one (<root>/.uploads) and the homes beside
    each id's own directory (<root>/acme/.uploads/<name>/<content hash>)."""
    return [p for p in _files_under(root) if ".uploads" in p.relative_to(root).parts]


def _healthy(client: Client) -> None:
    """The server still serves a request with an adapter correctly after the fault."""
    with_adapter = client.generate(prompt_token_ids=[5, 6, 7], adapter_id="good", max_new_tokens=3, ignore_eos=True)
    assert with_adapter.finish_reason == "length" and len(with_adapter.token_ids) == 3


def test_a_truncated_file_is_refused_by_load_and_upload(client: Client, root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(root / "good", broken)
    data = (broken / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    shutil.copytree(broken, root / "cut")
    with pytest.raises(AdapterIncompatibleError, match="truncated: the header promises"):
        client.load_adapter("cut", "cut")
    with pytest.raises(AdapterIncompatibleError, match="truncated: the header promises"):
        client.upload_adapter("acme/cut", broken)
    for adapter_id in ("cut", "acme/cut"):
        with pytest.raises(AdapterNotFoundError):
            client.get_adapter(adapter_id)
    assert _uploaded_files(root) == []  # the refused upload left nothing
    _healthy(client)


def test_a_full_disk_during_an_upload_ends_that_call_and_leaves_nothing(
    client: Client, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = {"bytes": 0}

    def full_disk(fh: Any, data: bytes) -> None:
        written["bytes"] += len(data)
        if written["bytes"] > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        fh.write(data)

    monkeypatch.setattr(uploads.Upload, "_write", staticmethod(full_disk))
    with pytest.raises(OverloadedError, match=r"cannot store the upload \(writing adapter_\w+\.\w+\): No space left"):
        client.upload_adapter("acme/full", root / "good", chunk_size=512)
    assert _uploaded_files(root) == []
    monkeypatch.undo()
    info = client.upload_adapter("acme/full", root / "good")  # the disk has room again: the same upload works
    assert info.adapter_id == "acme/full" and info.version == 1
    _healthy(client)


def test_a_read_error_while_loading_fails_only_the_requests_waiting_for_it(
    client: Client, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(root / "good", root / "flaky")
    client.load_adapter("flaky", "flaky")
    read_files = adapter_spec.read_files
    failures = {"left": 1}

    def failing_read(path: Path) -> tuple[bytes, bytes]:
        if path.name == "flaky" and failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return read_files(path)

    monkeypatch.setattr(adapter_spec, "read_files", failing_read)
    with pytest.raises(LoraplexError, match="cannot read the adapter files: Input/output error") as err:
        client.generate(prompt_token_ids=[5, 6], adapter_id="flaky", max_new_tokens=2, ignore_eos=True)
    assert err.value.code.name == "FAILED_PRECONDITION"
    _healthy(client)
    # The disk reads again: the next request loads the adapter and runs on it.
    again = client.generate(prompt_token_ids=[5, 6, 7], adapter_id="flaky", max_new_tokens=3, ignore_eos=True)
    good = client.generate(prompt_token_ids=[5, 6, 7], adapter_id="good", max_new_tokens=3, ignore_eos=True)
    assert again.token_ids == good.token_ids and client.get_adapter("flaky").error is None


def test_a_read_error_while_registering_is_unavailable(
    client: Client, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(root / "good", root / "unreadable")

    def failing_hash(directory: Path) -> str:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(adapter_spec, "hash_adapter_files", failing_hash)
    with pytest.raises(ServerUnavailableError, match="cannot read the adapter files: Input/output error"):
        client.load_adapter("unreadable", "unreadable")
    monkeypatch.undo()
    assert client.load_adapter("unreadable", "unreadable").version == 1
    _healthy(client)
