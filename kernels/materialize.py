"""``out = t + CA(u) + e1 + e2``: finish a deferred value for a consumer that cannot.

Used only where the next reader is a layer without a deferred prologue (a cuDNN conv, a concat)
and no RRCAB pass has already written the finished value as its residual base.
Layout NHWC contiguous; ``out`` has ``t``'s shape and dtype; math in fp32.
"""

import torch
import triton
import triton.language as tl

from .source import Source, ca_scale, check_nhwc, gpu_tiles, load_source, source_args


@triton.jit(do_not_specialize=["HW"])
def _materialize_kernel(
    t_ptr, u_ptr, e1_ptr, e2_ptr, sums_ptr, ca_w1, ca_b1, ca_w2t, ca_b2, inv_hw, out_ptr, HW, C: tl.constexpr,
    DEFERRED: tl.constexpr, N_ADD: tl.constexpr, CP: tl.constexpr, CRP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cp = tl.arange(0, CP)
    if DEFERRED:
        scale = ca_scale(sums_ptr, n, C, inv_hw, ca_w1, ca_b1, ca_w2t, ca_b2, 0, CP, CP, CRP)
    else:
        scale = tl.zeros([CP], tl.float32)
    offs = (n * HW + p)[:, None] * C + cp[None, :]
    mask = (p < HW)[:, None] & (cp < C)[None, :]
    x = load_source(t_ptr, u_ptr, e1_ptr, e2_ptr, offs, mask, scale, DEFERRED, N_ADD)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def materialize(src: Source, out: torch.Tensor) -> None:
    args = source_args(src)
    n, h, w, c = src.t.shape
    check_nhwc("out", out, src.t)
    block = max(16, 4096 // args["consts"]["CP"]) if gpu_tiles() else 1024
    _materialize_kernel[(triton.cdiv(h * w, block), n)](
        *args["ptrs"], args["sums"], *args["ca"], args["inv_hw"], out, h * w, c, BLOCK=block,
        **args["consts"],
    )
