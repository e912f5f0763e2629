"""The network's exit in one kernel: finish the last deferred value → tail 3×3 conv n→3 → add_mean.

Input: a :class:`Source` (NHWC, usually the last RRCAB's ``t + CA(u)``). Output: NCHW contiguous
[N, 3, H, W] in the storage dtype, what the reference returns. ``add_mean`` (a trained 3×3 mix) is
folded into the conv at packing time, ``w' = M·w``, ``b' = M·b + b_mean``: exact, because nothing
sits between the two. Packed: ``w`` [9, NCHUNK, 16, 16] (tap, chunk, in, out; outputs 0–2 used),
``b`` [16] fp32.
"""

import torch
import triton
import triton.language as tl

from .source import Source, ca_scale, gpu_tiles, load_source, mma, source_args, tap_pixels, tile_pixels


@triton.jit(do_not_specialize=["H", "W"])
def _tail_kernel(
    t_ptr, u_ptr, e1_ptr, e2_ptr, sums_ptr, ca_w1, ca_b1, ca_w2t, ca_b2, inv_hw,
    w_ptr, b_ptr, out_ptr, H, W, C: tl.constexpr,
    DEFERRED: tl.constexpr, N_ADD: tl.constexpr, FP16: tl.constexpr,
    CP: tl.constexpr, CRP: tl.constexpr, NCHUNK: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    n, r, c = tile_pixels(W, BH, BW)
    ci = tl.arange(0, 16)
    acc = tl.zeros([BH * BW, 16], tl.float32)
    for j in tl.static_range(NCHUNK):
        ch = j * 16 + ci
        if DEFERRED:
            scale = ca_scale(sums_ptr, n, C, inv_hw, ca_w1, ca_b1, ca_w2t, ca_b2, j * 16, 16, CP, CRP)
        else:
            scale = tl.zeros([16], tl.float32)
        for tap in tl.range(9):  # rolled, as in rrcab.py (register pressure)
            pix, ok = tap_pixels(n, r, c, tap, H, W)
            offs = pix[:, None] * C + ch[None, :]
            x = load_source(t_ptr, u_ptr, e1_ptr, e2_ptr, offs, ok[:, None] & (ch < C)[None, :], scale,
                            DEFERRED, N_ADD)
            w = tl.load(w_ptr + ((tap * NCHUNK + j) * 16 + ci[:, None]) * 16 + ci[None, :])
            acc = mma(x.to(t_ptr.dtype.element_ty), w, acc, FP16)
    acc += tl.load(b_ptr + ci)[None, :]
    offs = (n * 3 + ci[None, :]) * (H * W) + (r * W + c)[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=((r < H) & (c < W))[:, None] & (ci < 3)[None, :])


def tail(src: Source, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    args = source_args(src)
    n, h, wd, c = src.t.shape
    nchunk = triton.cdiv(c, 16)
    if out.shape != (n, 3, h, wd) or out.dtype != src.t.dtype or not out.is_contiguous():
        raise ValueError(f"tail: out must be a contiguous ({n}, 3, {h}, {wd}) {src.t.dtype} tensor")
    if w.shape != (9, nchunk, 16, 16) or b.shape != (16,):
        raise ValueError(f"tail: weights packed for another width: {tuple(w.shape)}")
    bh, bw = (8, 16) if gpu_tiles() else (16, 16)
    _tail_kernel[(triton.cdiv(h, bh) * triton.cdiv(wd, bw), n)](
        *args["ptrs"], args["sums"], *args["ca"], args["inv_hw"], w, b, out, h, wd, c,
        FP16=src.t.dtype == torch.float16, NCHUNK=nchunk, BH=bh, BW=bw, **args["consts"],
    )
