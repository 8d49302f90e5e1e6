"""The Triton SGMV kernels against a float64 per-token loop and the torch segment op.

Two ways to run the kernels:

- CUDA (`@pytest.mark.cuda`): the full grid, fp16 / bf16 / fp32.
- Triton's interpreter on the CPU: a smaller grid run in ONE subprocess with
  TRITON_INTERPRET=1 set before triton is imported (this file run as a script); each case
  is then its own test reading that subprocess's verdicts. Skipped when triton is absent.

Every case puts NaN in the rows past each adapter's rank and in the slots no segment uses,
so a load that ignores a mask shows up, and checks that base-model tokens keep y bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from lora_reference import apply_lora, per_token_lora

from loraplex.lora.lora_backend import token_segments
from loraplex.lora.lora_ops import TorchLora
from loraplex.lora.triton_ops import build_triton_batch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# fp32 runs tl.dot in IEEE precision (no TF32): as tight as float32 rounding allows.
TOL = {"fp32": 1e-4, "fp16": 6e-2, "bf16": 6e-2}
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")


@dataclass(frozen=True)
class Case:
    num_tokens: int  # tokens with an adapter; base-model tokens come on top
    num_adapters: int
    rank: int  # the pool's r_max; one adapter gets a smaller, odd rank
    dtype: str
    d_in: int = 200
    d_outs: tuple[int, ...] = (300,)  # more than one: a fused multi-projection shrink
    split_k: int | None = None
    stacked: bool = True  # multi-projection: A pools stacked [P, ...] or a list
    via_backend: bool = False  # through TritonLora's shrink / expand, as the LoRA layers call them
    mixed: tuple[int, ...] = ()  # the used slots' ranks, in turn (mixed ranks in one step); rank: the pool's r_max

    @property
    def id(self) -> str:
        proj = f"-p{len(self.d_outs)}{'s' if self.stacked else 'l'}" if len(self.d_outs) > 1 else ""
        split = f"-k{self.split_k}" if self.split_k is not None else ""
        via = "-backend" if self.via_backend else ""
        mixed = f"-mixed{'.'.join(map(str, self.mixed))}" if self.mixed else ""
        shape = f"{self.d_in}x{self.d_outs[0]}"
        return f"t{self.num_tokens}-a{self.num_adapters}-r{self.rank}-{self.dtype}-{shape}{proj}{split}{via}{mixed}"


def _grid(tokens: list[int], ranks: list[int], dtypes: list[str], max_adapters: int = 1 << 30, **kw: Any) -> list[Case]:
    """1, T/4 and T distinct adapters (capped) for every token count, rank and dtype."""
    cases: list[Case] = []
    for t in tokens:
        for a in sorted({1, max(1, t // 4), min(t, max_adapters)}):
            for r in ranks:
                cases.extend(Case(t, a, r, d, **kw) for d in dtypes)
    return cases


CUDA_CASES = _grid([1, 8, 32, 128, 512], [1, 8, 16, 64], ["fp16", "bf16", "fp32"], d_in=1000, d_outs=(1528,))
INTERPRET_CASES = [
    *_grid([1, 8, 32, 128], [1, 16, 64], ["fp32", "bf16"], max_adapters=32),  # 128 segments: slow here
    Case(128, 128, 16, "fp32"),
    Case(512, 8, 8, "fp32"),
    Case(8, 4, 16, "fp16"),
    Case(128, 4, 8, "fp16"),
    Case(1, 1, 16, "fp32", d_in=1800, split_k=3),  # uneven split of d_in, atomics
    Case(32, 8, 16, "bf16", d_in=1000, split_k=1),
    Case(8, 8, 16, "fp32", d_outs=(300, 100, 100)),  # q/k/v: stacked pools
    Case(8, 8, 16, "bf16", d_outs=(300, 100, 100), stacked=False),  # list of pools (pointer table)
    Case(64, 3, 64, "fp32", d_outs=(256, 256), stacked=False, split_k=2),  # gate/up
    Case(40, 5, 16, "bf16", via_backend=True),
    # mixed ranks in one step, in a rank-64 pool: each segment at its own rank (NaN past it)
    Case(8, 8, 64, "fp32", mixed=(4, 64, 16, 8, 1, 32)),  # decode: one token per adapter
    Case(8, 4, 64, "bf16", mixed=(64, 4)),
    Case(96, 4, 64, "fp32", mixed=(8, 64, 1, 24), split_k=2),
    Case(16, 4, 64, "fp32", d_outs=(300, 100, 100), mixed=(4, 64, 16, 8)),  # q/k/v
    Case(24, 6, 64, "bf16", via_backend=True, mixed=(16, 4, 64)),
]
# Llama-7B projection shapes at decode and prefill, through the layers' entry point.
CUDA_CASES += [
    Case(t, a, 16, d, d_in=4096, d_outs=(11008,), via_backend=True)
    for t, a in [(32, 32), (512, 8)] for d in ("bf16", "fp16")
]


def _make(case: Case, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Random pools, a slot-sorted packing with base tokens mixed in, and y before the op."""
    rng = random.Random(zlib.crc32(case.id.encode()) ^ seed)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    dtype = DTYPES[case.dtype]
    num_slots = case.num_adapters + 2  # two slots no segment uses
    used = sorted(rng.sample(range(num_slots), case.num_adapters))
    slot_ranks = [case.rank] * num_slots
    if case.mixed:
        for i, s in enumerate(used):
            slot_ranks[s] = case.mixed[i % len(case.mixed)]
    elif case.num_adapters > 1:
        slot_ranks[used[0]] = max(1, case.rank // 2 - 1)
    # tokens per adapter (each >= 1), one contiguous run per slot in slot order, as the model
    # runner packs them; base-model runs (slot -1) at random places, the kernels must skip them
    cuts = sorted(rng.sample(range(1, case.num_tokens), case.num_adapters - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, case.num_tokens])]
    runs: list[tuple[int, int]] = list(zip(used, sizes))
    for _ in range(2):
        runs.insert(rng.randrange(len(runs) + 1), (-1, rng.randrange(1, 4)))
    total = sum(n for _, n in runs)

    def pool(d: int, scale: float) -> torch.Tensor:
        w = torch.full((num_slots, case.rank, d), float("nan"))
        for s in used:
            w[s, : slot_ranks[s]] = torch.randn(slot_ranks[s], d, generator=g) * scale
        return w.to(dtype).to(device)

    lora_as = [pool(case.d_in, case.d_in**-0.5) for _ in case.d_outs]
    return {
        "x": torch.randn(total, case.d_in, generator=g).to(dtype).to(device),
        "ys": [torch.randn(total, d, generator=g).to(dtype).to(device) for d in case.d_outs],
        "lora_as": lora_as,
        "lora_bs": [pool(d, case.rank**-0.5) for d in case.d_outs],
        "runs": runs,
        "slot_ranks": slot_ranks,
        "total": total,
    }


