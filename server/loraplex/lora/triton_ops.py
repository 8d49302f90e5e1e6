"""Triton kernels for the grouped LoRA op on CUDA: SGMV shrink and expand over segments.

    x [T, d_in]                                    segment s = tokens [start, start+len) of one slot
      │  shrink: v[t] = x[t] @ A[slot(s)]ᵀ         grid (P · rank tiles · K splits, segments, token tiles)
      ▼                                            K split > 1 (decode): partial sums atomically added
    v [P, T, R] fp32                               into a zeroed fp32 buffer
      │  expand: y[t] += v[t] @ Bᵀ[slot(s)]        grid (d_out tiles, segments, token tiles)
      ▼                                            fp32 accumulate, one rounding into y, in place
    y [T, d_out]

Tokens outside every segment (base-model requests) are never read or written. A pool is
A: [slots, r_max, d_in] and Bᵀ: [slots, r_max, d_out] (see lora_backend.py); rows past an
adapter's rank are masked, not loaded. Projections that share their input (q/k/v,
gate/up) run their shrinks in one launch with a projection axis P: the A pools come either
stacked [P, slots, r_max, d_in] or as a list, read through a table of base pointers.

Why split-K: at decode a segment is one token, so a grid over segments × token tiles has
only as many programs as adapters in the batch, each streaming a whole A[slot] (r × d_in)
alone. Splitting d_in across programs puts every SM to work on the memory-bound read
(~2 programs per SM). The atomics make v's last fp32 bits depend on the run, not the batch.

Each segment costs its own rank, whatever the pool's r_max: loads past a segment's rank are
masked (never read), a shrink program whose rank tile lies past its segment's rank returns
at once, and the expand loops over its segment's rank only. The rank tile is the step's
*smallest* rank rounded up to a power of two within [16, 64] (tl.dot's minimum is 16), so
in a step of mixed ranks a rank-8 segment runs one tile of 16 while a rank-64 one runs four;
with one rank in the step, one tile covers it.

Tiles: token tile 16 / 32 / 64 by the longest segment (16 at decode); rank tile as above;
K tile 256 / 128 / 64 so a decode program streams wide rows of A; d_out tile 128 (64 for
long segments).

The metadata (`TritonBatch`) is built once per step (TritonLora.prepare in triton_lora.py)
and shared by every layer; the grid sizes it needs (segments, longest segment, largest rank)
are Python ints, so no launch waits on the device. The module imports without triton or
CUDA; the kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.lora.lora_backend import Segment

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the module imports, the kernels do not exist
    HAVE_TRITON = False

MIN_DOT = 16  # tl.dot needs every block dimension >= 16


@dataclass(frozen=True, slots=True)
class TritonBatch:
    """Per-step segment table on the device, plus the host-side sizes the grids need."""

    starts: torch.Tensor  # [S] int32, first token of each segment
    lengths: torch.Tensor  # [S] int32
    slots: torch.Tensor  # [S] int32
    ranks: torch.Tensor  # [S] int32, the adapter's largest rank; rows past it are zero
    num_segments: int
    num_tokens: int
    max_length: int  # longest segment: the token-tile axis of the grids
    max_rank: int  # largest rank in the step: how many rank tiles the shrink grid has
    min_rank: int  # smallest rank in the step: the rank tile size


def build_triton_batch(segments: Sequence[Segment], num_tokens: int, device: torch.device) -> TritonBatch:
    """One host→device copy per step; every layer reads the same tensors."""
    if not segments:
        raise ValueError("a Triton LoRA batch needs at least one segment")
    table = torch.tensor(
        [[s.start for s in segments], [s.end - s.start for s in segments], [s.slot for s in segments],
         [s.rank for s in segments]],
        dtype=torch.int32,
    ).to(device, non_blocking=True)  # [4, S]
    return TritonBatch(
        starts=table[0],
        lengths=table[1],
        slots=table[2],
        ranks=table[3],
        num_segments=len(segments),
        num_tokens=num_tokens,
        max_length=max(s.end - s.start for s in segments),
        max_rank=max(s.rank for s in segments),
        min_rank=min(s.rank for s in segments),
    )


# -- launch configuration (host) ------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(*tensors: torch.Tensor) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("the Triton LoRA kernels need the triton package (CUDA builds of torch ship it)")
    for t in tensors:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"the Triton LoRA kernels run on CUDA tensors (got {t.device}); "
                "use the torch ops in lora_ops.py, or set TRITON_INTERPRET=1 before importing triton"
            )
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x, A, Bᵀ and y must share one dtype of fp16 / bf16 / fp32, got {[t.dtype for t in tensors]}")


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: small, so the tests still take the split-K path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_t(max_length: int) -> int:
    return 16 if max_length <= 16 else 32 if max_length <= 32 else 64


def _block_r(rank: int) -> int:
    return min(max(MIN_DOT, 1 << (rank - 1).bit_length()), 64)


def _split_k(num_programs: int, d_in: int, block_k: int, device: torch.device) -> int:
    """Enough K splits for ~2 programs per SM, never a split narrower than one K block."""
    target = 2 * _num_sms(device)
    split = 1
    while num_programs * split < target and split * 2 * block_k <= d_in:
        split *= 2
    return split


def _precision(dtype: torch.dtype) -> str:
    # fp32 as torch computes it (no TF32); for fp16 / bf16 "tf32" is tl.dot's default and means nothing.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton#11584): compute in fp32 there.
    return _interpreting() and dtype == torch.bfloat16


# -- kernels ----------------------------------------------------------------------------------

if HAVE_TRITON:
    # Per-step counts are not specialised on (== 1, % 16): a new batch shape must not trigger
    # a compile in the middle of serving. Sizes and strides stay specialised for aligned loads.

    @triton.jit(do_not_specialize=["k_per_split", "num_splits", "num_r_tiles"])
    def _shrink_kernel(
        x_ptr, a_ptr, v_ptr,  # x: [T, d_in]; a: [P, slots, r, d_in] (or int64 [P] base pointers); v: [P, T, R] fp32
        starts_ptr, lengths_ptr, slots_ptr, ranks_ptr,  # [S] int32
        d_in, k_per_split, num_splits, num_r_tiles,
        stride_xt, stride_xk,
        stride_ap, stride_as, stride_ar, stride_ak,
        stride_vp, stride_vt, stride_vr,
        A_TABLE: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)  # (projection, rank tile, K split)
        seg = tl.program_id(1)
        t0 = tl.program_id(2) * BLOCK_T
        length = tl.load(lengths_ptr + seg)
        if t0 >= length:
            return
        k_split = pid % num_splits
        r_tile = (pid // num_splits) % num_r_tiles
        p = pid // (num_splits * num_r_tiles)
        rank = tl.load(ranks_ptr + seg)
        if r_tile * BLOCK_R >= rank:
            return
        start = tl.load(starts_ptr + seg).to(tl.int64)
        slot = tl.load(slots_ptr + seg).to(tl.int64)
        if A_TABLE:
            a_base = tl.load(a_ptr + p).to(tl.pointer_type(x_ptr.dtype.element_ty))
        else:
            a_base = a_ptr + p.to(tl.int64) * stride_ap
        a_base += slot * stride_as

        offs_t = t0 + tl.arange(0, BLOCK_T)
        offs_r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
        t_mask = offs_t < length
        r_mask = offs_r < rank
        rows = start + offs_t  # [BLOCK_T] token index in the packed batch
        k_lo = k_split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, d_in)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            x = tl.load(  # [BLOCK_T, BLOCK_K]
                x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=t_mask[:, None] & k_mask[None, :], other=0.0,
            )
            a = tl.load(  # Aᵀ tile: [BLOCK_K, BLOCK_R]
                a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=r_mask[None, :] & k_mask[:, None], other=0.0,
            )
            if UPCAST:
                x, a = x.to(tl.float32), a.to(tl.float32)
            acc += tl.dot(x, a, input_precision=PRECISION)

        v_ptrs = v_ptr + p.to(tl.int64) * stride_vp + rows[:, None] * stride_vt + offs_r[None, :] * stride_vr
        v_mask = t_mask[:, None] & r_mask[None, :]
        if ATOMIC:
            tl.atomic_add(v_ptrs, acc, mask=v_mask, sem="relaxed")
        else:
            tl.store(v_ptrs, acc, mask=v_mask)

    @triton.jit
    def _expand_kernel(
        v_ptr, b_ptr, y_ptr,  # v: [T, R] fp32; b: [slots, r, d_out]; y: [T, d_out]
        starts_ptr, lengths_ptr, slots_ptr, ranks_ptr,  # [S] int32
        d_out,
        stride_vt, stride_vr,
        stride_bs, stride_br, stride_bn,
        stride_yt, stride_yn,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        seg = tl.program_id(1)
        t0 = tl.program_id(2) * BLOCK_T
        length = tl.load(lengths_ptr + seg)
        if t0 >= length:
            return
        start = tl.load(starts_ptr + seg).to(tl.int64)
        slot = tl.load(slots_ptr + seg).to(tl.int64)
        rank = tl.load(ranks_ptr + seg)
        b_base = b_ptr + slot * stride_bs

        offs_t = t0 + tl.arange(0, BLOCK_T)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        t_mask = offs_t < length
        n_mask = offs_n < d_out
        rows = start + offs_t
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            v = tl.load(  # [BLOCK_T, BLOCK_R]
                v_ptr + rows[:, None] * stride_vt + offs_r[None, :] * stride_vr,
                mask=t_mask[:, None] & r_mask[None, :], other=0.0,
            )
            b = tl.load(  # Bᵀ tile: [BLOCK_R, BLOCK_N]
                b_base + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0,
            )
            if UPCAST:
                b = b.to(tl.float32)
            else:
                v = v.to(b_ptr.dtype.element_ty)  # round v once, as the torch path does
            acc += tl.dot(v, b, input_precision=PRECISION)

        y_ptrs = y_ptr + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn
        y_mask = t_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


# -- ops ----------------------------------------------------------------------------------------


@functools.cache
def _pointer_table(ptrs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Pools live as long as the model, so one small table per set of layers, made once.
    return torch.tensor(ptrs, dtype=torch.int64, device=device)


def sgmv_shrink_multi(
    x: torch.Tensor, lora_a: torch.Tensor | Sequence[torch.Tensor], batch: TritonBatch, *, split_k: int | None = None
) -> torch.Tensor:
    """v[p, t] = x[t] @ A_p[slot(t)]ᵀ for every projection p sharing x, in one launch.

    x: [T, d_in]; lora_a: [P, slots, r, d_in] or P pools of [slots, r, d_in] with one shape
    and strides; returns v: [P, T, R] fp32 (R = the step's rank, padded to the tile). Rows of
    tokens outside every segment are undefined. split_k: force the number of d_in splits.
    """
    if isinstance(lora_a, torch.Tensor) and lora_a.dim() == 4:  # stacked [P, slots, r, d_in]
        num_proj, sample, a_arg, a_table, stride_ap = lora_a.shape[0], lora_a[0], lora_a, False, lora_a.stride(0)
    else:
        pools = [lora_a] if isinstance(lora_a, torch.Tensor) else list(lora_a)
        num_proj, sample = len(pools), pools[0]
        if any(a.shape != sample.shape or a.stride() != sample.stride() or a.dtype != sample.dtype for a in pools):
            raise ValueError("the A pools of one fused shrink must share shape, strides and dtype")
        if num_proj == 1:
            a_arg, a_table, stride_ap = sample, False, 0
        else:  # separate buffers: the kernel reads each projection's base address from a table
            a_arg, a_table, stride_ap = _pointer_table(tuple(a.data_ptr() for a in pools), x.device), True, 0
    _check(x, sample)
    num_tokens, d_in = x.shape
    if sample.shape[-1] != d_in:
        raise ValueError(f"A has d_in {sample.shape[-1]}, x has {d_in}")
    if batch.max_rank > sample.shape[1]:
        raise ValueError(f"a segment has rank {batch.max_rank}, the pool holds {sample.shape[1]}")

    block_t, block_r = _block_t(batch.max_length), _block_r(batch.min_rank)
    block_k = 256 if block_t == 16 else 128 if block_t == 32 else 64
    num_r_tiles = _cdiv(batch.max_rank, block_r)
    num_t_tiles = _cdiv(batch.max_length, block_t)
    if split_k is None:
        split_k = _split_k(num_proj * num_r_tiles * batch.num_segments * num_t_tiles, d_in, block_k, x.device)
    k_per_split = _cdiv(_cdiv(d_in, split_k), block_k) * block_k
    num_splits = _cdiv(d_in, k_per_split)  # no empty split
    atomic = num_splits > 1
    alloc = torch.zeros if atomic else torch.empty
    v = alloc(num_proj, num_tokens, num_r_tiles * block_r, dtype=torch.float32, device=x.device)  # [P, T, R]

    grid = (num_proj * num_r_tiles * num_splits, batch.num_segments, num_t_tiles)
    _shrink_kernel[grid](
        x, a_arg, v,
        batch.starts, batch.lengths, batch.slots, batch.ranks,
        d_in, k_per_split, num_splits, num_r_tiles,
        x.stride(0), x.stride(1),
        stride_ap, sample.stride(0), sample.stride(1), sample.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        A_TABLE=a_table, ATOMIC=atomic, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=4, num_stages=3,
    )
    return v


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, batch: TritonBatch, *, split_k: int | None = None) -> torch.Tensor:
    """v[t] = x[t] @ A[slot(t)]ᵀ. x: [T, d_in], lora_a: [slots, r, d_in] -> v: [T, R] fp32."""
    return sgmv_shrink_multi(x, lora_a, batch, split_k=split_k)[0]


def sgmv_expand(y: torch.Tensor, v: torch.Tensor, lora_b: torch.Tensor, batch: TritonBatch) -> None:
    """y[t] += v[t] @ Bᵀ[slot(t)] in place. y: [T, d_out], v: [T, R] fp32, lora_b: [slots, r, d_out]."""
    _check(y, lora_b)
    d_out = y.shape[1]
    if lora_b.shape[-1] != d_out:
        raise ValueError(f"Bᵀ has d_out {lora_b.shape[-1]}, y has {d_out}")
    block_t, block_r = _block_t(batch.max_length), _block_r(batch.min_rank)
    block_n = 64 if block_t == 64 else 128
    grid = (_cdiv(d_out, block_n), batch.num_segments, _cdiv(batch.max_length, block_t))
    _expand_kernel[grid](
        v, lora_b, y,
        batch.starts, batch.lengths, batch.slots, batch.ranks,
        d_out,
        v.stride(0), v.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        UPCAST=_upcast(y.dtype), PRECISION=_precision(y.dtype),
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n,
        num_warps=4, num_stages=2,
    )


def sgmv_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: TritonBatch) -> None:
    """y[t] += (x[t] @ A[slot]ᵀ) @ Bᵀ[slot], in place: one shrink, one expand."""
    sgmv_expand(y, sgmv_shrink(x, lora_a, batch), lora_b, batch)


def sgmv_lora_multi(
    ys: Sequence[torch.Tensor], x: torch.Tensor, lora_as: torch.Tensor | Sequence[torch.Tensor],
    lora_bs: Sequence[torch.Tensor], batch: TritonBatch,
) -> None:
    """Projections sharing x (q/k/v, gate/up): one fused shrink, then one expand each."""
    v = sgmv_shrink_multi(x, lora_as, batch)  # [P, T, R]
    if not len(ys) == len(lora_bs) == v.shape[0]:
        raise ValueError(f"{v.shape[0]} A pools, {len(lora_bs)} Bᵀ pools and {len(ys)} outputs do not match")
    for p, (y, lora_b) in enumerate(zip(ys, lora_bs)):
        sgmv_expand(y, v[p], lora_b, batch)
