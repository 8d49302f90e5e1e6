"""Engine-level benchmark, everything in one process and one run:

    base only | mixed adapters by Punica's popularity modes | PEFT's own mixed batch (adapter_names=)

on the same NF4 base, reporting prefill and decode tokens/s and the ratios mixed/base and
loraplex/PEFT. Each round runs every mode once, PEFT's included, in turn; a ratio is taken
within a round (so a slow spell of the machine hits both sides) and the report gives the
median over rounds with its range.

    python -m benchmarks.engine_bench                 # the bench model: hidden 1024, 8 layers, r=16 all-linear, batch 16
    python -m benchmarks.engine_bench --model small   # a quick run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from benchmarks import harness, report
from benchmarks.models import CPU_BENCH, SMALL, make_adapters, make_model
from benchmarks.workload import WorkloadSpec, generate
from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex.engine.engine import Engine

# mode -> (popularity, number of adapters)
MODES: dict[str, tuple[str, int]] = {
    "base": ("none", 0),
    "identical": ("identical", 1),
    "uniform": ("uniform", 4),
    "skewed": ("skewed", 16),
    "distinct": ("distinct", 16),
}
GOALS = {"identical": 0.95, "uniform": 0.90, "distinct": 0.75}
PEFT_GOAL = 3.0


def _engine(model_path: str, root: str, args: argparse.Namespace) -> Engine:
    return Engine(EngineConfig(
        model=ModelConfig(model_path, quantization=args.quantization, dtype=args.dtype, cpu_nf4_kernel=args.nf4_kernel),  # type: ignore[arg-type]
        cache=CacheConfig(num_blocks=max(256, args.batch * (args.prompt_len + args.new_tokens) // 16 + args.batch)),
        scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=max(2048, args.batch * args.prompt_len)),
        lora=LoraConfig(max_loras=16, max_lora_rank=args.rank, adapter_roots=(root,)),
    ))


def engine_mode(engine: Engine, ids: list[str], args: argparse.Namespace, vocab: int, mode: str, seed: int) -> tuple[float, float]:
    """(prefill seconds per token, median decode step seconds) of one closed-loop batch."""
    popularity, n = MODES[mode]
    spec = WorkloadSpec(
        num_requests=args.batch, num_adapters=n, popularity=popularity,  # type: ignore[arg-type]
        prompt_len=(args.prompt_len, args.prompt_len), output_len=(args.new_tokens, args.new_tokens), seed=seed,
    )
    engine.store.wait_idle()
    stats = harness.run(engine, generate(spec, vocab), ids)
    return stats.prefill_s / max(1, stats.prefill_tokens), stats.median_decode_step_ms / 1e3


def peft_model(model_path: str, root: str, ids: list[str], args: argparse.Namespace) -> Any:
    """PEFT on its own NF4 base (same settings), with the 16 adapters loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraplex.model.loader import exact_nf4_compute, resolve_dtype

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": "cpu"}
    if args.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    base = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if args.nf4_kernel == "exact":
        exact_nf4_compute(base)
    model = PeftModel.from_pretrained(base, f"{root}/{ids[0]}", adapter_name=ids[0].replace("/", "_"))
    for adapter_id in ids[1:16]:
        model.load_adapter(f"{root}/{adapter_id}", adapter_name=adapter_id.replace("/", "_"))
    return model.eval()


