"""Building the ServerConfig from flags, LORAPLEX_* environment variables and a TOML file.

Every option is declared once in OPTIONS; precedence is flag > environment > file > default.
The file uses the option names with underscores (`max_loras = 16`), at top level or in any
table (`[lora]`). Lists come as repeated flags, TOML arrays, or comma-separated env values.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.config import (
    ApiConfig,
    CacheConfig,
    EngineConfig,
    LoraConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)

ENV_PREFIX = "LORAPLEX_"


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # flag --name-with-dashes, env LORAPLEX_NAME, file key name
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    many: bool = False  # a list
    secret: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("model", str, None, "local Hugging Face model directory, or 'demo' to build / reuse the demo model"),
    Option("quantization", str, "nf4", "base weights: NF4 (bitsandbytes) or as stored", ("nf4", "none")),
    Option("dtype", str, "auto", "compute dtype (auto: bfloat16 on CUDA, float32 on CPU)", ("auto", "bfloat16", "float16", "float32")),
    Option("device", str, "auto", "where the model runs", ("auto", "cpu", "cuda")),
    Option("cpu_nf4_kernel", str, "fused", "CPU NF4 matmuls: bitsandbytes' fused bf16 kernel, or exact in the compute dtype", ("fused", "exact")),
    Option("max_model_len", int, None, "longest prompt + output (default: the model's, capped at 4096)"),
    Option("block_size", int, 16, "tokens per KV-cache block"),
    Option("num_kv_blocks", int, None, "KV-cache blocks (default: fit max_num_seqs full sequences in memory)"),
    Option("kv_memory_fraction", float, 0.85, "CUDA: share of free memory for the KV cache"),
    Option("max_num_seqs", int, 64, "running sequences per step"),
    Option("max_num_batched_tokens", int, 2048, "tokens per step (prompts are chunked to fit)"),
    Option("max_waiting", int, 1024, "queued requests before RESOURCE_EXHAUSTED"),
    Option("adapter_aging_s", float, 2.0, "a request waiting this long for a device slot is served first"),
    Option("max_loras", int, 8, "device adapter slots"),
    Option("max_lora_rank", int, 16, "largest adapter rank"),
    Option("max_host_adapter_bytes", int, 2 << 30, "host-tier budget for validated adapter tensors"),
    Option("adapter_root", str, (), "directory adapters are loaded from (repeatable)", many=True),
    Option("auto_register", bool, True, "let a request name an adapter directory under the root without loading it first"),
    Option("max_upload_bytes", int, 1 << 30, "largest UploadAdapter payload"),
    Option("preload", str, (), "ID=RELPATH adapter to load at start-up (repeatable)", many=True),
    Option("host", str, "127.0.0.1", "gRPC listen address"),
    Option("port", int, 50051, "gRPC port"),
    Option("metrics_port", int, 9400, "Prometheus /metrics port, on the same host as gRPC (0: off)"),
    Option("metrics_top_adapters", int, 0, "per-adapter request counter for the N busiest adapter ids, the rest as '(other)' (0: off)"),
    Option("drain_timeout", float, 30.0, "seconds in-flight streams get to finish on SIGTERM"),
    Option("heartbeat_timeout", float, 30.0, "readiness turns NOT_SERVING when an engine step runs longer"),
    Option("auth_token", str, (), "bearer token accepted from callers (repeatable; none: no auth)", many=True, secret=True),
    Option("seed", int, 0, "seed for requests without one"),
    Option("log_format", str, "text", "log line format", ("text", "json")),
    Option("log_level", str, "info", "log level", ("debug", "info", "warning", "error")),
)
BY_NAME = {o.name: o for o in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config file (flags and LORAPLEX_* variables override it)")
    for o in OPTIONS:
        flag = "--" + o.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": o.name, "default": None, "help": o.help}
        if o.many:
            kwargs["action"] = "append"
        elif o.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = o.type
        if o.choices:
            kwargs["choices"] = o.choices
        parser.add_argument(flag, **kwargs)


def _convert(option: Option, value: Any, source: str, *, text: bool) -> Any:
    """A value as the option's type: parsed from text (the environment), or checked as typed (TOML).

    A TOML value keeps its type: "4" is not an integer, 2.5 or true is not 2 or 1.
    """
    try:
        if option.many:
            if text:
                items = value.split(",")
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                items = value
            else:
                raise ValueError(f"not an array of strings: {value!r}")
            return tuple(v.strip() for v in items if v.strip())
        converted = _parse(option, value) if text else _typed(option, value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{option.name} (from {source}): {e}") from None
    if option.choices and converted not in option.choices:
        raise ValueError(f"{option.name} (from {source}): {converted!r} is not one of {', '.join(option.choices)}")
    return converted


def _parse(option: Option, value: str) -> Any:
    if option.type is bool:
        low = value.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"not a boolean: {value!r}")
        return low in ("1", "true", "yes", "on")
    return option.type(value)


def _typed(option: Option, value: Any) -> Any:
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[option.type]
    if not isinstance(value, expected) or (isinstance(value, bool) and option.type is not bool):
        kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[option.type]
        raise ValueError(f"not {kind}: {value!r}")
    return option.type(value)


def _file_values(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"config file {path}: {e}") from None
    flat: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], where: str) -> None:
        for key, value in table.items():
            name = key.replace("-", "_")
            if isinstance(value, dict):
                walk(value, f"{where}{key}.")
            elif name in BY_NAME:
                flat[name] = _convert(BY_NAME[name], value, f"{path}: {where}{key}", text=False)
            else:
                raise ValueError(f"config file {path}: unknown option {where}{key}")

    walk(data, "")
    return flat


def resolve(args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Option name -> value, with flag > env > file > default."""
    return resolve_with_sources(args, environ)[0]


