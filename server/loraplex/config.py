"""Configuration: one root `ServerConfig` holding frozen sub-configs, each validated once.

Each option's rule is written here once: its default (the field's), its choices (the
field's `Literal`) and its range (`__post_init__`). settings.py derives the command line,
environment and file options from these fields. Every check raises `InvalidFieldError`
carrying the field's name, so a bad flag, environment variable or config-file entry is
reported naming its option, wherever it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from loraplex.rules import InvalidFieldError, is_s3_uri, s3_uri_problem

Quantization = Literal["nf4", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Device = Literal["auto", "cpu", "cuda"]
CpuNf4Kernel = Literal["fused", "exact"]
Fairness = Literal["fcfs", "vtc"]  # between tenants: first come first served, or virtual token counters


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise InvalidFieldError(name, f"{name} must be > 0, got {value}")


def _at_least_zero(name: str, value: int | float) -> None:
    if value < 0:
        raise InvalidFieldError(name, f"{name} must be >= 0, got {value}")


def _one_of(name: str, value: Any, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise InvalidFieldError(name, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _port(name: str, value: int, lowest: int = 0) -> None:
    if not lowest <= value <= 65535:
        raise InvalidFieldError(name, f"{name} must be in {lowest}..65535, got {value}")


ANY_PORT = -1  # http_port: a free port the OS chooses (logged; what tests use), as port 0 is for gRPC


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The base model: a local Hugging Face causal-LM directory."""

    model: str
    quantization: Quantization = "nf4"
    dtype: DType = "auto"  # compute dtype; auto = bfloat16 on CUDA, float32 on CPU
    device: Device = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at 4096
    # CPU NF4 matmuls: "fused" = bitsandbytes' AVX512-BF16 kernel (fast; rounds activations to
    # bf16, as PEFT / transformers do by default); "exact" = dequantize + GEMM in the compute dtype.
    cpu_nf4_kernel: CpuNf4Kernel = "fused"

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidFieldError("model", "model must name a model directory")
        _one_of("quantization", self.quantization, Quantization)
        _one_of("dtype", self.dtype, DType)
        _one_of("device", self.device, Device)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        _one_of("cpu_nf4_kernel", self.cpu_nf4_kernel, CpuNf4Kernel)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache: fixed-size blocks shared by all sequences."""

    block_size: int = 16
    num_blocks: int | None = None  # default: enough for max_num_seqs full-length sequences, within memory
    memory_fraction: float = 0.85  # CUDA: share of free memory the KV cache may take after the model
    prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed under the same weights

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
        if not 0.0 < self.memory_fraction <= 1.0:
            raise InvalidFieldError("memory_fraction", f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Bounds on one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024  # admission bound; the API answers RESOURCE_EXHAUSTED past it
    adapter_aging_s: float = 2.0  # a request waiting this long for its adapter is served first
    fairness: Fairness = "vtc"  # engine/fair_share.py

    def __post_init__(self) -> None:
        _one_of("fairness", self.fairness, Fairness)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_waiting", self.max_waiting)
        _at_least_zero("adapter_aging_s", self.adapter_aging_s)


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """The adapter store: registered → host → device tiers."""

    max_loras: int = 8  # device slots
    max_lora_rank: int = 16
    max_host_adapter_bytes: int = 2 << 30
    adapter_roots: tuple[str, ...] = ()  # directories, or s3://bucket/prefix (needs a local root for its cache)
    auto_register: bool = True
    max_upload_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        _positive("max_host_adapter_bytes", self.max_host_adapter_bytes)
        _positive("max_upload_bytes", self.max_upload_bytes)
        s3_roots = [r for r in self.adapter_roots if is_s3_uri(r)]
        for root in s3_roots:
            problem = s3_uri_problem(root)
            if problem is not None:
                raise InvalidFieldError("adapter_roots", f"adapter_roots: {root!r}: {problem}")
        if s3_roots and len(s3_roots) == len(self.adapter_roots):
            raise InvalidFieldError(
                "adapter_roots", "adapter_roots: an s3:// root needs a local adapter root too (downloads are cached there)"
            )


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The front ends: gRPC, /metrics and the OpenAI-compatible HTTP API."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400  # 0 = no metrics endpoint
    http_port: int = 8000  # the OpenAI-compatible HTTP API (vLLM's port); 0 = off; ANY_PORT = the OS picks
    served_model_name: str = ""  # the base model's name in the HTTP API; "" = the model directory's name
    metrics_top_adapters: int = 0  # per-adapter request counter for the N busiest ids; 0 = off
    drain_timeout_s: float = 30.0
    heartbeat_timeout_s: float = 30.0
    auth_tokens: tuple[str, ...] = ()  # admin bearer tokens; masked when printed
    tenants_file: str | None = None  # TOML tenant table (api/tenants.py); reloaded on SIGHUP
    tls_cert: str | None = None  # PEM server certificate chain: serve TLS
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates signed by it (mTLS)

    def __post_init__(self) -> None:
        _port("port", self.port)
        _port("metrics_port", self.metrics_port)
        _port("http_port", self.http_port, lowest=ANY_PORT)
        _at_least_zero("metrics_top_adapters", self.metrics_top_adapters)
        _at_least_zero("drain_timeout_s", self.drain_timeout_s)
        _positive("heartbeat_timeout_s", self.heartbeat_timeout_s)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidFieldError("tls_cert", "tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidFieldError("tls_client_ca", "tls_client_ca (mTLS) needs tls_cert and tls_key")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs; the API config sits beside it in ServerConfig."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    engine: EngineConfig
    api: ApiConfig = field(default_factory=ApiConfig)

