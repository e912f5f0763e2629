"""One RRCAB pass in two launches: ``rrcab_conv1`` then ``rrcab_conv2``.

Contract (NHWC contiguous [N, H, W, C]; storage fp16 or fp32, accumulation fp32):
  conv1  reads the pass input as a deferred :class:`Source` ``x = t + CA(u) + e1 + e2`` and
         writes ``a = ReLU(gconv3x3(x) + b1)``; if ``x_out`` is given it also writes ``x`` (rounded
         to the storage dtype, exactly what the conv saw) for the next pass's residual.
  conv2  reads ``a`` and writes ``u = conv1x1(ReLU(gconv3x3(a) + b2)) + b3``, pre-CA, and adds the
         per-sample channel sums of ``u`` (fp32, before rounding) into ``sums`` [N, C], which the
         caller zeroes. The pass's result ``x + CA(u)`` is left to whichever kernel reads it next.
Between the two, ``a`` makes one round trip through memory: a 3×3 conv of a 3×3 conv needs a
2-pixel halo that Triton cannot keep on chip without recomputing conv1 nine times.

Grouped convs run as ``tl.dot`` on 16-channel chunks: every group size here (4, 8 or 16 channels)
divides 16, so output chunk j only reads input chunk j, and the block-diagonal 16×16 weight wastes
16 / (channels per group) of its MACs instead of C_padded / (channels per group).
Packed weights (engine/backends/triton.py): ``w`` [9, NCHUNK, 16, 16] (tap, chunk, in, out), bias [CP]
fp32; ``w3`` [NCHUNK, 16, CP] (in, out) for the 1×1, ``b3`` [CP] fp32. Weights are in the storage
dtype; CP is C padded to a power of two, NCHUNK = ceil(C / 16).
"""

import torch
import triton
import triton.language as tl

from .source import (Source, ca_scale, check_nhwc, gpu_tiles, load_source, mma, source_args, stages,
                     tap_pixels, tile_pixels)


@triton.jit
def conv1_chunk(t_ptr, u_ptr, e1_ptr, e2_ptr, sums_ptr, ca_w1, ca_b1, ca_w2t, ca_b2, inv_hw, w_ptr, b_ptr,
                x_ptr, own, n, r, c, H, W, j,
                C: tl.constexpr, DEFERRED: tl.constexpr, N_ADD: tl.constexpr, WRITE_X: tl.constexpr,
                FP16: tl.constexpr, CP: tl.constexpr, CRP: tl.constexpr, NCHUNK: tl.constexpr):
    """``ReLU(gconv3x3(x) + b)`` for 16-channel chunk ``j`` at pixels (r, c), fp32, where x is the
    Source finished while loading (rounded to the storage dtype of ``x_ptr``); with ``WRITE_X`` the
    centre tap's x is stored at the pixels ``own`` marks. Shared by the two-launch and fused passes."""
    ci = tl.arange(0, 16)
    ch = j * 16 + ci
    ch_ok = ch < C
    if DEFERRED:
        scale = ca_scale(sums_ptr, n, C, inv_hw, ca_w1, ca_b1, ca_w2t, ca_b2, j * 16, 16, CP, CRP)
    else:
        scale = tl.zeros([16], tl.float32)
    acc = tl.zeros([r.shape[0], 16], tl.float32)
    for tap in tl.range(9):  # rolled: unrolled taps hoist every load and spill (ptxas)
        pix, ok = tap_pixels(n, r, c, tap, H, W)
        offs = pix[:, None] * C + ch[None, :]
        mask = ok[:, None] & ch_ok[None, :]
        x = load_source(t_ptr, u_ptr, e1_ptr, e2_ptr, offs, mask, scale, DEFERRED, N_ADD)
        x = x.to(x_ptr.dtype.element_ty)
        if WRITE_X:
            tl.store(x_ptr + offs, x, mask=mask & (own[:, None] & (tap == 4)))
        w = tl.load(w_ptr + ((tap * NCHUNK + j) * 16 + ci[:, None]) * 16 + ci[None, :])
        acc = mma(x, w, acc, FP16)
    return tl.maximum(acc + tl.load(b_ptr + ch)[None, :], 0.0)


@triton.jit(do_not_specialize=["H", "W"])
def _rrcab_conv1_kernel(
    t_ptr, u_ptr, e1_ptr, e2_ptr, sums_ptr, ca_w1, ca_b1, ca_w2t, ca_b2, inv_hw,
    w_ptr, b_ptr, a_ptr, x_ptr, H, W, C: tl.constexpr,
    DEFERRED: tl.constexpr, N_ADD: tl.constexpr, WRITE_X: tl.constexpr, FP16: tl.constexpr,
    CP: tl.constexpr, CRP: tl.constexpr, NCHUNK: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    n, r, c = tile_pixels(W, BH, BW)
    inside = (r < H) & (c < W)
    ci = tl.arange(0, 16)
    for j in tl.static_range(NCHUNK):
        a = conv1_chunk(t_ptr, u_ptr, e1_ptr, e2_ptr, sums_ptr, ca_w1, ca_b1, ca_w2t, ca_b2, inv_hw, w_ptr, b_ptr,
                        x_ptr, inside, n, r, c, H, W, j, C, DEFERRED, N_ADD, WRITE_X, FP16, CP, CRP, NCHUNK)
        ch = j * 16 + ci
        offs = ((n * H + r) * W + c)[:, None] * C + ch[None, :]
        tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=inside[:, None] & (ch < C)[None, :])


