"""One GPU check for the Triton LoRA kernels and the engine, written to benchmarks/results/.

    (a) correctness  the CUDA case grid of tests/lora/test_triton_ops.py (ranks 1-64, 1-512
                     tokens, 1..T adapters, fp16/bf16/fp32) against a float64 loop and torch
    (b) kernels      shrink + expand time and GB/s at T = 1..512, 32 distinct rank-16 adapters,
                     4096 → 4096, against the HBM peak; torch's grouped op beside it
    (c) decode       tokens/s of a random Llama-7B-shaped model, NF4, batch 32, through the
                     Engine: base only vs 32 distinct rank-16 q/k/v/o adapters
    (d) report       JSON + Markdown with the date, git HEAD and the device

    bash benchmarks/gpu_check.sh            # one H200: about 5 minutes, hard stop at 8
    bash benchmarks/gpu_check.sh --smoke    # CPU: tiny shapes, kernels in Triton's interpreter
                                            # (if triton is installed), engine on the torch path

Each stage records its result or its error and the report is rewritten after every stage,
so a failure or a timeout in one still leaves the others' numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: `benchmarks` is importable from the repository root
HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # peak HBM bandwidth, GB/s


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- (a) correctness ----------------------------------------------------------------------------


def check_correctness(smoke: bool, deadline: float) -> dict[str, Any]:
    import torch

    spec = importlib.util.spec_from_file_location("test_triton_ops", REPO / "tests/lora/test_triton_ops.py")
    assert spec is not None and spec.loader is not None
    tests = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tests  # its dataclasses look their module up there
    spec.loader.exec_module(tests)
    if smoke:
        cases = [c for c in tests.INTERPRET_CASES if c.num_tokens <= 8 or len(c.d_outs) > 1][:8]
        device = torch.device("cpu")
    else:
        cases = tests.CUDA_CASES + [c for c in tests.INTERPRET_CASES if len(c.d_outs) > 1 or c.split_k]
        device = torch.device("cuda")
    failures: dict[str, str] = {}
    passed = 0
    for i, case in enumerate(cases):
        if time.monotonic() > deadline:
            return {"passed": passed, "failed": len(failures), "not_run": len(cases) - i, "failures": failures}
        try:
            tests.run_case(case, device)
            passed += 1
        except Exception as e:
            failures[case.id] = f"{type(e).__name__}: {e}"[:600]
    _log(f"correctness: {passed} passed, {len(failures)} failed of {len(cases)}")
    return {"passed": passed, "failed": len(failures), "not_run": 0, "failures": failures}


# -- (b) kernel time and bandwidth ------------------------------------------------------------


def _time_ms(fn: Callable[[], object], device: Any, reps: int) -> float:
    """Median time of fn; on CUDA with cold L2 (a 256 MiB write between runs), as from HBM."""
    import torch

    fn()  # compile / warm up
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_kernels(smoke: bool, peak_gbps: float | None) -> list[dict[str, Any]]:
    import torch

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    d = 256 if smoke else 4096
    rank, num_slots = 16, (4 if smoke else 32)
    g = torch.Generator(device).manual_seed(0)
    lora_a = (torch.randn(num_slots, rank, d, generator=g, device=device) * d**-0.5).to(dtype)  # [slots, r, d_in]
    lora_b = (torch.randn(num_slots, rank, d, generator=g, device=device) * 0.02).to(dtype)  # [slots, r, d_out]
    rows = []
    for num_tokens in [1, 8, 32] if smoke else [1, 8, 32, 128, 512]:
        x = torch.randn(num_tokens, d, generator=g, device=device).to(dtype)  # [T, d_in]
        rows.append(_bench_kernels_at(x, lora_a, lora_b, reps=2 if smoke else 50, peak_gbps=peak_gbps))
    return rows


def _bench_kernels_at(
    x: Any, lora_a: Any, lora_b: Any, reps: int, peak_gbps: float | None
) -> dict[str, Any]:
    """Shrink, expand, both, and torch's grouped op at one token count, all slots in use."""
    import torch

    from loraplex.lora import triton_ops
    from loraplex.lora.lora_backend import PoolSlice, slot_views
    from loraplex.lora.lora_ops import TorchLora
    from loraplex.lora.triton_lora import TritonLora

    (num_tokens, d_in), (num_slots, rank, d_out), device, dtype = x.shape, lora_b.shape, x.device, x.dtype
    k = min(num_slots, num_tokens)  # distinct adapters: the tokens split evenly, one run each
    runs = [(s, num_tokens // k + (s < num_tokens % k)) for s in range(k)]
    y = torch.zeros(num_tokens, d_out, device=device, dtype=dtype)  # [T, d_out]
    tb = TritonLora(device).prepare(runs, [rank] * num_slots, rank, num_tokens).table
    assert isinstance(tb, triton_ops.TritonBatch)
    v = triton_ops.sgmv_shrink(x, lora_a, tb)  # [T, R] fp32
    shrink_ms = _time_ms(lambda: triton_ops.sgmv_shrink(x, lora_a, tb), device, reps)
    expand_ms = _time_ms(lambda: triton_ops.sgmv_expand(y, v, lora_b, tb), device, reps)
    total_ms = _time_ms(lambda: triton_ops.sgmv_lora(y, x, lora_a, lora_b, tb), device, reps)
    torch_lora = TorchLora(dtype, device)
    torch_batch = torch_lora.prepare(runs, [rank] * num_slots, rank, num_tokens)
    layer = PoolSlice(lora_a, lora_b, slot_views(lora_a, lora_b, [rank] * num_slots))

    def torch_op() -> None:
        v = torch_lora.shrink(x, layer, torch_batch)
        assert v is not None
        torch_lora.expand(y, v, layer, torch_batch)

    torch_ms = _time_ms(torch_op, device, reps)
    item = dtype.itemsize
    # bytes that must cross HBM once: x, the used A and Bᵀ slots, v out and back (fp32), y in and out
    nbytes = (
        num_tokens * d_in * item + k * rank * (d_in + d_out) * item
        + 2 * num_tokens * v.shape[1] * 4 + 2 * num_tokens * d_out * item
    )
    gbps = nbytes / (total_ms * 1e-3) / 1e9
    _log(f"kernels T={num_tokens}: {total_ms * 1e3:.1f} us, {gbps:.0f} GB/s (torch {torch_ms * 1e3:.1f} us)")
    return {
        "tokens": num_tokens, "adapters": k, "rank": rank, "d_in": d_in, "d_out": d_out,
        "shrink_us": shrink_ms * 1e3, "expand_us": expand_ms * 1e3, "total_us": total_ms * 1e3,
        "torch_us": torch_ms * 1e3, "torch_form": "dense" if torch_batch.dense else "segments",
        "bytes": nbytes, "gbps": gbps, "hbm_fraction": gbps / peak_gbps if peak_gbps else None,
    }


# -- (c) decode through the engine ---------------------------------------------------------------


def _shape(smoke: bool) -> Any:
    from benchmarks.models import LLAMA_7B, TINY

    return TINY if smoke else LLAMA_7B


def _run(engine: Any, batch: int, prompt_len: int, new_tokens: int, adapters: list[str | None], seed: int) -> dict[str, Any]:
    """One continuous batch to completion; the decode steps are those where all `batch` sequences decode."""
    import random

    from loraplex.engine.request import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    vocab = engine.loaded.vocab_size
    ids = [
        engine.add_request(None, params, adapters[i % len(adapters)], prompt_token_ids=[rng.randrange(3, vocab) for _ in range(prompt_len)])
        for i in range(batch)
    ]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    decode_ms, adapters_per_step = [], set()
    while engine.has_unfinished():
        outputs = engine.step()
        step = engine.last_step
        if step.num_requests == 0:
            engine.wait_for_work(0.005)  # adapters still loading
        elif step.num_tokens == step.num_requests == batch:
            decode_ms.append(step.duration_s * 1e3)
            adapters_per_step.add(step.num_adapters)
        for out in outputs:
            if out.error:
                raise RuntimeError(out.error)
            tokens[out.request_id].extend(out.new_token_ids)
    return {"decode_ms": decode_ms, "tokens": [tokens[i] for i in ids], "adapters_per_step": sorted(adapters_per_step)}


def bench_decode(smoke: bool, work_dir: Path) -> dict[str, Any]:
    import torch

    from loraplex.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
    from loraplex.engine.engine import Engine

    device = "cpu" if smoke else "cuda"
    batch, num_adapters, rank = (4, 4, 8) if smoke else (32, 32, 16)
    prompt_len, new_tokens = (8, 8) if smoke else (64, 64)
    from benchmarks.models import ATTENTION, make_adapters, make_model

    shape = _shape(smoke)
    model_dir = make_model(shape, work_dir, device, torch.float32 if smoke else torch.bfloat16)
    if device == "cuda":
        torch.cuda.empty_cache()
    adapter_root, names = make_adapters(shape, num_adapters, rank, ATTENTION, work_dir, torch.float32 if smoke else torch.bfloat16)

    t0 = time.monotonic()
    engine = Engine(EngineConfig(
        model=ModelConfig(str(model_dir), quantization="nf4", dtype="float32" if smoke else "bfloat16", device=device, max_model_len=512),  # type: ignore[arg-type]
        cache=CacheConfig(num_blocks=2 * batch * (prompt_len + new_tokens) // 16 + 64),
        scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * prompt_len)),
        lora=LoraConfig(max_loras=num_adapters, max_lora_rank=rank, adapter_roots=(str(adapter_root),)),
    ))
    load_s = time.monotonic() - t0
    for name in names:
        engine.register_adapter(name, name)
    mixed: list[str | None] = list(names)
    runs: dict[str, Any] = {}
    try:
        # warm up: compile the kernels, put every adapter in a device slot
        _run(engine, batch, prompt_len, 4, mixed, seed=1)
        _run(engine, batch, prompt_len, 4, [None], seed=1)
        chosen = engine.lora.backend  # Triton on a GPU with triton
        modes: list[tuple[str, list[str | None], Any]] = [("base", [None], chosen), ("mixed", mixed, chosen)]
        if chosen.name != "torch":
            from loraplex.lora.lora_ops import TorchLora

            modes.append(("mixed, torch LoRA ops", mixed, TorchLora(engine.loaded.dtype, engine.loaded.device)))
        for label, adapters, backend in modes:
            # A measurement only: the engine itself chooses its backend once, at start-up.
            engine.lora.context.backend = backend
            runs[label] = _run(engine, batch, prompt_len, new_tokens, adapters, seed=2)
            runs[label]["lora_ops"] = backend.name if label != "base" else "-"
            _log(f"decode {label}: median step {statistics.median(runs[label]['decode_ms']):.2f} ms")
    finally:
        engine.close()

    base_ms = statistics.median(runs["base"]["decode_ms"])
    result: dict[str, Any] = {
        "model": "random Llama-7B shape" if not smoke else "tiny random Llama", "quantization": "nf4",
        "batch": batch, "adapters": num_adapters, "rank": rank, "targets": "q,k,v,o", "prompt_len": prompt_len,
        "new_tokens": new_tokens, "load_s": load_s, "runs": {},
    }
    for label, run in runs.items():
        step_ms = statistics.median(run["decode_ms"])
        result["runs"][label] = {
            "lora_ops": run["lora_ops"], "decode_steps": len(run["decode_ms"]), "step_ms_median": step_ms,
            "step_ms_mean": statistics.fmean(run["decode_ms"]), "tokens_per_s": batch / step_ms * 1e3,
            "ratio_vs_base": base_ms / step_ms, "added_ms_per_token": step_ms - base_ms,
            "adapters_per_step": run["adapters_per_step"],
            # a sanity signal, not a check: adapters should change some greedy tokens of a random model
            "tokens_differ_from_base": sum(a != b for a, b in zip(run["tokens"], runs["base"]["tokens"])),
        }
    if torch.cuda.is_available():
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# -- (d) report --------------------------------------------------------------------------------


def _environment(smoke: bool) -> dict[str, Any]:
    from benchmarks.report import environment

    env = environment()
    env["device"] = env.pop("cuda") if env["cuda"] and not smoke else f"cpu ({platform.processor() or platform.machine()})"
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return env


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# loraplex GPU check{' (smoke, CPU)' if report['smoke'] else ''}", "",
        f"- date: {report['date']}", f"- git: `{report['git_head']}`", f"- device: {report['environment']['device']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in report['environment'].items() if k not in ('device', 'date', 'commit'))}", "",
    ]
    stages = report["stages"]
    for name, stage in stages.items():
        lines += [f"## {name}", "", f"status: **{stage['status']}** ({stage['seconds']:.0f} s)", ""]
        if stage["status"] != "ok":
            lines += ["```", stage.get("error", ""), "```", ""]
            continue
        res = stage["result"]
        if name == "correctness":
            lines += [f"{res['passed']} passed, {res['failed']} failed, {res['not_run']} not run (time budget)", ""]
            lines += [f"- `{k}`: {v}" for k, v in res["failures"].items()] + [""]
        elif name == "kernels":
            lines += [
                "| T | adapters | shrink µs | expand µs | shrink+expand µs | GB/s | of HBM peak | torch µs (form) |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in res:
                frac = f"{r['hbm_fraction']:.1%}" if r["hbm_fraction"] is not None else "-"
                lines.append(
                    f"| {r['tokens']} | {r['adapters']} | {r['shrink_us']:.1f} | {r['expand_us']:.1f} | {r['total_us']:.1f} "
                    f"| {r['gbps']:.1f} | {frac} | {r['torch_us']:.1f} ({r['torch_form']}) |"
                )
            lines.append("")
        elif name == "decode":
            lines += [
                f"{res['model']}, {res['quantization']}, batch {res['batch']}, {res['adapters']} distinct rank-{res['rank']} "
                f"{res['targets']} adapters, prompt {res['prompt_len']}, {res['new_tokens']} new tokens; model load {res['load_s']:.0f} s",
                "",
                "| run | LoRA ops | decode steps | step ms (median) | tokens/s | vs base | added ms/token |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for label, r in res["runs"].items():
                lines.append(
                    f"| {label} | {r['lora_ops']} | {r['decode_steps']} | {r['step_ms_median']:.2f} | {r['tokens_per_s']:.0f} "
                    f"| {r['ratio_vs_base']:.3f} | {r['added_ms_per_token']:+.2f} |"
                )
            lines += ["", "Target (DESIGN.md): a mixed batch within 10% of base (ratio ≥ 0.90).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: proves the script end to end")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the JSON + Markdown go")
    parser.add_argument("--work-dir", type=Path, default=None, help="model + adapters (default: /tmp/loraplex-gpu-check)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting work after this many seconds")
    parser.add_argument("--skip", action="append", default=[], choices=["correctness", "kernels", "decode"])
    args = parser.parse_args(argv)
    start = time.monotonic()

    if args.smoke and importlib.util.find_spec("triton") is not None:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: kernels on CPU tensors
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    work_dir = args.work_dir or Path("/tmp/loraplex-gpu-check") / ("smoke" if args.smoke else "h200")
    work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.gmtime()
    env = _environment(args.smoke)
    peak = next((bw for name, bw in HBM_GBPS.items() if name in env["device"]), None)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", stamp), "git_head": env["commit"], "smoke": args.smoke,
        "environment": env, "hbm_peak_gbps": peak, "stages": {},
    }
    base = args.out / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S', stamp)}{'-smoke' if args.smoke else ''}"
    kernels_ok = env["triton"] is not None and (args.smoke or torch.cuda.is_available())
    stages: list[tuple[str, Callable[[], Any], str | None]] = [
        ("correctness", lambda: check_correctness(args.smoke, start + min(args.budget_s * 0.4, 200)),
         None if kernels_ok else "triton is not installed"),
        ("kernels", lambda: bench_kernels(args.smoke, peak), None if kernels_ok else "triton is not installed"),
        ("decode", lambda: bench_decode(args.smoke, work_dir), None),
    ]
    for name, fn, skip_reason in stages:
        if name in args.skip or skip_reason:
            report["stages"][name] = {"status": "skipped", "seconds": 0.0, "error": skip_reason or "--skip"}
        elif time.monotonic() - start > args.budget_s:
            report["stages"][name] = {"status": "skipped", "seconds": 0.0, "error": "time budget spent"}
        else:
            report["stages"][name] = _run_stage(name, fn)
        base.with_suffix(".json").write_text(json.dumps(report, indent=2))
        base.with_suffix(".md").write_text(_markdown(report))
        if report["stages"][name]["status"] == "interrupted":
            break
    print(_markdown(report))
    _log(f"wrote {base}.json and .md in {time.monotonic() - start:.0f} s")
    statuses = {stage["status"] for stage in report["stages"].values()}
    failed_cases = report["stages"].get("correctness", {}).get("result", {}).get("failed", 0)
    return 1 if statuses & {"error", "interrupted"} or failed_cases else 0


def _run_stage(name: str, fn: Callable[[], Any]) -> dict[str, Any]:
    _log(f"{name} ...")
    t0 = time.monotonic()
    try:
        stage: dict[str, Any] = {"status": "ok", "result": fn()}
    except KeyboardInterrupt:  # gpu_check.sh's timeout: keep what the other stages measured
        stage = {"status": "interrupted", "error": "stopped by the time limit (SIGINT)"}
    except Exception:
        stage = {"status": "error", "error": traceback.format_exc()[-3000:]}
        _log(f"{name} failed:\n{stage['error']}")
    stage["seconds"] = time.monotonic() - t0
    return stage


if __name__ == "__main__":
    sys.exit(main())
