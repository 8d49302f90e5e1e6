"""Each rule once: adapter ids, request ids, sampling ranges and option defaults give the same
verdict wherever they are checked. Verdicts are written out here, not read from the code."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import TinyModel, make_engine
from loraplex import cli, settings
from loraplex.api.validation import parse_generate
from loraplex.config import ApiConfig, EngineConfig, ModelConfig, ServerConfig
from loraplex.engine.request import SamplingParams
from loraplex.lora.adapter_version import AdapterNotFoundError
from loraplex.rules import InvalidFieldError, adapter_id_problem
from loraplex_proto.v1 import loraplex_pb2 as pb

ADAPTER_IDS = {
    "acme/support-v3": True,
    "a..b": True,  # dots inside a name are fine
    "a.b/c_d-e": True,
    "x" * 128: True,
    "..": False,
    "a/../b": False,
    "a/./b": False,
    "/abs": False,
    "trailing/": False,
    "a//b": False,
    "bad id!": False,
    "x" * 129: False,
    "": False,
}


def test_the_adapter_id_rule() -> None:
    assert {i: adapter_id_problem(i) is None for i in ADAPTER_IDS} == ADAPTER_IDS


@pytest.fixture(scope="module")
def id_root(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for every id a path could mean, valid or not (`a/../b` would mean `b`)."""
    root = tmp_path_factory.mktemp("ids")
    for path in ["acme/support-v3", "a..b", "a.b/c_d-e", "x" * 128, "b", "a/b", "trailing"]:
        shutil.copytree(tiny_llama.adapters["qv-r4"], root / path)
    return root


def test_the_store_and_the_api_agree_on_adapter_ids(tiny_llama: TinyModel, id_root: Path) -> None:
    engine = make_engine(tiny_llama, register=False, roots=(str(id_root),))
    try:
        for adapter_id, valid in ADAPTER_IDS.items():
            # The API (every call that names an adapter goes through this rule).
            request = pb.GenerateRequest(prompt="hi", adapter_id=adapter_id)
            if valid:
                assert parse_generate(request, max_model_len=64).adapter_id == adapter_id
            elif adapter_id:  # an empty id is "no adapter" in a GenerateRequest
                with pytest.raises(InvalidFieldError) as err:
                    parse_generate(request, max_model_len=64)
                assert err.value.field == "adapter_id"
            # Auto-register: a directory of that name, registered only under a valid id.
            if valid:
                assert engine.resolve_adapter(adapter_id).adapter_id == adapter_id
            else:
                with pytest.raises(AdapterNotFoundError):
                    engine.resolve_adapter(adapter_id)
            # Explicit registration of a good directory under that id.
            if valid:
                assert engine.register_adapter(adapter_id, "b").adapter_id == adapter_id
            else:
                with pytest.raises(InvalidFieldError, match="invalid") as err:
                    engine.register_adapter(adapter_id, "b")
                assert err.value.field == "adapter_id"
        registered = {info.adapter_id for info in engine.adapter_infos()}
        assert registered == {i for i, valid in ADAPTER_IDS.items() if valid}
    finally:
        engine.close()


REQUEST_IDS = {"req-1": True, "a" * 128: True, "x:y/z": True, "has space": False, "a" * 129: False, "é": False}


def test_the_engine_and_the_api_agree_on_request_ids(llama_engine: Any) -> None:
    for request_id, valid in REQUEST_IDS.items():
        request = pb.GenerateRequest(prompt_token_ids=[5, 6], request_id=request_id)
        if valid:
            assert parse_generate(request, max_model_len=64).request_id == request_id
            assert llama_engine.add_request(prompt_token_ids=[5, 6], request_id=request_id) == request_id
            llama_engine.abort(request_id)
        else:
            with pytest.raises(InvalidFieldError) as api:
                parse_generate(request, max_model_len=64)
            with pytest.raises(InvalidFieldError) as engine:
                llama_engine.add_request(prompt_token_ids=[5, 6], request_id=request_id)
            assert api.value.field == engine.value.field == "request_id"
    while llama_engine.has_unfinished():
        llama_engine.step()


# field -> values out of its range, as a GenerateRequest can carry them
OUT_OF_RANGE: dict[str, list[Any]] = {
    "max_new_tokens": [0],
    "temperature": [-1.0, math.inf, math.nan],
    "top_p": [0.0, 1.5, math.nan],
    "top_k": [-1],
    "repetition_penalty": [0.0, -2.0, math.inf],
    "seed": [2**63],
    "stop": [[""], ["x" * 257], ["s"] * 17],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in OUT_OF_RANGE.items() for v in vs])
def test_the_api_and_sampling_params_agree_on_sampling_ranges(field: str, value: Any) -> None:
    request = pb.GenerateRequest(prompt="hi")
    if field == "stop":
        request.stop.extend(value)
    else:
        setattr(request, field, value)
    with pytest.raises(InvalidFieldError) as api:
        parse_generate(request, max_model_len=10**6)
    with pytest.raises(InvalidFieldError) as engine:
        SamplingParams(**{field: tuple(value) if field == "stop" else value})
    assert api.value.field == engine.value.field == field


def test_unset_generate_fields_take_the_sampling_defaults() -> None:
    args = parse_generate(pb.GenerateRequest(prompt="hi"), max_model_len=1000)
    assert args.params == SamplingParams()
    assert SamplingParams().max_new_tokens == 64 and SamplingParams().temperature == 0.0  # as the proto documents


def test_option_defaults_and_choices_are_the_config_fields() -> None:
    values = settings.resolve(cli.build_parser().parse_args(["serve", "--model", "/m"]), {})
    # Every option left at its default builds the config that the dataclasses' own defaults make.
    assert settings.build_config(values) == ServerConfig(engine=EngineConfig(model=ModelConfig("/m")), api=ApiConfig())
    assert settings.BY_NAME["quantization"].choices == ("nf4", "none")
    assert settings.BY_NAME["dtype"].choices == ("auto", "bfloat16", "float16", "float32")
    assert settings.BY_NAME["device"].choices == ("auto", "cpu", "cuda")
    assert settings.BY_NAME["cpu_nf4_kernel"].choices == ("fused", "exact")
    assert settings.BY_NAME["adapter_root"].many and settings.BY_NAME["auth_token"].many
    assert settings.BY_NAME["num_kv_blocks"].type is int and settings.BY_NAME["kv_memory_fraction"].type is float
    for option in settings.OPTIONS:
        if option.field is not None:
            config, name = option.field
            spec = {f.name: f for f in dataclasses.fields(config)}[name]
            if spec.default is not dataclasses.MISSING:
                assert option.default == spec.default, option.name


def test_a_config_error_names_its_option_by_the_field_it_carries() -> None:
    values, sources = settings.resolve_with_sources(
        cli.build_parser().parse_args(["serve", "--model", "/m", "--num-kv-blocks", "0"]), {}
    )
    with pytest.raises(InvalidFieldError) as err:
        settings.build_config(values, sources)
    assert err.value.field == "num_kv_blocks"  # the option, from the config field num_blocks
    assert str(err.value) == "num_kv_blocks (from --num-kv-blocks): num_blocks must be > 0, got 0"
