"""Engine-level benchmark, everything in one process and one run:

    base only | mixed adapters by Punica's popularity modes | PEFT's own mixed batch (adapter_names=)

on the same NF4 base, reporting prefill and decode tokens/s and the ratios mixed/base and
loraplex/PEFT. Modes run interleaved, `--repeats` times, so machine noise hits them alike.

    python -m benchmarks.engine_bench                 # the bench model: hidden 1024, 8 layers, r=16 all-linear, batch 16
    python -m benchmarks.engine_bench --model small   # a quick run
"""

from __future__ import annotations

import argparse
import gc
import time
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


def bench_engine(engine: Engine, ids: list[str], args: argparse.Namespace, vocab: int) -> dict[str, harness.RunStats]:
    for adapter_id in ids:
        engine.register_adapter(adapter_id, adapter_id)
    results = {mode: harness.RunStats() for mode in MODES}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for mode, (popularity, n) in MODES.items():
            spec = WorkloadSpec(
                num_requests=args.batch, num_adapters=n, popularity=popularity,  # type: ignore[arg-type]
                prompt_len=(args.prompt_len, args.prompt_len), output_len=(args.new_tokens, args.new_tokens), seed=repeat,
            )
            engine.store.wait_idle()
            stats = harness.run(engine, generate(spec, vocab), ids)
            if repeat:
                results[mode].merge(stats)
            print(f"  [{mode:>9}] round {repeat}: decode {stats.decode_tps:7.1f} tok/s, prefill {stats.prefill_tps:7.1f} tok/s")
    return results


def bench_peft(model_path: str, root: str, ids: list[str], args: argparse.Namespace, vocab: int) -> dict[str, dict[str, float]]:
    """PEFT's mixed-batch generate (adapter_names=) and its base, on the same NF4 base."""
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
    model.eval()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(input_ids)
    names = [ids[i % 16].replace("/", "_") for i in range(args.batch)]

    def timed(new_tokens: int, adapter_names: list[str] | None) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            if adapter_names is None:
                with model.disable_adapter():
                    model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            else:
                model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, adapter_names=adapter_names)
        return time.perf_counter() - start

    out = {}
    for label, adapter_names in (("peft base", None), ("peft mixed", names)):
        timed(2, adapter_names)  # warm-up
        prefill = min(timed(1, adapter_names) for _ in range(max(1, args.repeats)))
        full = min(timed(args.new_tokens, adapter_names) for _ in range(max(1, args.repeats)))
        decode_s = max(full - prefill, 1e-9)
        out[label] = {
            "prefill_tps": args.batch * args.prompt_len / prefill,
            "decode_tps": args.batch * (args.new_tokens - 1) / decode_s,
        }
        print(f"  [{label}] decode {out[label]['decode_tps']:.1f} tok/s, prefill {out[label]['prefill_tps']:.1f} tok/s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bench", "small"], default="bench")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
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
    runs = bench_engine(engine, ids, args, shape.vocab_size)
    engine.close()
    del engine
    gc.collect()
    peft = {} if args.no_peft else bench_peft(model_path, str(root), ids, args, shape.vocab_size)

    base = runs["base"]
    rows: list[dict[str, Any]] = []
    for mode, stats in runs.items():
        rows.append({
            "run": f"loraplex {mode}", "adapters": MODES[mode][1],
            "decode tok/s": stats.decode_tps, "prefill tok/s": stats.prefill_tps,
            "decode step ms (median)": stats.median_decode_step_ms,
            "decode vs base": stats.decode_tps / base.decode_tps, "prefill vs base": stats.prefill_tps / base.prefill_tps,
        })
    for label, r in peft.items():
        rows.append({"run": label, "adapters": 16 if "mixed" in label else 0, "decode tok/s": r["decode_tps"],
                     "prefill tok/s": r["prefill_tps"], "decode vs base": r["decode_tps"] / base.decode_tps,
                     "prefill vs base": r["prefill_tps"] / base.prefill_tps})
    summary: dict[str, Any] = {}
    for mode, goal in GOALS.items():
        ratio = runs[mode].decode_tps / base.decode_tps
        summary[f"{mode} / base decode (goal >= {goal})"] = ratio
        summary[f"{mode} goal met"] = ratio >= goal
    if peft:
        ratio = runs["distinct"].decode_tps / peft["peft mixed"]["decode_tps"]
        summary[f"distinct / PEFT mixed decode (goal >= {PEFT_GOAL})"] = ratio
        summary["PEFT goal met"] = ratio >= PEFT_GOAL
        summary["PEFT mixed / PEFT base decode"] = peft["peft mixed"]["decode_tps"] / peft["peft base"]["decode_tps"]
    columns = ["run", "adapters", "decode tok/s", "prefill tok/s", "decode step ms (median)", "decode vs base", "prefill vs base"]
    report.write(
        args.name, f"loraplex engine vs base vs PEFT — {shape.name}, batch {args.batch}, r={args.rank} all-linear, {args.quantization}",
        rows, columns, summary, plot=("run", "decode tok/s"),
        notes=f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.repeats} interleaved rounds after a warm-up "
              f"round; CPU NF4 kernel: {args.nf4_kernel}; command: python -m benchmarks.engine_bench {' '.join(argv or [])}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
