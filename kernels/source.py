"""Deferred inputs: how a kernel reads a value that an earlier kernel left unfinished.

An RRCAB pass ends in ``t + CA(u)``, and ``CA`` needs the mean of ``u`` over the whole image, which
no tile knows until every tile has run. So the pass writes ``u`` and its channel sums and stops;
the *next* kernel that reads the value finishes it while loading:

    x = t + s[n, c] · u + e1 + e2,     s[n, :] = sigmoid(W2 · relu(W1 · sums[n, :] / (H·W) + b1) + b2)

``u``, ``e1`` and ``e2`` are optional (``DEFERRED``, ``N_ADD``); ``e1``/``e2`` carry the network's
``+`` nodes (e.g. ``d2 + Fd21(A2)``), so sums never take a pass of their own either.

Layout: NHWC contiguous [N, H, W, C]; ``sums`` [N, C] fp32. Channel counts are constexpr in every
kernel: a pixel's row of C=24 fp16 values is 48 bytes, and only a compile-time C lets Triton prove
the 16-byte alignment it needs for vector loads (a runtime 24 gives 2-byte loads; ptxas/PTX check). Channel-attention weights are packed
by the engine, zero-padded to powers of two: ``ca_w1`` [CRP, CP], ``ca_b1`` [CRP],
``ca_w2t`` [CRP, CP] (W2 transposed), ``ca_b2`` [CP]. Everything is computed in fp32.

Shape integers (H, W, tile and program counts, N) are ``do_not_specialize`` in every kernel. By
default Triton compiles a variant per integer argument being 1, divisible by 16 or neither: each
new input shape could cost a compile of every kernel (2–4 variants per argument). The kernels
address NHWC rows through the constexpr C, so divisibility of H or W buys them nothing; compiles now
depend on the channel counts, dtypes and tile constexprs alone (benchmarks/count_compiles.py).
"""

import os

import torch
import triton
import triton.language as tl

from .contract import CAWeights, Source  # noqa: F401  (re-exported for the launchers)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def gpu_tiles() -> bool:
    """Whether launches use the tile sizes chosen for a GPU (4×8, 8×16, 8×8, ...). Always on a GPU.
    The interpreter prefers few big programs (16×16 tiles), unless ``MSFIN_INTERPRET_TILES=gpu``:
    the test setting that runs the GPU's launch configurations (tile shapes, grids, tile-to-pixel
    mappings) on the CPU. Read at every launch, so a test can switch it."""
    return not INTERPRET or os.environ.get("MSFIN_INTERPRET_TILES", "") == "gpu"


def stages(dtype: torch.dtype) -> int:
    """Software-pipeline depth of the tap loops. fp32 operands staged for ``tl.dot`` need up to
    200 KB of shared memory at Triton's default of 3 (ptxas, benchmarks/compile_kernels.py), more
    than an sm_80 block may have (163 KB) and than sm_86/89 allow (99 KB); fp16 keeps 2."""
    return 1 if dtype == torch.float32 else 2


