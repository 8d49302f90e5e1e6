"""Registration proves an adapter's safetensors file whole before anything is registered:
every tensor the header lists is in the file, with the bytes its dtype and shape need."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import TinyModel
from loraplex.lora.adapter_spec import WEIGHTS_FILE, AdapterError, read_spec


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header: dict[str, Any] | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _first_tensor(header: dict[str, Any]) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def _dtype_lie(data: bytes) -> bytes:
    header, body = split(data)
    header[_first_tensor(header)]["dtype"] = "F16"
    return join(header, body)


def _shape_lie(data: bytes) -> bytes:
    header, body = split(data)
    info = header[_first_tensor(header)]
    info["shape"] = [info["shape"][0] * 2, info["shape"][1]]
    return join(header, body)


def _duplicate(data: bytes) -> bytes:
    header, body = split(data)
    key = _first_tensor(header)
    text = json.dumps(header)
    entry = json.dumps({key: header[key]})[1:-1]
    return join(text[:-1] + ", " + entry + "}", body)


def _missing_bytes(data: bytes) -> bytes:
    """A tensor listed whose bytes are not in the file (its data removed, the header kept)."""
    header, body = split(data)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    begin = header[last]["data_offsets"][0]
    return join(header, body[:begin])


def _overlap(data: bytes) -> bytes:
    header, body = split(data)
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]  # two tensors on the same bytes
    return join(header, body)


CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "cut in half": (lambda d: d[: len(d) // 2], r"truncated: the header promises \d+ bytes of tensor data, the file holds \d+"),
    "cut inside the header": (lambda d: d[:40], r"truncated: the header promises \d+ bytes"),
    "huge header length": (lambda d: (1 << 40).to_bytes(8, "little") + d[8:], r"not a safetensors file \(header size"),
    "empty": (lambda d: b"", r"not a safetensors file"),
    "random bytes": (lambda d: bytes((i * 37 + 11) % 256 for i in range(len(d))), r"not a safetensors file|cannot read"),
    "dtype lie": (_dtype_lie, r"F16 \[\d+, \d+\] needs \d+ bytes, the header gives it \d+"),
    "shape lie": (_shape_lie, r"needs \d+ bytes, the header gives it \d+"),
    "duplicate tensor": (_duplicate, r"lists '.*lora_[AB].*' twice"),
    "tensor bytes missing": (_missing_bytes, r"truncated: the header promises"),
    "overlapping tensors": (_overlap, r"a gap or an overlap"),
    "trailing bytes": (lambda d: d + b"\0" * 16, r"16 bytes after the last tensor"),
}


@pytest.fixture(scope="module")
def layers(llama_engine: Any) -> Any:
    return llama_engine.lora.layer_infos


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_safetensors_file_is_refused_with_the_reason(
    case: str, tiny_llama: TinyModel, tmp_path: Path, layers: Any
) -> None:
    mutate, reason = CASES[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_llama.adapters["qv-r4"], adapter)
    read_spec(adapter, layers, 16)  # whole, it passes
    weights = adapter / WEIGHTS_FILE
    weights.write_bytes(mutate(weights.read_bytes()))
    with pytest.raises(AdapterError, match=reason):
        read_spec(adapter, layers, 16)


def test_the_engine_registers_nothing_for_a_truncated_file(llama_engine: Any, tiny_llama: TinyModel) -> None:
    """LoadAdapter's path: the id stays unknown, and a known id keeps serving its old version."""
    root = Path(llama_engine.store.roots[0])
    broken = root / "broken" / "truncated"
    shutil.copytree(tiny_llama.adapters["qv-r4"], broken)
    try:
        data = (broken / WEIGHTS_FILE).read_bytes()
        (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
        with pytest.raises(AdapterError, match="truncated"):
            llama_engine.register_adapter("broken/truncated", "broken/truncated")
        assert llama_engine.lookup_adapter("broken/truncated") is None
        before = llama_engine.lookup_adapter("qv-r4")
        with pytest.raises(AdapterError, match="truncated"):
            llama_engine.register_adapter("qv-r4", "broken/truncated")  # a new version of a known id
        assert llama_engine.lookup_adapter("qv-r4") is before
    finally:
        shutil.rmtree(root / "broken")
