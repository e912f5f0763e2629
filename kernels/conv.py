"""Dense NHWC convolution for the layers between RRCAB blocks, with the epilogues they need.

One kernel covers every remaining layer of MSFIN:
  * 3×3 convs, stride 1 or 2 (the down-sampling blocks), optional LeakyReLU(0.2), optional bias;
  * 3×3 conv + PixelShuffle(2) (the up-sampling blocks): the GEMM's output channel
    ``c·4 + i·2 + j`` is stored at pixel ``(2y + i, 2x + j)``, channel ``c``;
  * ConvTranspose2d(kernel 2, stride 2): a 1×1 GEMM to ``4·C_out`` channels with that same store;
  * 1×1 convs over a concatenation of up to three equally wide inputs (``c1``, ``c2``): each input
    is its own K-range of the GEMM, so the concatenation is never built.
A single input may be a deferred :class:`Source` (``t + CA(u) + e1 + e2``, see source.py), finished
as it loads, so a block's output feeding an up-sampling conv needs no ``materialize`` pass.
Layout: inputs and output NHWC contiguous, storage fp16 or fp32, fp32 accumulation. Zero padding.
Packed weights (engine/backends/triton.py): ``w`` [K·K, NSRC·KCHUNK, 16, NP] (tap, input chunk, in, out),
bias [NP] fp32; KCHUNK = ceil(C_src / 16), NP = GEMM output channels padded to a power of two.
"""

import torch
import triton
import triton.language as tl

from .source import (Source, ca_scale, gpu_tiles, load_source, mma, source_args, stages, tile_pixels,
                     unused_fp32)


