"""Options from flags, LORAPLEX_* variables and a TOML file: precedence, errors, masking."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraplex import cli, settings


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "loraplex.toml"
    path.write_text(text)
    return str(path)


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    config = toml(tmp_path, 'model = "/m/file"\nmax_loras = 3\nmax_lora_rank = 32\n[api]\nport = 6001\nmetrics_port = 9500\n')
    env = {"LORAPLEX_MAX_LORAS": "5", "LORAPLEX_PORT": "6002"}

    values, sources = settings.resolve_with_sources(parse("--config", config, "--max-loras", "7"), env)
    assert values["max_loras"] == 7 and sources["max_loras"] == "--max-loras"  # flag
    assert values["port"] == 6002 and sources["port"] == "$LORAPLEX_PORT"  # env over file
    assert values["max_lora_rank"] == 32 and sources["max_lora_rank"] == f"file {config}"  # file over default
    assert values["metrics_port"] == 9500  # from a [table]: tables only group keys
    assert values["block_size"] == 16 and sources["block_size"] == "default"
    assert settings.resolve(parse("--config", config), env)["max_loras"] == 5
    assert settings.resolve(parse("--config", config), {})["max_loras"] == 3
    assert settings.resolve(parse(), {})["max_loras"] == 8
    # The file may also come from the environment.
    assert settings.resolve(parse(), {"LORAPLEX_CONFIG": config})["max_lora_rank"] == 32


def test_prefix_caching_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    def config(*flags: str, env: dict[str, str] | None = None) -> bool:
        return bool(settings.build_config(settings.resolve(parse("--model", "/m", *flags), env or {})).engine.cache.prefix_caching)

    assert config() is True
    assert config("--no-prefix-caching") is False
    assert config(env={"LORAPLEX_PREFIX_CACHING": "false"}) is False
    assert config("--config", toml(tmp_path, "prefix_caching = false\n")) is False
    assert config("--prefix-caching", env={"LORAPLEX_PREFIX_CACHING": "0"}) is True


def test_metrics_options(tmp_path: Path) -> None:
    values = settings.resolve(parse("--model", "/m", "--metrics-port", "0"), {"LORAPLEX_METRICS_TOP_ADAPTERS": "20"})
    config = settings.build_config(values)
    assert config.api.metrics_port == 0 and config.api.metrics_top_adapters == 20
    defaults = settings.build_config(settings.resolve(parse("--model", "/m"), {}))
    assert defaults.api.metrics_port == 9400 and defaults.api.metrics_top_adapters == 0


def test_lists_and_booleans_from_every_source(tmp_path: Path) -> None:
    config = toml(tmp_path, 'adapter_root = ["/a", "/b"]\nauto_register = false\n')
    assert settings.resolve(parse("--config", config), {})["adapter_root"] == ("/a", "/b")
    assert settings.resolve(parse("--config", config), {})["auto_register"] is False
    env = {"LORAPLEX_ADAPTER_ROOT": "/c, /d", "LORAPLEX_AUTO_REGISTER": "yes"}
    assert settings.resolve(parse("--config", config), env)["adapter_root"] == ("/c", "/d")
    assert settings.resolve(parse("--config", config), env)["auto_register"] is True
    flags = parse("--adapter-root", "/e", "--adapter-root", "/f", "--no-auto-register")
    assert settings.resolve(flags, env)["adapter_root"] == ("/e", "/f")
    assert settings.resolve(flags, env)["auto_register"] is False


@pytest.mark.parametrize(
    ("text", "env", "match"),
    [
        ("max_lora = 4\n", {}, r"unknown option max_lora"),
        ("[lora]\nmax_loraz = 4\n", {}, r"unknown option lora\.max_loraz"),
        ("max_loras = 2.5\n", {}, r"max_loras \(from .*loraplex\.toml: max_loras\): not an integer"),
        ("max_loras = true\n", {}, r"max_loras .*not an integer"),
        ('max_loras = "4"\n', {}, r"max_loras \(from .*loraplex\.toml: max_loras\): not an integer: '4'"),
        ('drain_timeout = "30"\n', {}, r"drain_timeout .*not a number: '30'"),
        ('auto_register = "true"\n', {}, r"auto_register .*not a boolean: 'true'"),
        ('adapter_root = "/a"\n', {}, r"adapter_root .*not an array of strings: '/a'"),
        ("auth_token = [1]\n", {}, r"auth_token .*not an array of strings"),
        ('quantization = "fp8"\n', {}, r"quantization .*'fp8' is not one of nf4, none"),
        ("model = 5\n", {}, r"model .*not a string"),
        ("auto_register = 1\n", {}, r"auto_register .*not a boolean"),
        ("max_loras = \n", {}, r"config file .*loraplex\.toml"),
        ("", {"LORAPLEX_MAX_LORAS": "many"}, r"max_loras \(from \$LORAPLEX_MAX_LORAS\)"),
        ("", {"LORAPLEX_AUTO_REGISTER": "maybe"}, r"auto_register \(from \$LORAPLEX_AUTO_REGISTER\): not a boolean"),
        ("", {"LORAPLEX_LOG_FORMAT": "xml"}, r"log_format .*'xml' is not one of text, json"),
    ],
)
def test_bad_file_and_env_values_name_the_option(tmp_path: Path, text: str, env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        settings.resolve(parse("--config", toml(tmp_path, text)), env)


def test_an_integer_is_a_number_in_the_file(tmp_path: Path) -> None:
    values = settings.resolve(parse("--config", toml(tmp_path, "drain_timeout = 30\n")), {})
    assert values["drain_timeout"] == 30.0 and isinstance(values["drain_timeout"], float)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config file .*nope\.toml"):
        settings.resolve(parse("--config", str(tmp_path / "nope.toml")), {})


def test_bad_flags_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("--max-loras", "many")
    assert exit_.value.code == 2 and "--max-loras" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--log-format", "xml")


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"LORAPLEX_DRAIN_TIMEOUT": "-1"}, r"^drain_timeout \(from \$LORAPLEX_DRAIN_TIMEOUT\): .*>= 0"),
        ({"LORAPLEX_HEARTBEAT_TIMEOUT": "0"}, r"^heartbeat_timeout \(from \$LORAPLEX_HEARTBEAT_TIMEOUT\)"),
        ({"LORAPLEX_NUM_KV_BLOCKS": "0"}, r"^num_kv_blocks \(from \$LORAPLEX_NUM_KV_BLOCKS\)"),
        ({"LORAPLEX_KV_MEMORY_FRACTION": "1.5"}, r"^kv_memory_fraction "),
        ({"LORAPLEX_METRICS_PORT": "70000"}, r"^metrics_port \(from \$LORAPLEX_METRICS_PORT\): .*0\.\.65535"),
        ({"LORAPLEX_METRICS_PORT": "-1"}, r"^metrics_port .*0\.\.65535"),  # -1 (any port) is for HTTP only
        ({"LORAPLEX_HTTP_PORT": "-2"}, r"^http_port \(from \$LORAPLEX_HTTP_PORT\): .*-1\.\.65535"),
        ({"LORAPLEX_METRICS_TOP_ADAPTERS": "-2"}, r"^metrics_top_adapters .*>= 0"),
        ({"LORAPLEX_MAX_LORAS": "0"}, r"^max_loras .*> 0"),
    ],
)
def test_out_of_range_values_name_the_option_and_its_source(env: dict[str, str], match: str) -> None:
    values, sources = settings.resolve_with_sources(parse("--model", "/m"), env)
    with pytest.raises(ValueError, match=match):
        settings.build_config(values, sources)


def test_secrets_are_masked_wherever_they_come_from(tmp_path: Path) -> None:
    config = toml(tmp_path, 'auth_token = ["from-the-file"]\n')
    for args, env in [
        (parse("--config", config), {}),
        (parse("--config", config), {"LORAPLEX_AUTH_TOKEN": "from-the-env,second"}),
        (parse("--config", config, "--auth-token", "from-a-flag"), {}),
    ]:
        values, sources = settings.resolve_with_sources(args, env)
        text = settings.describe(values, sources)
        assert "auth_token = ['****'" in text
        for secret in ("from-the-file", "from-the-env", "second", "from-a-flag"):
            assert secret not in text
    values, sources = settings.resolve_with_sources(parse("--model", "/m"), {"LORAPLEX_AUTH_TOKEN": "a,b"})
    assert settings.build_config(values).api.auth_tokens == ("a", "b")  # masked only when printed
    assert "auth_token = ['****', '****']  ($LORAPLEX_AUTH_TOKEN)" in settings.describe(values, sources)


def test_every_option_is_described_once() -> None:
    text = settings.describe(settings.resolve(parse(), {}))
    names = [line.split("=")[0].strip() for line in text.splitlines()]
    assert names == [o.name for o in settings.OPTIONS] and len(set(names)) == len(names)


def test_unknown_environment_variables_are_reported() -> None:
    env = {"LORAPLEX_MAX_LORA": "4", "LORAPLEX_MAX_LORAS": "4", "LORAPLEX_CONFIG": "x", "OTHER": "1"}
    assert settings.unknown_environment(env) == ["LORAPLEX_MAX_LORA"]


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """`serve` configures the root logger; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_serve_reports_bad_settings_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, keep_logging: None
) -> None:
    for name in [k for k in os.environ if k.startswith("LORAPLEX_")]:
        monkeypatch.delenv(name)
    cases: list[tuple[list[str], dict[str, Any], str]] = [
        (["--config", toml(tmp_path, "max_lora = 1\n")], {}, "unknown option max_lora"),
        ([], {}, "model: required"),
        (["--model", "/m"], {"LORAPLEX_DRAIN_TIMEOUT": "-5"}, "drain_timeout (from $LORAPLEX_DRAIN_TIMEOUT)"),
        (["--model", "/m", "--preload", "no-equals-sign"], {}, "preload"),
    ]
    for argv, env, message in cases:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert cli.main(["serve", *argv]) == 2
        assert message in capsys.readouterr().err
        for key in env:
            monkeypatch.delenv(key)


def test_the_readme_example_config_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (example,) = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:] if b.startswith("# loraplex.toml")]
    values = settings.resolve(parse("--config", toml(tmp_path, example)), {"LORAPLEX_MAX_LORAS": "32"})
    config = settings.build_config(values)
    assert config.engine.lora.max_loras == 32 and config.engine.lora.adapter_roots == ("/adapters",)
    assert config.api.host == "0.0.0.0" and config.api.metrics_port == 9400