def run_case(case: Case, device: torch.device) -> None:
    """Run the kernels on one case and check them; raises AssertionError on a mismatch."""
    from loraplex.lora import triton_ops
    from loraplex.lora.triton_lora import TritonLora

    data = _make(case, device)
    x, ys, lora_as, lora_bs = data["x"], data["ys"], data["lora_as"], data["lora_bs"]
    tb = build_triton_batch(token_segments(data["runs"], data["slot_ranks"], data["total"]), data["total"], device)
    token_slot = [slot for slot, n in data["runs"] for _ in range(n)]
    outs = [y.clone() for y in ys]
    if case.via_backend:
        backend = TritonLora(device)
        layer_batch = backend.prepare(data["runs"], data["slot_ranks"], case.rank, data["total"])
        assert isinstance(layer_batch.table, triton_ops.TritonBatch)
        apply_lora(backend, outs[0], x, lora_as[0], lora_bs[0], layer_batch)
    elif len(case.d_outs) == 1:
        v = triton_ops.sgmv_shrink(x, lora_as[0], tb, split_k=case.split_k)
        triton_ops.sgmv_expand(outs[0], v, lora_bs[0], tb)
    elif not case.stacked and case.split_k is None:
        triton_ops.sgmv_lora_multi(outs, x, lora_as, lora_bs, tb)
    else:
        pools = torch.stack(lora_as) if case.stacked else lora_as
        v = triton_ops.sgmv_shrink_multi(x, pools, tb, split_k=case.split_k)
        for p in range(len(outs)):
            triton_ops.sgmv_expand(outs[p], v[p], lora_bs[p], tb)

    tol = TOL[case.dtype]
    base_rows = torch.tensor([s < 0 for s in token_slot], device=device)
    for y0, out, a, b in zip(ys, outs, lora_as, lora_bs):
        x_c, a_c, b_c = x.cpu(), a.cpu(), b.cpu()
        expected = y0.cpu().double() + per_token_lora(x_c, a_c, b_c, token_slot, data["slot_ranks"])
        torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol)
        assert torch.equal(out[base_rows], y0[base_rows]), "base-model tokens were changed"
        torch_path = y0.clone()  # the torch backend's segment form is the reference
        reference = TorchLora(x.dtype, device, dense_max_token_slots=0)
        apply_lora(reference, torch_path, x, a, b, reference.prepare(data["runs"], data["slot_ranks"], case.rank, data["total"]))
        torch.testing.assert_close(out, torch_path, rtol=tol, atol=tol)


