"""Kernel backends: the same four operations, each honouring the contracts in kernels/*.py.

``head``         LR NCHW image → first features, NHWC (bilinear ×S, sub_mean, head conv).
``rrcab_pass``   one step of an RRCAB block on a deferred Source → x_out, u_out, sums.
``materialize``  a deferred Source → a plain NHWC tensor.
``tail``         a deferred Source → SR image, NCHW (tail conv with add_mean folded in).
``conv``         a dense conv between blocks (stride 2, LeakyReLU, pixel shuffle, transposed 2×2,
                 1×1 over a concatenation), NHWC in and out.

``TritonOps`` launches the kernels. ``EmulatedOps`` computes the same contracts with PyTorch ops,
rounding to the storage dtype at the same points; it is slow and exists so the plan can be
checked on any machine and each kernel can be checked against a second implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.contract import Source
from .packing import PackedConv, PackedHead, PackedRRCAB, PackedTail


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class EmulatedOps:
    name = "pytorch-emulation"

    @staticmethod
    def ca_scale(src: Source) -> torch.Tensor:
        """[N, C] fp32 channel-attention scale of a deferred source."""
        ca = src.ca
        n, h, w, c = src.t.shape
        z = torch.relu(src.sums / (h * w) @ ca.w1[:, :c].t() + ca.b1)  # [N, CRP]
        return torch.sigmoid(z @ ca.w2t[:, :c] + ca.b2[:c])

    def source(self, src: Source) -> torch.Tensor:
        """``t + CA(u) + e1 + e2`` in fp32, NHWC."""
        x = src.t.float()
        if src.deferred:
            x = x + self.ca_scale(src)[:, None, None, :] * src.u.float()
        for e in src.addends:
            x = x + e.float()
        return x

    @staticmethod
    def _conv(x: torch.Tensor, conv, dtype, **kw) -> torch.Tensor:
        w = conv.weight.detach().to(dtype).float()
        b = conv.bias.detach().float() if conv.bias is not None else None
        return _nhwc(F.conv2d(_nchw(x), w, b, padding=conv.padding, groups=conv.groups, **kw))

    def head(self, x: torch.Tensor, p: PackedHead, out: torch.Tensor) -> None:
        y = F.interpolate(x.float(), scale_factor=p.scale, mode="bilinear", align_corners=False)
        y = F.conv2d(y, p.sub_mean.weight.detach().float(), p.sub_mean.bias.detach().float())
        y = F.conv2d(y, p.head.weight.detach().float(), p.head.bias.detach().float(), padding=1)
        out.copy_(_nhwc(y))

    def rrcab_pass(self, src: Source, p: PackedRRCAB, x_out, a, u_out, sums, fused: bool = False) -> None:
        dt = p.dtype
        body = p.module.body
        x = self.source(src).to(dt)
        if x_out is not None:
            x_out.copy_(x)
        conv1 = torch.relu(self._conv(x.float(), body[0], dt)).to(dt)
        if not fused:  # the two-launch contract writes conv1's output
            a.copy_(conv1)
        h = torch.relu(self._conv(conv1.float(), body[2], dt)).to(dt)
        u = self._conv(h.float(), body[4], dt)
        u_out.copy_(u)
        sums += u.sum(dim=(1, 2))

    def materialize(self, src: Source, out: torch.Tensor) -> None:
        out.copy_(self.source(src))

    def tail(self, src: Source, p: PackedTail, out: torch.Tensor) -> None:
        x = self.source(src).to(p.dtype).float()
        y = _nchw(self._conv(x, p.tail, p.dtype))
        out.copy_(F.conv2d(y, p.add_mean.weight.detach().float(), p.add_mean.bias.detach().float()))


    def conv(self, inputs: list[torch.Tensor] | Source, p: PackedConv, out: torch.Tensor, step) -> None:
        if isinstance(inputs, Source):
            inputs = [self.source(inputs).to(p.dtype)]
        x = torch.cat([_nchw(t).float() for t in inputs], dim=1)
        m = p.module
        w = m.weight.detach().to(p.dtype).float()
        b = m.bias.detach().float() if m.bias is not None else None
        if isinstance(m, torch.nn.ConvTranspose2d):
            y = F.conv_transpose2d(x, w, b, stride=2)
        else:
            y = F.conv2d(x, w, b, stride=step.stride, padding=step.ksize // 2)
            if step.leaky:
                y = F.leaky_relu(y, 0.2)
            if step.shuffle:
                y = F.pixel_shuffle(y, 2)
        out.copy_(_nhwc(y))


class TritonOps:
    name = "triton"

    def __init__(self, fused_rrcab: bool = False):
        from ..kernels import conv, head, materialize, rrcab, rrcab_fused, tail

        self._head, self._materialize, self._rrcab, self._tail = head, materialize, rrcab, tail
        self._conv, self._fused = conv, rrcab_fused
        self.fused_rrcab = fused_rrcab
        if fused_rrcab:
            self.name = "triton-fused"

    def scratch_numel(self, device, channels: int, n: int, h: int, w: int) -> int:
        from ..kernels.rrcab_fused import scratch_numel
        from .packing import next_pow2

        return scratch_numel(device, next_pow2(channels), n, h, w)

    def head(self, x, p: PackedHead, out) -> None:
        self._head.head(x, p.scale, p.mean_w, p.mean_b, p.w, p.b, out)

    def rrcab_pass(self, src: Source, p: PackedRRCAB, x_out, a, u_out, sums, fused: bool = False) -> None:
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


class CudaOps(TritonOps):
    """RRCAB passes by the CUDA C++ kernel (csrc/, one launch each); every other launch by Triton."""

    name = "cuda"

    def __init__(self):
        super().__init__(fused_rrcab=False)
        from . import cuda_backend

        self._cuda = cuda_backend

    def scratch_numel(self, device, channels: int, n: int, h: int, w: int) -> int:
        return 0  # the kernel keeps conv1's output in shared memory

    def rrcab_pass(self, src: Source, p: PackedRRCAB, x_out, a, u_out, sums, fused: bool = False) -> None:
        self._cuda.rrcab_pass(p.cuda, src.t, u=src.u, sums_in=src.sums, ca=src.ca.cuda if src.deferred else None,
                              e1=src.e1, e2=src.e2, x_out=x_out, u_out=u_out, sums_out=sums)