@triton.jit
def tile_pixels(W, BH: tl.constexpr, BW: tl.constexpr):
    """(sample, rows, cols) of this program's BH×BW tile; the grid is (tiles of one image, N)."""
    tile = tl.program_id(0)
    tiles_w = tl.cdiv(W, BW)
    p = tl.arange(0, BH * BW)
    return tl.program_id(1), (tile // tiles_w) * BH + p // BW, (tile % tiles_w) * BW + p % BW


@triton.jit
def tap_pixels(n, r, c, tap, H, W):
    """Flat NHWC pixel index of 3×3 tap ``tap`` around each (r, c), and whether it is in the image."""
    rr = r + (tap // 3 - 1)
    cc = c + (tap % 3 - 1)
    return (n * H + rr) * W + cc, (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)


@triton.jit
def ca_scale(sums_ptr, n, C, inv_hw, ca_w1_ptr, ca_b1_ptr, ca_w2t_ptr, ca_b2_ptr, col0,
             WIDTH: tl.constexpr, CP: tl.constexpr, CRP: tl.constexpr):
    """Channel-attention scale of sample ``n`` for channels ``col0 .. col0 + WIDTH`` (fp32 [WIDTH])."""
    cp = tl.arange(0, CP)
    rr = tl.arange(0, CRP)
    mean = tl.load(sums_ptr + n * C + cp, mask=cp < C, other=0.0) * inv_hw
    w1 = tl.load(ca_w1_ptr + rr[:, None] * CP + cp[None, :])
    z = tl.maximum(tl.sum(w1 * mean[None, :], axis=1) + tl.load(ca_b1_ptr + rr), 0.0)
    cw = col0 + tl.arange(0, WIDTH)
    w2t = tl.load(ca_w2t_ptr + rr[:, None] * CP + cw[None, :])
    return tl.sigmoid(tl.sum(w2t * z[:, None], axis=0) + tl.load(ca_b2_ptr + cw))


@triton.jit
def load_source(t_ptr, u_ptr, e1_ptr, e2_ptr, offs, mask, scale,
                DEFERRED: tl.constexpr, N_ADD: tl.constexpr):
    """``t + scale · u + e1 + e2`` at ``offs`` (0 where ``mask`` is false), in fp32."""
    x = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DEFERRED:
        x += scale[None, :] * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if N_ADD >= 1:
        x += tl.load(e1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if N_ADD >= 2:
        x += tl.load(e2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def mma(a, w, acc, FP16: tl.constexpr):
    """``acc + a @ w`` with fp32 accumulation: fp16 tensor cores, or for fp32 storage three TF32
    products (``tf32x3``: hi·hi + hi·lo + lo·hi, about fp32's accuracy, unlike plain TF32). Exact
    ``ieee`` fp32 dots compile to FMA code that ptxas spills by up to 31 KB per thread."""
    if FP16:
        return tl.dot(a.to(tl.float16), w, acc)
    else:
        return tl.dot(a, w, acc, input_precision="tf32x3")


# ---------------------------------------------------------------------------------------------
# Host side: the arguments every kernel with a deferred input takes.


_UNUSED: dict = {}


def unused_fp32(device: torch.device) -> torch.Tensor:
    """A placeholder for pointer arguments a launch never reads (made once per device, not per launch)."""
    if device not in _UNUSED:
        _UNUSED[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _UNUSED[device]


def check_nhwc(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    if x.shape != like.shape or x.dtype != like.dtype or x.device != like.device:
        raise ValueError(
            f"{name}: expected {tuple(like.shape)} {like.dtype} on {like.device}, "
            f"got {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous NHWC tensor")


def source_args(src: Source):
    """Check ``src`` and return the kernel arguments shared by every consumer of a Source."""
    t = src.t
    if t.dim() != 4 or not t.is_contiguous():
        raise ValueError(f"source t: expected a contiguous NHWC tensor, got shape {tuple(t.shape)}")
    if t.numel() >= 2**31:
        raise ValueError(f"tensor of {t.numel()} elements is too large for 32-bit indexing; tile the image")
    n, h, w, c = t.shape
    for name, e in (("e1", src.e1), ("e2", src.e2)):
        if e is not None:
            check_nhwc(name, e, t)
    if src.e1 is None and src.e2 is not None:
        raise ValueError("e2 given without e1")
    if src.deferred:
        check_nhwc("u", src.u, t)
        if src.sums is None or src.ca is None:
            raise ValueError("a deferred source needs its channel sums and CA weights")
        if src.sums.shape != (n, c) or src.sums.dtype != torch.float32:
            raise ValueError(f"sums: expected ({n}, {c}) float32, got {tuple(src.sums.shape)} {src.sums.dtype}")
        ca = src.ca
    else:
        ca = None
    cp = triton.next_power_of_2(c)
    if ca is None:
        dummy = unused_fp32(t.device)
        ca_args = (dummy, dummy, dummy, dummy)
        crp = 1
    else:
        if ca.padded[0] != cp:
            raise ValueError(f"CA weights packed for {ca.padded[0]} channels, source has {c}")
        ca_args = (ca.w1, ca.b1, ca.w2t, ca.b2)
        crp = ca.padded[1]
    return dict(
        ptrs=(t, src.u if src.deferred else t, src.e1 if src.e1 is not None else t,
              src.e2 if src.e2 is not None else t),
        sums=src.sums if src.deferred else unused_fp32(t.device),
        ca=ca_args,
        consts=dict(DEFERRED=src.deferred, N_ADD=len(src.addends), CP=cp, CRP=crp),
        inv_hw=1.0 / (h * w),
    )
