"""The Triton backend: every launch by the kernels of kernels/ (on CUDA, or on the CPU under
``TRITON_INTERPRET=1``), and the weights in the layouts those kernels read.

Layouts are documented in each kernel file's header (kernels/*.py). This is the only module of
the engine that imports ``kernels/``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ...kernels.contract import FUSED_MAX_CHANNELS, CAWeights
from ...model import RRCAB, ChannelAttention, MeanShift
from ..source import Source
from . import BackendStatus, fold_tail, pack_plan

CHUNK = 16


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def chunks(c: int) -> int:
    return -(-c // CHUNK)


def pack_bias(bias: torch.Tensor | None, width: int, device) -> torch.Tensor:
    out = torch.zeros(width, dtype=torch.float32, device=device)
    if bias is not None:
        out[: bias.numel()] = bias.detach().float()
    return out


def pack_grouped3x3(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, C/G, 3, 3] → block-diagonal [9, NCHUNK, 16 (in), 16 (out)], bias [CP] fp32."""
    c, g = conv.out_channels, conv.groups
    cpg = c // g
    if conv.in_channels != c or CHUNK % cpg:
        raise ValueError(f"grouped conv {c}→{c} with {cpg} channels per group does not tile 16-channel chunks")
    w = conv.weight.detach().float()
    dense = torch.zeros(c, c, 3, 3, dtype=torch.float32, device=w.device)  # [out, in, ky, kx]
    for grp in range(g):
        sl = slice(grp * cpg, (grp + 1) * cpg)
        dense[sl, sl] = w[sl]
    nchunk = chunks(c)
    packed = torch.zeros(9, nchunk, CHUNK, CHUNK, dtype=torch.float32, device=w.device)
    for j in range(nchunk):
        lo, hi = j * CHUNK, min(c, (j + 1) * CHUNK)
        block = dense[lo:hi, lo:hi]  # [out, in, 3, 3]
        packed[:, j, : hi - lo, : hi - lo] = block.permute(2, 3, 1, 0).reshape(9, hi - lo, hi - lo)
    return packed.to(dtype).contiguous(), pack_bias(conv.bias, next_pow2(c), w.device)


