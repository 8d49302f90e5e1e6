"""Shared, session-scoped fixtures: tiny Llama and Qwen2 bases, a local tokenizer, and PEFT
adapters made with PEFT itself. Nothing is downloaded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

# Property tests (tests/fuzz): a small fixed budget in `make test`, a larger one in `make fuzz`.
# Derandomized in CI so a run is reproducible; every failure found is kept as an @example.
_HYPOTHESIS_COMMON: dict[str, Any] = dict(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
hypothesis_settings.register_profile("ci", max_examples=12, derandomize=True, **_HYPOTHESIS_COMMON)
hypothesis_settings.register_profile("fuzz", max_examples=300, **_HYPOTHESIS_COMMON)
hypothesis_settings.load_profile(os.environ.get("LORAPLEX_HYPOTHESIS_PROFILE", "ci"))

from engine_idle import (  # noqa: E402, F401  (tests import these from conftest)
    ENGINES,
    IDLE_STEPS_BUDGET,
    StepBudgetExceeded,
    _checked_generate,
    assert_engine_idle,
    engine_leaks,
    step_budget,
    wait_idle,
)

from loraplex import ports  # noqa: E402
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig  # noqa: E402
from loraplex.model.loader import exact_nf4_compute  # noqa: E402

# name -> PEFT LoraConfig settings. Ranks {4, 8, 16}, different alphas, rsLoRA,
# rank/alpha patterns, {q, v} and all-linear targets, one layer only.
ADAPTER_SETTINGS: dict[str, dict[str, Any]] = {
    "qv-r4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "all-r8-rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear"},
    "all-r16-patterns": {
        "r": 16, "lora_alpha": 32, "target_modules": "all-linear",
        "rank_pattern": {"down_proj": 4, "self_attn.k_proj": 8}, "alpha_pattern": {"o_proj": 4},
    },
    "attn-r8-layer0": {"r": 8, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "layers_to_transform": [0]},
}


B_SCALE = 0.25


@dataclass
class TinyModel:
    arch: str
    path: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    adapter_root: Path | None = None


def _tiny_config(arch: str, vocab_size: int) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.08, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":  # a window shorter than the test sequences
        return MistralConfig(**common, sliding_window=12)
    return Qwen2Config(**common, use_sliding_window=False)


def make_adapter(base_dir: Path, out: Path, seed: int, **settings: Any) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for the base at base_dir."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings.setdefault("init_lora_weights", False)
    model = get_peft_model(base, PeftLoraConfig(lora_dropout=0.0, **settings))
    # PEFT's random init makes updates as large as the base layers; tone them down so the
    # adapters change the output clearly without making the tiny model numerically chaotic.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(B_SCALE)
    model.save_pretrained(out)
    return out


def _build(arch: str, root: Path, tokenizer: Any, seed: int) -> TinyModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch, len(tokenizer)))
    path = root / arch / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    tiny = TinyModel(arch, path, adapter_root=root / arch / "adapters")
    for i, (name, settings) in enumerate(ADAPTER_SETTINGS.items()):
        tiny.adapters[name] = make_adapter(path, root / arch / "adapters" / name, seed + 10 + i, **settings)
    return tiny


def build_tiny(arch: str, root: Path, tokenizer: Any, seed: int) -> TinyModel:
    return _build(arch, root, tokenizer, seed)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from loraplex.model.demo import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def free_port() -> int:
    """A port free now (bind, read, close). Only for a port that must be named in advance and
    is bound at once in this process: a subprocess gets --port 0 and reports its port
    (logged_port), since another process may take a port chosen here before it binds."""
    return ports.free_port()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `loraplex` subprocess: no LORAPLEX_* of the caller's, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An $XDG_CACHE_HOME holding the demo model and adapters at loraplex/demo, built once."""
    from loraplex.model.demo import make_demo

    cache = tmp_path_factory.mktemp("xdg-cache")
    make_demo(cache / "loraplex" / "demo")
    return cache


@dataclass
class ServedDemo:
    address: str  # gRPC
    http_address: str  # the OpenAI-compatible HTTP API
    env: dict[str, str]  # XDG_CACHE_HOME points at the demo: `--model demo` and README snippets find it
    process: subprocess.Popen[bytes]


def logged_port(log_path: Path, door: str, process: subprocess.Popen[bytes], timeout: float = 300) -> int:
    """The port a `loraplex serve` given a free one (--http-port -1, --port 0) logged for a door:
    'gRPC' or 'OpenAI' (the HTTP API)."""
    pattern = re.compile(rf"listening on 127\.0\.0\.1:(\d+) \({door}")
    deadline = time.monotonic() + timeout
    while not (found := pattern.search(log_path.read_text(errors="replace"))):
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    return int(found.group(1))