def peft_mode(model: Any, ids: list[str], args: argparse.Namespace, vocab: int, mixed: bool, seed: int) -> tuple[float, float]:
    """What generate does, step by step: a prefill, then greedy decode steps on a DynamicCache."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g)
    kwargs: dict[str, Any] = {"adapter_names": [ids[i % 16].replace("/", "_") for i in range(args.batch)]} if mixed else {}
    with torch.inference_mode(), (nullcontext() if mixed else model.disable_adapter()):
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(args.new_tokens - 1):
            next_ids = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
            steps.append(time.perf_counter() - start)
    return prefill / (args.batch * args.prompt_len), statistics.median(steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bench", "small"], default="bench")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--nf4-kernel", choices=["fused", "exact"], default="fused")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--name", default="engine_bench")
    args = p.parse_args(argv)

    shape = CPU_BENCH if args.model == "bench" else SMALL
    model_path = str(make_model(shape))
    root, ids = make_adapters(shape, 16, rank=args.rank)
    print(f"[engine_bench] {shape.name}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"rank {args.rank} all-linear, {args.quantization} {args.dtype} ({args.nf4_kernel} CPU NF4 kernel)")
    engine = _engine(model_path, str(root), args)
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    def engine_run(mode: str) -> Callable[[int], tuple[float, float]]:
        return lambda seed: engine_mode(engine, ids, args, shape.vocab_size, mode, seed)

    runs: dict[str, Callable[[int], tuple[float, float]]] = {f"loraplex {mode}": engine_run(mode) for mode in MODES}
    if not args.no_peft:
        peft = peft_model(model_path, str(root), ids, args)
        runs["peft base"] = lambda seed: peft_mode(peft, ids, args, shape.vocab_size, False, seed)
        runs["peft mixed"] = lambda seed: peft_mode(peft, ids, args, shape.vocab_size, True, seed)

    prefill: dict[str, list[float]] = {k: [] for k in runs}
    decode: dict[str, list[float]] = {k: [] for k in runs}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for label, fn in runs.items():
            per_token, step = fn(rnd)
            if rnd:
                prefill[label].append(per_token)
                decode[label].append(step)
            print(f"  round {rnd} [{label:>18}] decode step {step * 1e3:7.1f} ms, prefill {1 / per_token:7.1f} tok/s")
    engine.close()

    def ratio(label: str, other: str = "loraplex base", series: dict[str, list[float]] = decode) -> tuple[float, float, float]:
        values = [b / a for a, b in zip(series[label], series[other])]  # time ratio -> throughput ratio
        return statistics.median(values), min(values), max(values)

    rows: list[dict[str, Any]] = []
    for label in runs:
        med, lo, hi = ratio(label)
        rows.append({
            "run": label,
            "adapters": 16 if label.endswith("mixed") else MODES.get(label.removeprefix("loraplex "), ("", 0))[1],
            "decode tok/s": args.batch / statistics.median(decode[label]),
            "prefill tok/s": 1 / statistics.median(prefill[label]),
            "decode step ms": statistics.median(decode[label]) * 1e3,
            "decode vs base": med, "range": f"{lo:.2f}-{hi:.2f}",
            "prefill vs base": ratio(label, series=prefill)[0],
        })
    summary: dict[str, Any] = {}
    for mode, goal in GOALS.items():
        med = ratio(f"loraplex {mode}")[0]
        summary[f"{mode} / base decode, median of rounds (goal >= {goal})"] = med
        summary[f"{mode} goal met"] = med >= goal
    if not args.no_peft:
        med = ratio("loraplex distinct", "peft mixed")[0]
        summary[f"distinct / PEFT mixed decode (goal >= {PEFT_GOAL})"] = med
        summary["PEFT goal met"] = med >= PEFT_GOAL
        summary["loraplex base / PEFT base decode"] = ratio("loraplex base", "peft base")[0]
        summary["PEFT mixed / PEFT base decode"] = ratio("peft mixed", "peft base")[0]
    columns = ["run", "adapters", "decode tok/s", "prefill tok/s", "decode step ms", "decode vs base", "range", "prefill vs base"]
    report.write(
        args.name, f"loraplex engine vs base vs PEFT — {shape.name}, batch {args.batch}, r={args.rank} all-linear, {args.quantization}",
        rows, columns, summary, plot=("run", "decode tok/s"),
        notes=f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens; {args.rounds} rounds after a warm-up round, each "
              f"running every mode in turn; ratios within a round, median over rounds (range = min-max); CPU NF4 kernel: "
              f"{args.nf4_kernel}; command: python -m benchmarks.engine_bench {' '.join(argv or [])}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