@triton.jit(do_not_specialize=["H_in", "W_in", "H_out", "W_out"])
def _conv_kernel(
    x0_ptr, x1_ptr, x2_ptr, u_ptr, e1_ptr, e2_ptr, sums_ptr, ca_w1, ca_b1, ca_w2t, ca_b2, inv_hw,
    w_ptr, b_ptr, out_ptr, H_in, W_in, C_src: tl.constexpr, H_out, W_out, C_gemm: tl.constexpr,
    NSRC: tl.constexpr, KSIZE: tl.constexpr, STRIDE: tl.constexpr, KCHUNK: tl.constexpr,
    NP: tl.constexpr, LEAKY: tl.constexpr, SHUFFLE: tl.constexpr, FP16: tl.constexpr,
    DEFERRED: tl.constexpr, N_ADD: tl.constexpr, CP: tl.constexpr, CRP: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr,
):
    n, r, c = tile_pixels(W_out, BH, BW)
    ci = tl.arange(0, 16)
    co = tl.arange(0, NP)
    acc = tl.zeros([BH * BW, NP], tl.float32)
    for tap in tl.range(KSIZE * KSIZE):
        ri = r * STRIDE + (tap // KSIZE - KSIZE // 2)
        cj = c * STRIDE + (tap % KSIZE - KSIZE // 2)
        ok = (ri >= 0) & (ri < H_in) & (cj >= 0) & (cj < W_in) & (r < H_out) & (c < W_out)
        pix = (n * H_in + ri) * W_in + cj
        for s in tl.static_range(NSRC):
            if s == 0:
                src = x0_ptr
            elif s == 1:
                src = x1_ptr
            else:
                src = x2_ptr
            for k in tl.static_range(KCHUNK):
                ch = k * 16 + ci
                offs = pix[:, None] * C_src + ch[None, :]
                mask = ok[:, None] & (ch < C_src)[None, :]
                if DEFERRED or N_ADD > 0:  # a single deferred input, finished while loading
                    if DEFERRED:
                        scale = ca_scale(sums_ptr, n, C_src, inv_hw, ca_w1, ca_b1, ca_w2t, ca_b2, k * 16, 16,
                                         CP, CRP)
                    else:
                        scale = tl.zeros([16], tl.float32)
                    x = load_source(src, u_ptr, e1_ptr, e2_ptr, offs, mask, scale, DEFERRED, N_ADD)
                    x = x.to(out_ptr.dtype.element_ty)
                else:
                    x = tl.load(src + offs, mask=mask, other=0.0)
                w = tl.load(w_ptr + ((tap * NSRC * KCHUNK + s * KCHUNK + k) * 16 + ci[:, None]) * NP + co[None, :])
                acc = mma(x, w, acc, FP16)
    acc += tl.load(b_ptr + co)[None, :]
    if LEAKY:
        acc = tl.where(acc >= 0, acc, 0.2 * acc)
    keep = ((r < H_out) & (c < W_out))[:, None] & (co < C_gemm)[None, :]
    if SHUFFLE:
        c_out = C_gemm // 4
        oc = co // 4
        orow = 2 * r[:, None] + ((co // 2) % 2)[None, :]
        ocol = 2 * c[:, None] + (co % 2)[None, :]
        offs = ((n * 2 * H_out + orow) * (2 * W_out) + ocol) * c_out + oc[None, :]
    else:
        offs = ((n * H_out + r) * W_out + c)[:, None] * C_gemm + co[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=keep)


def conv(inputs: list[torch.Tensor] | Source, w: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
         ksize: int, stride: int, leaky: bool, shuffle: bool) -> None:
    """``out = epilogue(conv(concat(inputs)))``; ``inputs`` may instead be one deferred Source."""
    if isinstance(inputs, Source):
        args = source_args(inputs)
        deferred = dict(ptrs=args["ptrs"][1:], sums=args["sums"], ca=args["ca"], inv_hw=args["inv_hw"],
                        consts=args["consts"])
        inputs = [inputs.t]
    else:
        x0 = inputs[0]
        dummy = unused_fp32(x0.device)
        deferred = dict(ptrs=(x0, x0, x0), sums=dummy, ca=(dummy,) * 4, inv_hw=1.0,
                        consts=dict(DEFERRED=False, N_ADD=0, CP=16, CRP=1))
    if not 1 <= len(inputs) <= 3:
        raise ValueError(f"conv takes 1 to 3 inputs, got {len(inputs)}")
    x0 = inputs[0]
    n, h_in, w_in, c_src = x0.shape
    for x in inputs:
        if x.shape != x0.shape or x.dtype != x0.dtype or not x.is_contiguous():
            raise ValueError("conv inputs must be contiguous NHWC tensors of one shape and dtype")
    if ksize not in (1, 3) or stride not in (1, 2):
        raise ValueError(f"unsupported conv: kernel {ksize}, stride {stride}")
    h_out, w_out = (h_in - 1) // stride + 1, (w_in - 1) // stride + 1
    kchunk = triton.cdiv(c_src, 16)
    taps, chunks, np_ = w.shape[0], w.shape[1], w.shape[3]
    if taps != ksize * ksize or chunks != len(inputs) * kchunk or w.shape[2] != 16 or w.dtype != x0.dtype:
        raise ValueError(f"conv weight {tuple(w.shape)} {w.dtype} does not fit {len(inputs)} × {c_src} channels")
    c_gemm = out.shape[-1] * (4 if shuffle else 1)
    want = (n, 2 * h_out, 2 * w_out) if shuffle else (n, h_out, w_out)
    if out.shape[:3] != want or out.dtype != x0.dtype or not out.is_contiguous() or c_gemm > np_:
        raise ValueError(f"conv out: expected a contiguous {want} × C tensor, got {tuple(out.shape)}")
    if not gpu_tiles():
        bh, bw, warps = 16, 16, 4
    elif x0.dtype == torch.float32:  # exact fp32 dots hold more per thread: 8×8 tiles spill 28 KB (ptxas)
        bh, bw, warps = 4, 8, 8
    else:
        bh, bw, warps = (8, 16, 4) if np_ <= 32 else (8, 8, 4)
    xs = list(inputs) + [x0] * (3 - len(inputs))
    _conv_kernel[(triton.cdiv(h_out, bh) * triton.cdiv(w_out, bw), n)](
        *xs, *deferred["ptrs"], deferred["sums"], *deferred["ca"], deferred["inv_hw"],
        w, b, out, h_in, w_in, c_src, h_out, w_out, c_gemm,
        NSRC=len(inputs), KSIZE=ksize, STRIDE=stride, KCHUNK=kchunk, NP=np_, LEAKY=leaky, SHUFFLE=shuffle,
        FP16=x0.dtype == torch.float16, BH=bh, BW=bw, num_warps=warps, num_stages=stages(x0.dtype),
        **deferred["consts"],
    )