@triton.jit(do_not_specialize=["H", "W"])
def _rrcab_conv2_kernel(
    a_ptr, w_ptr, b_ptr, w3_ptr, b3_ptr, u_ptr, sums_ptr, H, W, C: tl.constexpr,
    FP16: tl.constexpr, CP: tl.constexpr, NCHUNK: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    n, r, c = tile_pixels(W, BH, BW)
    inside = (r < H) & (c < W)
    ci = tl.arange(0, 16)
    cp = tl.arange(0, CP)
    u = tl.zeros([BH * BW, CP], tl.float32)
    for j in tl.static_range(NCHUNK):
        ch = j * 16 + ci
        ch_ok = ch < C
        acc = tl.zeros([BH * BW, 16], tl.float32)
        for tap in tl.range(9):
            pix, ok = tap_pixels(n, r, c, tap, H, W)
            offs = pix[:, None] * C + ch[None, :]
            a = tl.load(a_ptr + offs, mask=ok[:, None] & ch_ok[None, :], other=0.0)
            w = tl.load(w_ptr + ((tap * NCHUNK + j) * 16 + ci[:, None]) * 16 + ci[None, :])
            acc = mma(a, w, acc, FP16)
        h = tl.maximum(acc + tl.load(b_ptr + ch)[None, :], 0.0).to(a_ptr.dtype.element_ty)
        w3 = tl.load(w3_ptr + (j * 16 + ci[:, None]) * CP + cp[None, :])
        u = mma(h, w3, u, FP16)
    u += tl.load(b3_ptr + cp)[None, :]
    keep = inside[:, None] & (cp < C)[None, :]
    offs = ((n * H + r) * W + c)[:, None] * C + cp[None, :]
    tl.store(u_ptr + offs, u.to(u_ptr.dtype.element_ty), mask=keep)
    tl.atomic_add(sums_ptr + n * C + cp, tl.sum(tl.where(keep, u, 0.0), axis=0), mask=cp < C)


# Register pressure, from ptxas on sm_90 (benchmarks/compile_kernels.py): with the 9 taps unrolled
# the loads of every tap are hoisted and a tile needs 190–255 registers per thread, spilling in
# some variants; a rolled tap loop needs 64–146. Rolled taps and these warp counts are predictions
# for a memory-bound kernel (occupancy over ILP), to be tuned on the card (benchmarks/NOTES.md).
def launch_config(cp: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(tile rows, tile columns, warps). The interpreter wants few big programs; exact fp32 dots
    hold more per thread (an 8×8 tile at 128 channels spills 31 KB, ptxas), so fp32 tiles are small."""
    if not gpu_tiles():
        return 16, 16, 4
    if dtype == torch.float32:
        return 4, 8, 8
    return (8, 16, 8) if cp <= 32 else (8, 8, 4)


def _grid(n: int, h: int, w: int, bh: int, bw: int) -> tuple[int, int]:
    return triton.cdiv(h, bh) * triton.cdiv(w, bw), n


def rrcab_conv1(src: Source, w: torch.Tensor, b: torch.Tensor, a_out: torch.Tensor,
                x_out: torch.Tensor | None = None) -> None:
    """``a_out = ReLU(gconv3x3(src) + b)``; also ``x_out = src`` (rounded) when given."""
    args = source_args(src)
    n, h, wd, c = src.t.shape
    check_nhwc("a_out", a_out, src.t)
    if x_out is not None:
        check_nhwc("x_out", x_out, src.t)
    nchunk = triton.cdiv(c, 16)
    if w.shape != (9, nchunk, 16, 16) or w.dtype != src.t.dtype:
        raise ValueError(f"conv1 weight: expected (9, {nchunk}, 16, 16) {src.t.dtype}, got {tuple(w.shape)} {w.dtype}")
    bh, bw, warps = launch_config(args["consts"]["CP"], src.t.dtype)
    _rrcab_conv1_kernel[_grid(n, h, wd, bh, bw)](
        *args["ptrs"], args["sums"], *args["ca"], args["inv_hw"],
        w, b, a_out, x_out if x_out is not None else a_out, h, wd, c,
        WRITE_X=x_out is not None, FP16=src.t.dtype == torch.float16, NCHUNK=nchunk, BH=bh, BW=bw,
        num_warps=warps, num_stages=stages(src.t.dtype),
        **args["consts"],
    )


def rrcab_conv2(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
                u_out: torch.Tensor, sums: torch.Tensor) -> None:
    """``u_out = conv1x1(ReLU(gconv3x3(a) + b)) + b3`` and ``sums += Σ_hw u_out`` (fp32)."""
    n, h, wd, c = a.shape
    if not a.is_contiguous():
        raise ValueError("a: expected a contiguous NHWC tensor")
    check_nhwc("u_out", u_out, a)
    nchunk = triton.cdiv(c, 16)
    cp = triton.next_power_of_2(c)
    if w.shape != (9, nchunk, 16, 16) or w3.shape != (nchunk, 16, cp):
        raise ValueError(f"conv2 weights: got {tuple(w.shape)} and {tuple(w3.shape)} for {c} channels")
    if sums.shape != (n, c) or sums.dtype != torch.float32:
        raise ValueError(f"sums: expected ({n}, {c}) float32, got {tuple(sums.shape)} {sums.dtype}")
    bh, bw, warps = launch_config(cp, a.dtype)
    _rrcab_conv2_kernel[_grid(n, h, wd, bh, bw)](
        a, w, b, w3, b3, u_out, sums, h, wd, c,
        FP16=a.dtype == torch.float16, CP=cp, NCHUNK=nchunk, BH=bh, BW=bw,
        num_warps=warps, num_stages=stages(a.dtype),
    )
