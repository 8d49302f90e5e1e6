"""Property tests over adapter files a caller controls: adapter_config.json and the
safetensors file. Whatever they hold, registration either accepts them (and the tensors
then load) or refuses them with an AdapterError naming the problem (FAILED_PRECONDITION on
the wire): never another exception, which the API would answer INTERNAL.

Budgets: the "ci" profile in `make test`, "fuzz" in `make fuzz` (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import TinyModel
from loraplex.lora.adapter_spec import CONFIG_FILE, WEIGHTS_FILE, AdapterError, read_spec
from loraplex.lora.adapter_weights import load_weights

MAX_RANK = 16

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=8)
CONFIG_KEYS = [
    "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "bias", "peft_type",
    "use_dora", "modules_to_save", "fan_in_fan_out", "layers_to_transform", "lora_bias", "task_type",
]


@pytest.fixture(scope="module")
def layers(llama_engine: Any) -> Any:
    return llama_engine.lora.layer_infos


@pytest.fixture(scope="module")
def good(tiny_llama: TinyModel) -> tuple[dict[str, Any], bytes]:
    path = tiny_llama.adapters["qv-r4"]
    return json.loads((path / CONFIG_FILE).read_text()), (path / WEIGHTS_FILE).read_bytes()


def _check(directory: Path, layers: Any) -> None:
    """Registration's checks, then the host load for what they accept: AdapterError or success."""
    try:
        spec = read_spec(directory, layers, MAX_RANK)
    except AdapterError:
        return
    with contextlib.suppress(AdapterError):
        load_weights(spec, torch.float32)


def _write(directory: Path, config: Any, weights: bytes) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (directory / CONFIG_FILE).write_text(text)
    (directory / WEIGHTS_FILE).write_bytes(weights)
    return directory


@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=4), drop=st.sets(st.sampled_from(CONFIG_KEYS), max_size=3))
# Found by this test (each raised TypeError, OverflowError or re.error: INTERNAL on the wire):
@example(changes={"target_modules": 5}, drop=set())
@example(changes={"rank_pattern": []}, drop=set())
@example(changes={"r": float("inf")}, drop=set())
@example(changes={"lora_alpha": "x"}, drop=set())
@example(changes={"r": 10**30}, drop=set())
@example(changes={"alpha_pattern": {"q_proj": None}}, drop=set())
@example(changes={"target_modules": [None, 3]}, drop=set())
@example(changes={"target_modules": "("}, drop=set())
@example(changes={"use_rslora": "yes"}, drop=set())
@example(changes={}, drop={"r", "target_modules"})
def test_adapter_config_mutations(
    changes: dict[str, Any], drop: set[str], good: tuple[dict[str, Any], bytes], layers: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config, weights = good
    mutated = {k: v for k, v in config.items() if k not in drop} | changes
    _check(_write(tmp_path_factory.getbasetemp() / "fuzz-config", mutated, weights), layers)


@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
@example(text="[]")
@example(text='{"r": Infinity}')
@example(text='{"r": NaN}')
@example(text="")
def test_adapter_config_raw_text(text: str, good: tuple[dict[str, Any], bytes], layers: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    _check(_write(tmp_path_factory.getbasetemp() / "fuzz-config-text", text, good[1]), layers)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _join(header: Any, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


header_fields = st.sampled_from(["dtype", "shape", "data_offsets"])
field_values = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "XX", ""]),
    st.lists(st.integers(-5, 2**40), max_size=4),
    json_values,
)


@given(
    cut=st.none() | st.integers(0, 4000),
    edits=st.lists(st.tuples(st.integers(0, 3), header_fields, field_values), max_size=3),
    drop=st.lists(st.integers(0, 3), max_size=2),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
    size_field=st.none() | st.integers(0, 2**64 - 1),
)
@example(cut=None, edits=[], drop=[], flips=[], size_field=2**64 - 1)
@example(cut=None, edits=[(0, "shape", [0, 128])], drop=[], flips=[], size_field=None)
@example(cut=None, edits=[(0, "data_offsets", [-1, 5])], drop=[], flips=[], size_field=None)
@example(cut=None, edits=[(1, "dtype", "I8")], drop=[], flips=[], size_field=None)
@example(cut=None, edits=[(0, "dtype", [])], drop=[], flips=[], size_field=None)  # was TypeError: unhashable
@example(cut=None, edits=[], drop=[0], flips=[], size_field=None)
def test_safetensors_mutations(
    cut: int | None, edits: list[tuple[int, str, Any]], drop: list[int], flips: list[tuple[int, int]],
    size_field: int | None, good: tuple[dict[str, Any], bytes], layers: Any, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    config, weights = good
    header, body = _split(weights)
    keys = sorted(k for k in header if k != "__metadata__")
    for index, name, value in edits:
        header[keys[index % len(keys)]][name] = value
    for index in drop:
        header.pop(keys[index % len(keys)], None)
    data = bytearray(_join(header, body))
    for position, byte in flips:
        if data:
            data[position % len(data)] = byte
    if size_field is not None:
        data[:8] = size_field.to_bytes(8, "little")
    if cut is not None:
        data = data[:cut]
    _check(_write(tmp_path_factory.getbasetemp() / "fuzz-weights", config, bytes(data)), layers)


@given(data=st.binary(max_size=300))
def test_safetensors_random_bytes(data: bytes, good: tuple[dict[str, Any], bytes], layers: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    _check(_write(tmp_path_factory.getbasetemp() / "fuzz-random", good[0], data), layers)