@pytest.fixture(scope="session")
def demo_server(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedDemo]:
    """`loraplex serve --model demo` in a subprocess, as the README starts it (on a free port)."""
    from loraplex_client import Client

    env = cli_env(XDG_CACHE_HOME=str(demo_cache))
    log_path = tmp_path_factory.mktemp("demo-server") / "server.log"
    log = log_path.open("wb")
    cmd = [
        sys.executable, "-m", "loraplex.cli", "serve", "--model", "demo", "--port", "0", "--metrics-port", "0",
        "--http-port", "-1",
    ]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{logged_port(log_path, 'gRPC', process)}"
    http_address = f"127.0.0.1:{logged_port(log_path, 'OpenAI', process)}"
    deadline = time.monotonic() + 300
    with Client(address) as client:
        while not client.health(timeout=1.0):
            assert process.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
            time.sleep(0.2)
    yield ServedDemo(address, http_address, env, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    log.close()


@pytest.fixture(scope="session")
def tiny_llama(tiny_root: Path, tokenizer: Any) -> TinyModel:
    return _build("llama", tiny_root, tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_root: Path, tokenizer: Any) -> TinyModel:
    return _build("qwen2", tiny_root, tokenizer, seed=2)


def engine_config(
    tiny: TinyModel, *, quantization: str = "nf4", num_blocks: int | None = 256, block_size: int = 16,
    max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, max_loras: int = 8, max_lora_rank: int = 16,
    roots: tuple[str, ...] | None = None, prefix_caching: bool = True, **lora: Any,
) -> EngineConfig:
    return EngineConfig(
        # exact CPU NF4 matmuls on both sides, so logits agree with PEFT to float rounding
        model=ModelConfig(str(tiny.path), quantization=quantization, dtype="float32", device="cpu", cpu_nf4_kernel="exact"),  # type: ignore[arg-type]
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        lora=LoraConfig(
            max_loras=max_loras, max_lora_rank=max_lora_rank,
            adapter_roots=roots if roots is not None else (str(tiny.adapter_root),), **lora,
        ),
    )


@pytest.fixture(scope="session", autouse=True)
def _track_engines() -> Iterator[None]:
    from loraplex.engine import offline
    from loraplex.engine.engine import Engine

    init = Engine.__init__

    def tracking_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        ENGINES.add(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "__init__", tracking_init)
        mp.setattr(offline, "generate", _checked_generate(offline.generate))
        yield


@pytest.fixture(autouse=True)
def _engines_end_idle(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: every engine made so far has finished its requests and holds nothing
    (servers' engine threads get a few seconds to process the last cancels)."""
    yield
    if request.node.get_closest_marker("engine_may_hold") is not None:  # e.g. its engine loop was killed
        for engine in list(ENGINES):
            if engine_leaks(engine):
                ENGINES.discard(engine)
        return
    for engine in list(ENGINES):
        wait_idle(engine, timeout=15.0)


POISON_TOKEN = 499  # a prompt starting with it makes the model runner fail


@contextmanager
def poisoned_runner(engine: Any) -> Iterator[None]:
    """Make every step holding a request whose prompt starts with POISON_TOKEN raise."""
    runner = engine.runner
    original = runner.run

    def failing_run(batch: Any) -> Any:
        if any(r.prompt_token_ids[0] == POISON_TOKEN for r in batch.requests):
            raise RuntimeError("injected device failure")
        return original(batch)

    runner.run = failing_run
    try:
        yield
    finally:
        runner.run = original


def make_engine(tiny: TinyModel, register: bool = True, lora_backend: Any = None, **kwargs: Any) -> Any:
    """An engine on a tiny model; lora_backend: a LoRA backend (or stand-in) instead of the device's."""
    from loraplex.engine.engine import Engine

    engine = Engine(engine_config(tiny, **kwargs), lora_backend=lora_backend)
    if register:
        for name in tiny.adapters:
            engine.register_adapter(name, name)
    return engine


@pytest.fixture(scope="session")
def llama_engine(tiny_llama: TinyModel) -> Iterator[Any]:
    engine = make_engine(tiny_llama)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def qwen2_engine(tiny_qwen2: TinyModel) -> Iterator[Any]:
    engine = make_engine(tiny_qwen2)
    yield engine
    engine.close()


class PeftReference:
    """PEFT's own model on an independently loaded NF4 base with every adapter loaded."""

    def __init__(self, tiny: TinyModel) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        base = AutoModelForCausalLM.from_pretrained(tiny.path, quantization_config=quant, device_map="cpu", dtype=torch.float32)
        # fp32 compute on both sides: bitsandbytes' AVX512-BF16 CPU kernel would round to bf16.
        exact_nf4_compute(base)
        base.generation_config.eos_token_id = None
        base.generation_config.pad_token_id = 0
        names = list(tiny.adapters)
        self.model = PeftModel.from_pretrained(base, tiny.adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(tiny.adapters[name], adapter_name=name)
        self.model.eval()

    def _select(self, adapter: str | None) -> Any:
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        from contextlib import nullcontext

        return nullcontext()

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], adapter: str | None, max_new_tokens: int) -> list[int]:
        with self._select(adapter):
            out = self.model.generate(
                input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False,
            )
        return out[0, len(prompt_ids) :].tolist()

    @torch.inference_mode()
    def last_logits(self, ids: list[int], adapter: str | None) -> Any:
        with self._select(adapter):
            return self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.fixture(scope="session")
def llama_peft(tiny_llama: TinyModel) -> PeftReference:
    return PeftReference(tiny_llama)


@pytest.fixture(scope="session")
def qwen2_peft(tiny_qwen2: TinyModel) -> PeftReference:
    return PeftReference(tiny_qwen2)
