"""The CUDA C++ backend: each RRCAB pass is one launch of the extension's kernel (csrc/, through
:mod:`msfin_fast.engine.cuda_ext`, which checks and binds it); the other launches (head, convs
between blocks, tail) are the Triton backend's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...model import RRCAB
from .. import cuda_ext
from ..source import Source
from . import pack_plan


@dataclass(frozen=True)
class CudaPacked:
    """A block as this backend packs it: the kernel's layout, and the Triton layout of its channel
    attention for the Triton launches (convs, tail) that read its output."""

    kernel: cuda_ext.CudaBlock
    ca: object


def configs_of(model) -> set[tuple[int, int]]:
    return {(m.body[0].in_channels, m.body[0].groups) for m in model.modules() if isinstance(m, RRCAB)}


class CudaBackend:
    """RRCAB passes by the CUDA C++ kernel (one launch each, conv1's output in shared memory, every
    width); every other launch by the Triton backend."""

    name = "cuda"
    dtypes = (torch.float32, torch.float16)  # the kernel's variants
    whole_network = False
    fused_max_channels = 1 << 30

    def __init__(self, fuse_rrcab: bool = False):
        from .triton import TritonBackend

        self.triton = TritonBackend()
        self.head, self.materialize = self.triton.head, self.triton.materialize
        self.conv, self.tail = self.triton.conv, self.triton.tail

    @classmethod
    def status(cls):
        return cuda_ext.status()

    def unavailable_reason(self, model) -> str | None:
        device = model.head.weight.device
        if device.type != "cuda":
            return f"the CUDA C++ kernel needs a CUDA device (the model is on {device})"
        reason = self.triton.unavailable_reason(model)
        if reason is not None:
            return reason
        problem = cuda_ext.extension_problem()
        if problem is not None:
            return problem
        missing = configs_of(model) - set(cuda_ext.supported_configs())
        if missing:
            return f"the CUDA C++ kernel has no variant for (channels, groups) {sorted(missing)}"
        return None

    def pack(self, model, plan, dtype) -> dict:
        return pack_plan(model, plan, dtype, self)

    # The packers pack_plan calls: blocks in the kernel's layout (with their CA in Triton's, for
    # the Triton launches that read their output), everything else as the Triton backend does.
    def pack_block(self, block: RRCAB, dtype) -> CudaPacked:
        from .triton import pack_ca

        return CudaPacked(cuda_ext.pack_block(block, dtype, block.body[0].weight.device), pack_ca(block.body[5]))

    def pack_head(self, sub_mean, head, scale):
        from .triton import pack_head

        return pack_head(sub_mean, head, scale)

    def pack_tail(self, tail, add_mean, dtype):
        from .triton import pack_tail

        return pack_tail(tail, add_mean, dtype)

    def pack_conv(self, conv, n_src, dtype):
        from .triton import pack_conv

        return pack_conv(conv, n_src, dtype)

    def scratch_numel(self, device, channels: int, n: int, h: int, w: int) -> int:
        return 0  # the kernel keeps conv1's output in shared memory

    def rrcab_pass(self, src: Source, p: CudaPacked, x_out, a, u_out, sums, fused: bool = False) -> None:
        cuda_ext.rrcab_pass(p.kernel, src.t, u=src.u, sums_in=src.sums, ca=src.producer.kernel.ca if src.deferred else None,
                   e1=src.e1, e2=src.e2, x_out=x_out, u_out=u_out, sums_out=sums)


BACKENDS = {"cuda": CudaBackend}
