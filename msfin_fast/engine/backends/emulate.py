"""The emulation backend: the plan's launches computed by PyTorch ops from the reference modules.

Each operation honours the same contract as the kernels (kernels/*.py), rounding to the storage
dtype at the same points. It is slow, runs anywhere, and exists to check the plan (deferred
values, folded sums, materialisations, arena reuse) at full speed on any machine, and each kernel
against a second implementation. It builds the same plan as the Triton backend.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...model import RRCAB
from ..source import Source
from . import pack_plan


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


@dataclass
class EmulatedCA:
    """A block's channel attention, fp32: squeeze ``w1 [CR, C]``, ``b1``, excite ``w2 [C, CR]``, ``b2``."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


@dataclass
class EmulatedBlock:
    module: RRCAB
    dtype: torch.dtype
    ca: EmulatedCA


@dataclass
class EmulatedLayer:
    """The reference modules a head, tail or conv launch computes from, and the storage dtype."""

    modules: tuple
    dtype: torch.dtype
    scale: int = 4


def pack_block(block: RRCAB, dtype: torch.dtype) -> EmulatedBlock:
    down, up = block.body[5].conv_du[0], block.body[5].conv_du[2]
    ca = EmulatedCA(down.weight.detach().float()[:, :, 0, 0], down.bias.detach().float(),
                    up.weight.detach().float()[:, :, 0, 0], up.bias.detach().float())
    return EmulatedBlock(block, dtype, ca)


def pack_head(sub_mean, head, scale: int) -> EmulatedLayer:
    return EmulatedLayer((sub_mean, head), torch.float32, scale)


def pack_tail(tail, add_mean, dtype: torch.dtype) -> EmulatedLayer:
    return EmulatedLayer((tail, add_mean), dtype)


def pack_conv(conv, n_src: int, dtype: torch.dtype) -> EmulatedLayer:
    return EmulatedLayer((conv,), dtype)


class EmulateBackend:
    name = "emulate"
    # fp32 and fp16: the Triton plan's; bfloat16: the native CPU kernels' (fp32, with the buffers
    # read only as addends stored in bf16; the copies into them round to nearest even, as the kernel)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    whole_network = False

    @staticmethod
    def storage_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype == torch.bfloat16 else dtype

    @staticmethod
    def addend_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype == torch.bfloat16 else EmulateBackend.storage_dtype(dtype)

    def __init__(self, fuse_rrcab: bool = False):
        from .triton import FUSED_MAX_CHANNELS  # the Triton backend's plan, emulated

        self.fused_max_channels = FUSED_MAX_CHANNELS if fuse_rrcab else 0

    def unavailable_reason(self, model) -> str | None:
        return None

    def pack(self, model, plan, dtype):
        return pack_plan(model, plan, dtype, sys.modules[__name__])  # the packers have Triton's signatures

    def scratch_numel(self, device, channels: int, n: int, h: int, w: int) -> int:
        return 0

    @staticmethod
    def ca_scale(src: Source) -> torch.Tensor:
        """[N, C] fp32 channel-attention scale of a deferred operand."""
        ca = src.producer.ca
        _, h, w, _ = src.t.shape
        z = torch.relu(src.sums / (h * w) @ ca.w1.t() + ca.b1)  # [N, CR]
        return torch.sigmoid(z @ ca.w2.t() + ca.b2)

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

    def head(self, x: torch.Tensor, p: EmulatedLayer, out: torch.Tensor) -> None:
        sub_mean, head = p.modules
        y = F.interpolate(x.float(), scale_factor=p.scale, mode="bilinear", align_corners=False)
        y = F.conv2d(y, sub_mean.weight.detach().float(), sub_mean.bias.detach().float())
        y = F.conv2d(y, head.weight.detach().float(), head.bias.detach().float(), padding=1)
        out.copy_(_nhwc(y))

    def rrcab_pass(self, src: Source, p: EmulatedBlock, x_out, a, u_out, sums, fused: bool = False) -> None:
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

    def tail(self, src: Source, p: EmulatedLayer, out: torch.Tensor) -> None:
        tail, add_mean = p.modules
        x = self.source(src).to(p.dtype).float()
        y = _nchw(self._conv(x, tail, p.dtype))
        out.copy_(F.conv2d(y, add_mean.weight.detach().float(), add_mean.bias.detach().float()))

    def conv(self, inputs: list[torch.Tensor] | Source, p: EmulatedLayer, out: torch.Tensor, step) -> None:
        if isinstance(inputs, Source):
            inputs = [self.source(inputs).to(p.dtype)]
        x = torch.cat([_nchw(t).float() for t in inputs], dim=1)
        (m,) = p.modules
        w = m.weight.detach().to(p.dtype).float()
        b = m.bias.detach().float() if m.bias is not None else None
        if isinstance(m, nn.ConvTranspose2d):
            y = F.conv_transpose2d(x, w, b, stride=2)
        else:
            y = F.conv2d(x, w, b, stride=step.stride, padding=step.ksize // 2)
            if step.leaky:
                y = F.leaky_relu(y, 0.2)
            if step.shuffle:
                y = F.pixel_shuffle(y, 2)
        out.copy_(_nhwc(y))


BACKENDS = {"emulate": EmulateBackend}
