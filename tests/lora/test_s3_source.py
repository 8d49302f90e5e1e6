"""The s3:// adapter source against a real S3 protocol server (moto's server mode, started
here on 127.0.0.1), through the gRPC server and the client SDK.

The reference for every s3:// adapter is the same PEFT directory registered from the local
adapter root on the same server: its greedy tokens must be the s3:// adapter's."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TinyModel, engine_config
from loraplex.api.server import BackgroundServer
from loraplex.config import ApiConfig, LoraConfig, ServerConfig
from loraplex.engine.engine import Engine
from loraplex.engine.prompts import ChatMessage
from loraplex.lora import s3_source
from loraplex.lora.adapter_chat_template import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE
from loraplex.lora.adapter_spec import CONFIG_FILE, WEIGHTS_FILE
from loraplex.rules import InvalidFieldError
from loraplex_client import AdapterIncompatibleError, AdapterNotFoundError, Client

BUCKET = "adapters"
ROOT = f"s3://{BUCKET}/team"
PROMPT = [8, 9, 10]
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A moto S3 server on an OS-chosen port; boto3 reaches it through AWS_ENDPOINT_URL_S3."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}.items():
            mp.setenv(name, value)
        s3_source.reset_client()
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
        s3_source.reset_client()
    server.stop()


def put_adapter(client: Any, source: Path, prefix: str, files: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)) -> str:
    for name in files:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=(source / name).read_bytes())
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def local_root(tmp_path_factory: pytest.TempPathFactory, tiny_llama: TinyModel) -> Path:
    root = tmp_path_factory.mktemp("s3-local-root")
    for name in ("all-r16-patterns", "all-r8-rslora"):  # the references, registered from disk
        shutil.copytree(tiny_llama.adapters[name], root / "local" / name)
    return root


@pytest.fixture(scope="module")
def server(s3: Any, tiny_llama: TinyModel, local_root: Path) -> Iterator[BackgroundServer]:
    config = engine_config(tiny_llama, roots=(str(local_root), ROOT), max_loras=2)
    server = BackgroundServer(ServerConfig(engine=config, api=ApiConfig(port=0, metrics_port=0, http_port=0)), Engine(config))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[Client]:
    host, port = server.server.config.api.host, server.server.port
    with Client(f"{host}:{port}", timeout=120) as c:
        yield c


def _greedy(client: Client, adapter_id: str | None) -> list[int]:
    return list(client.generate(prompt_token_ids=PROMPT, adapter_id=adapter_id, max_new_tokens=8, ignore_eos=True).token_ids)


def test_load_by_s3_uri(s3: Any, client: Client, tiny_llama: TinyModel, local_root: Path) -> None:
    source = tiny_llama.adapters["all-r16-patterns"]
    uri = put_adapter(s3, source, "team/patterns")
    info = client.load_adapter("from-s3", uri)
    assert info.path == uri and info.tier == "registered"  # nothing downloaded yet: config and header only
    client.load_adapter("reference", "local/all-r16-patterns")
    tokens = _greedy(client, "from-s3")
    assert tokens == _greedy(client, "reference")
    assert tokens != _greedy(client, None)  # the adapter changes the output
    (entry,) = (local_root / s3_source.CACHE_DIR / BUCKET / "team" / "patterns").iterdir()
    assert (entry / WEIGHTS_FILE).read_bytes() == (source / WEIGHTS_FILE).read_bytes()
    # A relative LoadAdapter path not under the local root is looked for under the s3:// root.
    assert client.load_adapter("relative", "patterns").path == uri


def test_auto_register_by_s3_root(s3: Any, client: Client, tiny_llama: TinyModel) -> None:
    uri = put_adapter(s3, tiny_llama.adapters["all-r8-rslora"], "team/acme/rs")
    client.load_adapter("ref-rs", "local/all-r8-rslora")
    tokens = _greedy(client, "acme/rs")  # never loaded: found as <root>/acme/rs/
    assert tokens == _greedy(client, "ref-rs")
    assert client.get_adapter("acme/rs").path == uri


def test_missing_key_is_not_found(s3: Any, client: Client, tiny_llama: TinyModel) -> None:
    with pytest.raises(AdapterNotFoundError, match="adapter_config.json does not exist"):
        client.load_adapter("nope", f"{ROOT}/nope")
    put_adapter(s3, tiny_llama.adapters["qv-r4"], "team/half", files=(CONFIG_FILE,))  # the weights are missing
    with pytest.raises(AdapterNotFoundError, match="adapter_model.safetensors does not exist"):
        client.load_adapter("half", f"{ROOT}/half")
    with pytest.raises(AdapterNotFoundError):
        client.generate(prompt_token_ids=PROMPT, adapter_id="team-nope", max_new_tokens=2)
    with pytest.raises(AdapterIncompatibleError, match="outside the adapter roots"):
        client.load_adapter("elsewhere", f"s3://{BUCKET}/other/qv")


def test_object_changed_after_registration_is_refused(s3: Any, client: Client, tiny_llama: TinyModel, tmp_path: Path) -> None:
    uri = put_adapter(s3, tiny_llama.adapters["qv-r4"], "team/tampered")
    client.load_adapter("tampered", uri)
    tensors = load_file(tiny_llama.adapters["qv-r4"] / WEIGHTS_FILE)
    save_file({k: torch.full_like(v, 0.5) for k, v in tensors.items()}, tmp_path / WEIGHTS_FILE)  # same shapes
    s3.put_object(Bucket=BUCKET, Key=f"team/tampered/{WEIGHTS_FILE}", Body=(tmp_path / WEIGHTS_FILE).read_bytes())
    with pytest.raises(AdapterIncompatibleError, match="changed in S3 since the adapter was registered"):
        client.generate(prompt_token_ids=PROMPT, adapter_id="tampered", max_new_tokens=2)
    # Loading it again registers what is there now (a new version), which then serves.
    assert client.load_adapter("tampered", uri).version == 2
    assert len(_greedy(client, "tampered")) == 8


def test_damaged_cache_is_downloaded_again(s3: Any, client: Client, tiny_llama: TinyModel, local_root: Path) -> None:
    uri = put_adapter(s3, tiny_llama.adapters["all-r16-patterns"], "team/cached")
    client.load_adapter("reference", "local/all-r16-patterns")
    client.load_adapter("cached", uri)
    expected = _greedy(client, "cached")
    (entry,) = (local_root / s3_source.CACHE_DIR / BUCKET / "team" / "cached").iterdir()
    weights = entry / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + b"\x00" * 8)  # the last values of the last tensor
    client.unload_adapter("cached")
    client.load_adapter("cached", uri)  # same objects: the same cache entry, now damaged
    assert _greedy(client, "cached") == expected == _greedy(client, "reference")
    assert weights.read_bytes() == good


def test_an_s3_adapter_brings_its_own_chat_template(
    s3: Any, server: BackgroundServer, client: Client, tokenizer: Any, local_root: Path
) -> None:
    """chat_template.jinja, else tokenizer_config.json's chat_template, under the prefix: as
    for a directory, the prompt is the one transformers' apply_chat_template makes with it."""
    messages = [{"role": "user", "content": "Who are you?"}]
    own = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<bot>"
    by_config = "{% for m in messages %}{{ m['content'] }} | {% endfor %}BOT:"
    adapter = local_root / "local" / "all-r8-rslora"
    uri = put_adapter(s3, adapter, "team/chatty")
    s3.put_object(Bucket=BUCKET, Key=f"team/chatty/{CHAT_TEMPLATE_FILE}", Body=own.encode())
    put_adapter(s3, adapter, "team/configured")
    s3.put_object(Bucket=BUCKET, Key=f"team/configured/{TOKENIZER_CONFIG_FILE}", Body=json.dumps({"chat_template": by_config}).encode())
    put_adapter(s3, adapter, "team/plain")
    engine = server.server.engine
    for adapter_id, path, template in [
        ("chatty", uri, own), ("configured", f"{ROOT}/configured", by_config), ("plain", f"{ROOT}/plain", tokenizer.chat_template),
    ]:
        client.load_adapter(adapter_id, path)
        expected = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, return_dict=False)
        ids = engine.chat_prompt_ids([ChatMessage(**m) for m in messages], engine.lookup_adapter(adapter_id))
        assert ids == list(expected), adapter_id
    assert engine.lookup_adapter("chatty").spec.chat_template == own


def test_s3_locations() -> None:
    with pytest.raises(InvalidFieldError, match="needs a local adapter root"):
        LoraConfig(adapter_roots=(ROOT,))
    with pytest.raises(InvalidFieldError, match="not a valid S3 bucket"):
        LoraConfig(adapter_roots=("/tmp", "s3://A_B/x"))
    root = s3_source.parse_s3_uri(ROOT + "/")
    assert root == s3_source.S3Location(BUCKET, "team") and root.child("acme/v1").uri == f"{ROOT}/acme/v1"
    assert root.contains(root.child("x")) and not root.contains(s3_source.parse_s3_uri(f"s3://{BUCKET}/teamx/y"))
    with pytest.raises(ValueError, match=r"'\.\.' parts"):
        root.child("x/../../other")