def resolve_with_sources(
    args: argparse.Namespace | None, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Option name -> value, and option name -> where the value came from."""
    environ = os.environ if environ is None else environ
    ns = vars(args) if args is not None else {}
    config_file = ns.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    values = {o.name: o.default for o in OPTIONS}
    sources = dict.fromkeys(values, "default")
    if config_file:
        from_file = _file_values(config_file)
        values.update(from_file)
        sources.update(dict.fromkeys(from_file, f"file {config_file}"))
    for o in OPTIONS:
        raw = environ.get(ENV_PREFIX + o.name.upper())
        if raw is not None:
            values[o.name] = _convert(o, raw, f"${ENV_PREFIX}{o.name.upper()}", text=True)
            sources[o.name] = f"${ENV_PREFIX}{o.name.upper()}"
    for o in OPTIONS:
        flag_value = ns.get(o.name)
        if flag_value is not None:
            values[o.name] = tuple(flag_value) if o.many else flag_value
            sources[o.name] = "--" + o.name.replace("_", "-")
    return values, sources


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """LORAPLEX_* variables that name no option (typos would otherwise pass unnoticed)."""
    environ = os.environ if environ is None else environ
    known = {ENV_PREFIX + "CONFIG"} | {ENV_PREFIX + o.name.upper() for o in OPTIONS}
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


def parse_preload(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        adapter_id, sep, path = item.partition("=")
        if not sep or not adapter_id or not path:
            raise ValueError(f"preload: {item!r} must be ID=RELPATH")
        out[adapter_id] = path
    return out


# Config fields whose name differs from the option that sets them.
FIELD_OPTIONS = {
    "num_blocks": "num_kv_blocks",
    "memory_fraction": "kv_memory_fraction",
    "drain_timeout_s": "drain_timeout",
    "heartbeat_timeout_s": "heartbeat_timeout",
}


def build_config(values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> ServerConfig:
    """The validated ServerConfig; a ValueError names the option (and its source, if given)."""
    if not values.get("model"):
        raise ValueError("model: required (a model directory, or 'demo')")
    try:
        return _build_config(values)
    except ValueError as e:
        message = str(e)
        field = message.split(" ", 1)[0]
        option = FIELD_OPTIONS.get(field, field)
        if option not in BY_NAME:
            raise
        source = f" (from {sources[option]})" if sources and option in sources else ""
        raise ValueError(f"{option}{source}: {message}") from None


def _build_config(values: Mapping[str, Any]) -> ServerConfig:
    return ServerConfig(
        engine=EngineConfig(
            model=ModelConfig(
                values["model"], values["quantization"], values["dtype"], values["device"], values["max_model_len"],
                values["cpu_nf4_kernel"],
            ),
            cache=CacheConfig(values["block_size"], values["num_kv_blocks"], values["kv_memory_fraction"]),
            scheduler=SchedulerConfig(
                values["max_num_seqs"], values["max_num_batched_tokens"], values["max_waiting"], values["adapter_aging_s"]
            ),
            lora=LoraConfig(
                max_loras=values["max_loras"],
                max_lora_rank=values["max_lora_rank"],
                max_host_adapter_bytes=values["max_host_adapter_bytes"],
                adapter_roots=tuple(values["adapter_root"]),
                auto_register=values["auto_register"],
                max_upload_bytes=values["max_upload_bytes"],
            ),
            seed=values["seed"],
        ),
        api=ApiConfig(
            host=values["host"],
            port=values["port"],
            metrics_port=values["metrics_port"],
            metrics_top_adapters=values["metrics_top_adapters"],
            drain_timeout_s=values["drain_timeout"],
            heartbeat_timeout_s=values["heartbeat_timeout"],
            auth_tokens=tuple(values["auth_token"]),
        ),
    )


def describe(values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> str:
    """One line per option for the start-up log, secrets masked, with where each came from."""
    lines = []
    for o in OPTIONS:
        value = values.get(o.name)
        if o.secret and value:
            value = ["****"] * len(value) if o.many else "****"
        source = f"  ({sources[o.name]})" if sources and o.name in sources else ""
        lines.append(f"  {o.name} = {value!r}{source}")
    return "\n".join(lines)
