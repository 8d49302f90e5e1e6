"""Building the ServerConfig from flags, LORAPLEX_* environment variables and a TOML file.

Every option is declared once in OPTIONS; precedence is flag > environment > file > default.
The file uses the option names with underscores (`max_loras = 16`), at top level or in any
table (`[lora]`). Lists come as repeated flags, TOML arrays, or comma-separated env values.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import typing
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
from loraplex.logs import LOG_FORMATS, LOG_LEVELS
from loraplex.rules import InvalidFieldError

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
    field: tuple[Any, str] | None = None  # (config dataclass, field name) it sets


def _field_option(name: str, config: type, field: str, help: str, *, secret: bool = False) -> Option:
    """An option whose type, default and choices are its config field's (config.py holds each rule once)."""
    spec = {f.name: f for f in dataclasses.fields(config)}[field]
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        default = None  # required
    hint = typing.get_type_hints(config)[field]
    if type(None) in typing.get_args(hint):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    choices, many = None, False
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        hint = type(choices[0])
    elif typing.get_origin(hint) is tuple:  # tuple[str, ...]
        hint, many = typing.get_args(hint)[0], True
    return Option(name, hint, default, help, choices, many, secret, (config, field))


M, C, S, L, A, E = ModelConfig, CacheConfig, SchedulerConfig, LoraConfig, ApiConfig, EngineConfig
OPTIONS: tuple[Option, ...] = (
    _field_option("model", M, "model", "local Hugging Face model directory, or 'demo' to build / reuse the demo model"),
    _field_option("quantization", M, "quantization", "base weights: NF4 (bitsandbytes) or as stored"),
    _field_option("dtype", M, "dtype", "compute dtype (auto: bfloat16 on CUDA, float32 on CPU)"),
    _field_option("device", M, "device", "where the model runs"),
    _field_option(
        "cpu_nf4_kernel", M, "cpu_nf4_kernel",
        "CPU NF4 matmuls: bitsandbytes' fused bf16 kernel, or exact in the compute dtype",
    ),
    _field_option("max_model_len", M, "max_model_len", "longest prompt + output (default: the model's, capped at 4096)"),
    _field_option("block_size", C, "block_size", "tokens per KV-cache block"),
    _field_option(
        "num_kv_blocks", C, "num_blocks", "KV-cache blocks (default: fit max_num_seqs full sequences in memory)"
    ),
    _field_option("kv_memory_fraction", C, "memory_fraction", "CUDA: share of free memory for the KV cache"),
    _field_option(
        "prefix_caching", C, "prefix_caching",
        "reuse the KV blocks of prompt prefixes computed under the same adapter version (or the base)",
    ),
    _field_option("max_num_seqs", S, "max_num_seqs", "running sequences per step"),
    _field_option("max_num_batched_tokens", S, "max_num_batched_tokens", "tokens per step (prompts are chunked to fit)"),
    _field_option("max_waiting", S, "max_waiting", "queued requests before RESOURCE_EXHAUSTED"),
    _field_option(
        "adapter_aging_s", S, "adapter_aging_s", "a request waiting this long for a device slot is served first"
    ),
    _field_option(
        "fairness", S, "fairness",
        "between tenants: vtc serves the one with the least weighted service first; fcfs, arrival order",
    ),
    _field_option("max_loras", L, "max_loras", "device adapter slots"),
    _field_option("max_lora_rank", L, "max_lora_rank", "largest adapter rank"),
    _field_option(
        "max_host_adapter_bytes", L, "max_host_adapter_bytes", "host-tier budget for validated adapter tensors"
    ),
    _field_option(
        "adapter_root", L, "adapter_roots",
        "directory adapters are loaded from, or s3://bucket/prefix (repeatable; S3 needs a local root for its cache)",
    ),
    _field_option(
        "auto_register", L, "auto_register",
        "let a request name an adapter directory under the root without loading it first",
    ),
    _field_option("max_upload_bytes", L, "max_upload_bytes", "largest UploadAdapter payload"),
    Option("preload", str, (), "ID=RELPATH adapter to load at start-up (repeatable)", many=True),
    _field_option("host", A, "host", "gRPC listen address"),
    _field_option("port", A, "port", "gRPC port"),
    _field_option("metrics_port", A, "metrics_port", "Prometheus /metrics port, on the same host as gRPC (0: off)"),
    _field_option(
        "http_port", A, "http_port", "OpenAI-compatible HTTP API port, on the same host as gRPC (0: off; -1: a free port, logged)"
    ),
    _field_option(
        "served_model_name", A, "served_model_name",
        "the base model's name in the HTTP API's `model` field (default: the model directory's name)",
    ),
    _field_option(
        "metrics_top_adapters", A, "metrics_top_adapters",
        "per-adapter request counter for the N busiest adapter ids, the rest as '(other)' (0: off)",
    ),
    _field_option("drain_timeout", A, "drain_timeout_s", "seconds in-flight streams get to finish on SIGTERM"),
    _field_option(
        "heartbeat_timeout", A, "heartbeat_timeout_s", "readiness turns NOT_SERVING when an engine step runs longer"
    ),
    _field_option(
        "auth_token", A, "auth_tokens",
        "admin bearer token accepted from callers (repeatable; with no --tenants either, the server is open)",
        secret=True,
    ),
    _field_option(
        "tenants", A, "tenants_file",
        "TOML file of tenants: token hashes, namespaces, roles, limits (reloaded on SIGHUP)",
    ),
    _field_option("tls_cert", A, "tls_cert", "PEM certificate chain: serve gRPC over TLS (with --tls-key)"),
    _field_option("tls_key", A, "tls_key", "PEM private key for --tls-cert"),
    _field_option(
        "tls_client_ca", A, "tls_client_ca", "PEM CA certificates: require client certificates signed by them (mTLS)"
    ),
    _field_option("seed", E, "seed", "seed for requests without one"),
    Option("log_format", str, "text", "log line format", LOG_FORMATS),
    Option("log_level", str, "info", "log level", LOG_LEVELS),
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


def resolve_mapping(
    mapping: Mapping[str, Any], source: str, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """As resolve_with_sources, with `mapping` (option names, values typed as in the TOML
    file; a `config` entry names one) in place of the flags: Ray Serve's application args."""
    rest = dict(mapping)
    config_file = rest.pop("config", None)
    values, sources = resolve_with_sources(argparse.Namespace(config=config_file), environ)
    for key, value in rest.items():
        name = key.replace("-", "_")
        if name not in BY_NAME:
            raise ValueError(f"{source}: unknown option {key}")
        values[name] = _convert(BY_NAME[name], value, f"{source}: {key}", text=False)
        sources[name] = source
    return values, sources


def with_demo_model(values: Mapping[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """`model = "demo"`: the demo model's directory (built on first use), its adapters as
    the adapter root and "demo" as the served model name unless they are set. Other models
    are left as they are."""
    out = dict(values)
    if out["model"] != "demo":
        return out
    from loraplex.model.demo import demo_dir, make_demo

    root = make_demo(demo_dir())
    out["model"] = str(root / "model")
    sources["model"] = sources.get("model", "default") + ", the demo model"
    if not out["adapter_root"]:
        out["adapter_root"] = (str(root / "adapters"),)
        sources["adapter_root"] = "the demo adapters"
    if not out["served_model_name"]:
        out["served_model_name"] = "demo"
        sources["served_model_name"] = "the demo model"
    return out


def unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """LORAPLEX_* variables that name no option (typos would otherwise pass unnoticed)."""
    environ = os.environ if environ is None else environ
    known = {ENV_PREFIX + "CONFIG", ENV_PREFIX + "DEMO_DIR"} | {ENV_PREFIX + o.name.upper() for o in OPTIONS}
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


def parse_preload(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        adapter_id, sep, path = item.partition("=")
        if not sep or not adapter_id or not path:
            raise ValueError(f"preload: {item!r} must be ID=RELPATH")
        out[adapter_id] = path
    return out


# The option that sets each config field (field names are unique across the config classes).
FIELD_OPTIONS = {o.field[1]: o.name for o in OPTIONS if o.field is not None}


def build_config(values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> ServerConfig:
    """The validated ServerConfig; an InvalidFieldError names the option (and its source, if given)."""
    if not values.get("model"):
        raise InvalidFieldError("model", "model: required (a model directory, or 'demo')")
    try:
        return _build_config(values)
    except InvalidFieldError as e:
        option = FIELD_OPTIONS.get(e.field, e.field)
        if option not in BY_NAME:
            raise
        source = f" (from {sources[option]})" if sources and option in sources else ""
        raise InvalidFieldError(option, f"{option}{source}: {e}") from None


def _build_config(values: Mapping[str, Any]) -> ServerConfig:
    def fields_of(config: type) -> dict[str, Any]:
        return {o.field[1]: values[o.name] for o in OPTIONS if o.field is not None and o.field[0] is config}

    return ServerConfig(
        engine=EngineConfig(
            model=ModelConfig(**fields_of(ModelConfig)),
            cache=CacheConfig(**fields_of(CacheConfig)),
            scheduler=SchedulerConfig(**fields_of(SchedulerConfig)),
            lora=LoraConfig(**fields_of(LoraConfig)),
            **fields_of(EngineConfig),
        ),
        api=ApiConfig(**fields_of(ApiConfig)),
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
