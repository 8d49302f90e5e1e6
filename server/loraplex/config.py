"""Configuration: one root `ServerConfig` holding frozen sub-configs, each validated once.

Every check raises `ValueError` naming the field, so a bad flag, environment variable or
config-file entry is reported the same way wherever it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Quantization = Literal["nf4", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Device = Literal["auto", "cpu", "cuda"]
CpuNf4Kernel = Literal["fused", "exact"]

ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


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
            raise ValueError("model must name a model directory")
        if self.quantization not in ("nf4", "none"):
            raise ValueError(f"quantization must be 'nf4' or 'none', got {self.quantization!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto|cpu|cuda, got {self.device!r}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.cpu_nf4_kernel not in ("fused", "exact"):
            raise ValueError(f"cpu_nf4_kernel must be fused|exact, got {self.cpu_nf4_kernel!r}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache: fixed-size blocks shared by all sequences."""

    block_size: int = 16
    num_blocks: int | None = None  # default: enough for max_num_seqs full-length sequences, within memory
    memory_fraction: float = 0.85  # CUDA: share of free memory the KV cache may take after the model

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.num_blocks is not None:
            _positive("num_blocks", self.num_blocks)
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Bounds on one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024  # admission bound; the API answers RESOURCE_EXHAUSTED past it
    adapter_aging_s: float = 2.0  # a request waiting this long for its adapter is served first

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_waiting", self.max_waiting)
        if self.adapter_aging_s < 0:
            raise ValueError(f"adapter_aging_s must be >= 0, got {self.adapter_aging_s}")


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """The adapter store: registered → host → device tiers."""

    max_loras: int = 8  # device slots
    max_lora_rank: int = 16
    max_host_adapter_bytes: int = 2 << 30
    adapter_roots: tuple[str, ...] = ()
    auto_register: bool = True
    max_upload_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        _positive("max_host_adapter_bytes", self.max_host_adapter_bytes)
        _positive("max_upload_bytes", self.max_upload_bytes)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The gRPC front end."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400  # 0 = no metrics endpoint
    metrics_top_adapters: int = 0  # per-adapter request counter for the N busiest ids; 0 = off
    drain_timeout_s: float = 30.0
    heartbeat_timeout_s: float = 30.0
    auth_tokens: tuple[str, ...] = ()  # reserved for the tenant step; masked when printed

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.metrics_top_adapters < 0:
            raise ValueError(f"metrics_top_adapters must be >= 0, got {self.metrics_top_adapters}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        _positive("heartbeat_timeout_s", self.heartbeat_timeout_s)


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

