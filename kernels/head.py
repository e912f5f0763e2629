"""The network's entry in one kernel: bilinear ×S upsample → sub_mean → head 3×3 conv 3→n.

Input: the LR image, NCHW contiguous [N, 3, h, w] (fp16 or fp32, 0–255). Output: NHWC [N, S·h,
S·w, n] in the storage dtype. The upsampled image never exists in memory: each tap of the conv
samples the LR image bilinearly (PyTorch's ``align_corners=False`` rule: source coordinate
``(dst + 0.5) / S − 0.5`` clamped below at 0) and applies the trained 3×3 MeanShift mix; outside the
image the tap reads 0, as the reference's zero padding does *after* sub_mean.
Packed weights (fp32): ``mean_w`` [3, 3], ``mean_b`` [3]; ``w`` [9, 3, NP] (tap, in, out), ``b`` [NP];
NP = n padded to a power of two. 27 rank-1 FMA updates per pixel: too thin for ``tl.dot``.
"""

import torch
import triton
import triton.language as tl

from .source import gpu_tiles, tile_pixels


@triton.jit
def _bilinear(x_ptr, base, r, c, h, w, INV_S: tl.constexpr):
    sy = tl.maximum((r.to(tl.float32) + 0.5) * INV_S - 0.5, 0.0)
    sx = tl.maximum((c.to(tl.float32) + 0.5) * INV_S - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    y1 = tl.minimum(y0 + 1, h - 1)
    x1 = tl.minimum(x0 + 1, w - 1)
    v00 = tl.load(x_ptr + base + y0 * w + x0).to(tl.float32)
    v01 = tl.load(x_ptr + base + y0 * w + x1).to(tl.float32)
    v10 = tl.load(x_ptr + base + y1 * w + x0).to(tl.float32)
    v11 = tl.load(x_ptr + base + y1 * w + x1).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _head_kernel(x_ptr, mean_w, mean_b, w_ptr, b_ptr, out_ptr, h, w, H, W, C: tl.constexpr,
                 NP: tl.constexpr, INV_S: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    n, r, c = tile_pixels(W, BH, BW)
    co = tl.arange(0, NP)
    acc = tl.zeros([BH * BW, NP], tl.float32)
    for tap in tl.range(9):  # rolled: unrolled, the 9 taps' gathers spill registers (ptxas)
        rr = r + (tap // 3 - 1)
        cc = c + (tap % 3 - 1)
        ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        rr = tl.minimum(tl.maximum(rr, 0), H - 1)
        cc = tl.minimum(tl.maximum(cc, 0), W - 1)
        red = _bilinear(x_ptr, (n * 3 + 0) * h * w, rr, cc, h, w, INV_S)
        green = _bilinear(x_ptr, (n * 3 + 1) * h * w, rr, cc, h, w, INV_S)
        blue = _bilinear(x_ptr, (n * 3 + 2) * h * w, rr, cc, h, w, INV_S)
        for ch in tl.static_range(3):
            y = (tl.load(mean_w + ch * 3 + 0) * red + tl.load(mean_w + ch * 3 + 1) * green
                 + tl.load(mean_w + ch * 3 + 2) * blue + tl.load(mean_b + ch))
            y = tl.where(ok, y, 0.0)
            acc += y[:, None] * tl.load(w_ptr + (tap * 3 + ch) * NP + co)[None, :]
    acc += tl.load(b_ptr + co)[None, :]
    offs = ((n * H + r) * W + c)[:, None] * C + co[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=((r < H) & (c < W))[:, None] & (co < C)[None, :])


def head(x: torch.Tensor, scale: int, mean_w: torch.Tensor, mean_b: torch.Tensor, w: torch.Tensor,
         b: torch.Tensor, out: torch.Tensor) -> None:
    n, three, h, wd = x.shape
    if three != 3 or not x.is_contiguous():
        raise ValueError(f"head: expected a contiguous NCHW [N, 3, h, w] image, got {tuple(x.shape)}")
    H, W = scale * h, scale * wd
    c = out.shape[-1]
    np_ = triton.next_power_of_2(c)
    if out.shape != (n, H, W, c) or not out.is_contiguous():
        raise ValueError(f"head: out must be a contiguous ({n}, {H}, {W}, C) tensor, got {tuple(out.shape)}")
    if w.shape != (9, 3, np_) or b.shape != (np_,):
        raise ValueError(f"head: weights packed for {w.shape[-1]} channels, output has {c}")
    bh, bw = (8, 16) if gpu_tiles() else (16, 16)
    _head_kernel[(triton.cdiv(H, bh) * triton.cdiv(W, bw), n)](
        x, mean_w, mean_b, w, b, out, h, wd, H, W, c, NP=np_, INV_S=1.0 / scale, BH=bh, BW=bw,
    )