def pack_pointwise(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """1×1 [C, C, 1, 1] → [NCHUNK, 16 (in), CP (out)], bias [CP] fp32."""
    c = conv.out_channels
    cp, nchunk = next_pow2(c), chunks(c)
    w = conv.weight.detach().float()[:, :, 0, 0]  # [out, in]
    packed = torch.zeros(nchunk * CHUNK, cp, dtype=torch.float32, device=w.device)
    packed[:c, :c] = w.t()
    return packed.view(nchunk, CHUNK, cp).to(dtype).contiguous(), pack_bias(conv.bias, cp, w.device)


def pack_ca(ca: ChannelAttention) -> CAWeights:
    down, up = ca.conv_du[0], ca.conv_du[2]
    c, cr = down.in_channels, down.out_channels
    cp, crp = next_pow2(c), next_pow2(cr)
    dev = down.weight.device
    w1 = torch.zeros(crp, cp, device=dev)
    w1[:cr, :c] = down.weight.detach().float()[:, :, 0, 0]
    w2t = torch.zeros(crp, cp, device=dev)
    w2t[:cr, :c] = up.weight.detach().float()[:, :, 0, 0].t()
    return CAWeights(w1, pack_bias(down.bias, crp, dev), w2t, pack_bias(up.bias, cp, dev))


@dataclass
class TritonBlock:
    """One RRCAB's weights for kernels/rrcab.py and rrcab_fused.py; ``ca`` for whoever reads its output."""

    dtype: torch.dtype
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor
    ca: CAWeights


def pack_block(block: RRCAB, dtype: torch.dtype) -> TritonBlock:
    conv1, conv2, pointwise, ca = block.body[0], block.body[2], block.body[4], block.body[5]
    w1, b1 = pack_grouped3x3(conv1, dtype)
    w2, b2 = pack_grouped3x3(conv2, dtype)
    w3, b3 = pack_pointwise(pointwise, dtype)
    return TritonBlock(dtype, w1, b1, w2, b2, w3, b3, pack_ca(ca))


@dataclass
class PackedHead:
    scale: int
    channels: int
    mean_w: torch.Tensor
    mean_b: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor


def pack_head(sub_mean: MeanShift, head: nn.Conv2d, scale: int) -> PackedHead:
    n = head.out_channels
    np_ = next_pow2(n)
    dev = head.weight.device
    w = torch.zeros(9, 3, np_, device=dev)
    w[:, :, :n] = head.weight.detach().float().permute(2, 3, 1, 0).reshape(9, 3, n)
    return PackedHead(
        scale, n,
        sub_mean.weight.detach().float()[:, :, 0, 0].contiguous(), sub_mean.bias.detach().float().contiguous(),
        w, pack_bias(head.bias, np_, dev),
    )


@dataclass
class PackedTail:
    w: torch.Tensor
    b: torch.Tensor


def pack_tail(tail: nn.Conv2d, add_mean: MeanShift, dtype: torch.dtype) -> PackedTail:
    """Fold add_mean into tail2 (``w' = M·w``, ``b' = M·b + b_mean``) and pack like a 16-chunk conv."""
    n = tail.in_channels
    nchunk = chunks(n)
    w, b = fold_tail(tail, add_mean)  # [3, n, 3, 3], [3]
    packed = torch.zeros(9, nchunk * CHUNK, CHUNK, dtype=torch.float64, device=w.device)
    packed[:, :n, :3] = w.permute(2, 3, 1, 0).reshape(9, n, 3)
    packed = packed.view(9, nchunk, CHUNK, CHUNK)
    return PackedTail(packed.to(dtype).contiguous(), pack_bias(b, CHUNK, w.device))


@dataclass
class PackedConv:
    """A dense conv (or 2×2/2 transposed conv) as the GEMM kernels/conv.py runs, and its output channels."""

    out_channels: int
    w: torch.Tensor
    b: torch.Tensor


def pack_conv(conv: nn.Conv2d | nn.ConvTranspose2d, n_src: int, dtype: torch.dtype) -> PackedConv:
    """Conv2d [out, in, k, k] → [k·k, NSRC·KCHUNK, 16, NP]; ConvTranspose2d(2, 2) → a 1×1 GEMM to
    4·out channels ordered ``c·4 + i·2 + j`` (the pixel-shuffle order)."""
    w = conv.weight.detach().float()
    if isinstance(conv, nn.ConvTranspose2d):
        c_in, c_out = w.shape[:2]
        gemm = w.reshape(c_in, c_out * 4).t()[:, :, None, None]  # [4·out, in, 1, 1]
        bias = conv.bias.detach().float().repeat_interleave(4) if conv.bias is not None else None
    else:
        gemm, bias = w, conv.bias
    outs, c_all, k = gemm.shape[0], gemm.shape[1], gemm.shape[-1]
    if c_all % n_src:
        raise ValueError(f"{c_all} input channels do not split into {n_src} equal inputs")
    c_src = c_all // n_src
    kchunk, np_ = chunks(c_src), max(CHUNK, next_pow2(outs))
    packed = torch.zeros(k * k, n_src, kchunk * CHUNK, np_, dtype=torch.float32, device=w.device)
    taps = gemm.permute(2, 3, 1, 0).reshape(k * k, n_src, c_src, outs)  # [tap, src, in, out]
    packed[:, :, :c_src, :outs] = taps
    packed = packed.view(k * k, n_src * kchunk, CHUNK, np_)
    out_channels = conv.out_channels if isinstance(conv, nn.ConvTranspose2d) else outs
    return PackedConv(out_channels, packed.to(dtype).contiguous(), pack_bias(bias, np_, w.device))


def device_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernels need a CUDA device (the model is on {device}; "
            "TRITON_INTERPRET=1 runs them slowly on the CPU)")


class TritonBackend:
    """Two launches per RRCAB pass (conv1, then conv2 + 1×1 + sums), or with ``fuse_rrcab`` one
    launch for passes up to ``FUSED_MAX_CHANNELS`` wide (conv1's output in an L2-resident scratch)."""

    name = "triton"
    dtypes = (torch.float32, torch.float16)  # the kernels' variants
    whole_network = False

    def __init__(self, fuse_rrcab: bool = False):
        self.fused_max_channels = FUSED_MAX_CHANNELS if fuse_rrcab else 0
        try:  # without triton the backend still exists, to say why it cannot run
            from ...kernels import conv, head, materialize, rrcab, rrcab_fused, tail
        except ImportError as exc:
            self._missing = f"the Triton kernels do not import ({exc}); pip install triton"
            return
        self._missing = None
        self._head, self._materialize, self._rrcab, self._tail = head, materialize, rrcab, tail
        self._conv, self._fused = conv, rrcab_fused

    def unavailable_reason(self, model) -> str | None:
        return device_problem(model.head.weight.device) or self._missing

    @classmethod
    def status(cls) -> BackendStatus:
        name = "triton kernels (msfin_fast.optimize)"
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(name, False, "triton is not installed")
        import triton

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        problem = device_problem(device)
        return BackendStatus(name, problem is None,
                             f"triton {triton.__version__}; " + (f"runs on {device}" if problem is None else problem))

    def pack(self, model, plan, dtype):
        return pack_plan(model, plan, dtype, sys.modules[__name__])

    def scratch_numel(self, device, channels: int, n: int, h: int, w: int) -> int:
        return self._fused.scratch_numel(device, next_pow2(channels), n, h, w)

    def head(self, x, p: PackedHead, out) -> None:
        self._head.head(x, p.scale, p.mean_w, p.mean_b, p.w, p.b, out)

    def rrcab_pass(self, src: Source, p: TritonBlock, x_out, a, u_out, sums, fused: bool = False) -> None:
        """``a``: conv1's output buffer, or with ``fused`` the one-launch kernel's scratch."""
        if fused:
            self._fused.rrcab_fused(src, p.w1, p.b1, p.w2, p.b2, p.w3, p.b3, u_out, sums, a, x_out)
            return
        self._rrcab.rrcab_conv1(src, p.w1, p.b1, a, x_out)
        self._rrcab.rrcab_conv2(a, p.w2, p.b2, p.w3, p.b3, u_out, sums)

    def materialize(self, src: Source, out) -> None:
        self._materialize.materialize(src, out)

    def tail(self, src: Source, p: PackedTail, out) -> None:
        self._tail.tail(src, p.w, p.b, out)

    def conv(self, inputs, p: PackedConv, out, step) -> None:
        self._conv.conv(inputs, p.w, p.b, out, ksize=step.ksize, stride=step.stride, leaky=step.leaky,
                        shuffle=step.shuffle)


BACKENDS = {"triton": TritonBackend}