# -- host side (no triton needed) ------------------------------------------------------------


def test_build_triton_batch_holds_the_segment_table() -> None:
    tb = build_triton_batch(token_segments([(-1, 3), (0, 2), (0, 1), (2, 4)], [4, 0, 8], 10), 10, torch.device("cpu"))
    assert tb.starts.tolist() == [3, 6] and tb.lengths.tolist() == [3, 4]
    assert tb.slots.tolist() == [0, 2] and tb.ranks.tolist() == [4, 8]
    assert tb.starts.dtype == torch.int32
    assert (tb.num_segments, tb.num_tokens, tb.max_length, tb.max_rank) == (2, 10, 4, 8)
    with pytest.raises(ValueError, match="at least one segment"):
        build_triton_batch([], 4, torch.device("cpu"))


def test_rank_tile_follows_the_smallest_rank_of_the_step() -> None:
    """Mixed ranks: tiles of the smallest rank, so a rank-4 segment runs one tile of 16, a rank-64 one four."""
    from loraplex.lora.triton_ops import _block_r

    tb = build_triton_batch(token_segments([(0, 1), (1, 1), (2, 1)], [4, 64, 16], 3), 3, torch.device("cpu"))
    assert (tb.min_rank, tb.max_rank) == (4, 64)
    assert _block_r(tb.min_rank) == 16 and _block_r(64) == 64 and _block_r(24) == 32


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter accepts CPU tensors")
def test_kernels_refuse_cpu_tensors_with_a_reason() -> None:
    from loraplex.lora import triton_ops

    tb = build_triton_batch(token_segments([(0, 2)], [4], 2), 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="triton|CUDA"):
        triton_ops.sgmv_lora(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), tb)


# -- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
def test_kernels_match_reference_on_cuda(case: Case) -> None:
    run_case(case, torch.device("cuda"))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", [c for c in INTERPRET_CASES if len(c.d_outs) > 1 or c.split_k or c.mixed], ids=lambda c: c.id)
def test_fused_and_split_k_paths_on_cuda(case: Case) -> None:
    run_case(case, torch.device("cuda"))


# -- Triton's interpreter on the CPU ----------------------------------------------------------


@pytest.fixture(scope="module")
def interpreter_verdicts() -> dict[str, str | None]:
    """Run every interpreter case in one subprocess; case id -> None (passed) or the error."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--interpret"], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton) for its CPU interpreter")
@pytest.mark.timeout(700)  # the first case's setup runs every case in one interpreter subprocess (~25 s idle)
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: c.id)
def test_kernels_match_reference_in_interpreter(case: Case, interpreter_verdicts: dict[str, str | None]) -> None:
    error = interpreter_verdicts[case.id]
    assert error is None, error


def _interpret_main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running the interpreter cases")
    torch.set_num_threads(1)  # many tiny numpy ops: threads only add overhead
    verdicts: dict[str, str | None] = {}
    for case in INTERPRET_CASES:
        try:
            run_case(case, torch.device("cpu"))
            verdicts[case.id] = None
        except Exception as e:  # report every case, not only the first failure
            verdicts[case.id] = f"{type(e).__name__}: {e}"
    print(json.dumps(verdicts))


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpret_main()
