"""One RRCAB pass in ONE launch: conv1's output stays in a per-program scratch that lives in L2.

Same contract as kernels/rrcab.py (``rrcab_conv1`` + ``rrcab_conv2``): reads a deferred Source,
optionally writes the finished input ``x``, writes pre-CA ``u`` and adds its channel sums.
What differs is where ``a = ReLU(gconv(x))`` lives. Triton has no explicit shared memory, so the
kernel computes ``a`` over an EH×EW lattice (the output tile plus a 1-pixel ring, zero outside
the image, which is conv2's zero padding), stores it to a scratch slot owned by the program,
synchronises the program's threads (``tl.debug_barrier``: a CTA barrier, which orders the
program's global writes before its reads), and runs conv2 + 1×1 from there for the inner
(EH−2)×(EW−2) pixels. The grid is persistent (a few programs per SM, each looping over tiles), so
all scratch slots together are a few MB and stay in L2: ``a`` never makes the DRAM round trip that
costs the two-launch version a write and a read of a full activation per pass.

Costs: conv1 is computed on the ring too (EH·EW / ((EH−2)(EW−2)) = 1.31× on a 16×16 lattice),
conv2 and the 1×1 on the lattice's padding positions (masked, same factor), and the input tile
is read with a 2-pixel halo. Scratch: [programs, EH·EW, CP] in the storage dtype, owned by the
caller and not shared between concurrent launches.
"""

import torch
import triton
import triton.language as tl

from .rrcab import conv1_chunk
from .source import Source, check_nhwc, gpu_tiles, mma, source_args, stages


@triton.jit(do_not_specialize=["N", "H", "W", "tiles_h", "tiles_w", "nprog"])
def _rrcab_fused_kernel(
    t_ptr, u_ptr, e1_ptr, e2_ptr, sums_ptr, ca_w1, ca_b1, ca_w2t, ca_b2, inv_hw,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, x_ptr, u_out_ptr, sums_out_ptr, scratch_ptr,
    N, H, W, C: tl.constexpr, tiles_h, tiles_w, nprog,
    DEFERRED: tl.constexpr, N_ADD: tl.constexpr, WRITE_X: tl.constexpr, FP16: tl.constexpr,
    CP: tl.constexpr, CRP: tl.constexpr, NCHUNK: tl.constexpr, EH: tl.constexpr, EW: tl.constexpr,
):
    pid = tl.program_id(0)
    q = tl.arange(0, EH * EW)
    li = q // EW
    lj = q % EW
    inner = (li >= 1) & (li < EH - 1) & (lj >= 1) & (lj < EW - 1)
    ci = tl.arange(0, 16)
    cp = tl.arange(0, CP)
    scratch = scratch_ptr + pid * (EH * EW * CP)
    per_image = tiles_h * tiles_w
    job = pid
    # A while loop rather than range(pid, total, nprog): Triton 3.6's interpreter cannot take a
    # runtime range bound under NumPy >= 2.4, and the CPU tests run this kernel there.
    while job < N * per_image:  # a persistent program: tiles pid, pid + nprog, ...
        n = job // per_image
        tile = job % per_image
        r = (tile // tiles_w) * (EH - 2) - 1 + li
        c = (tile % tiles_w) * (EW - 2) - 1 + lj
        in_image = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        for j in tl.static_range(NCHUNK):
            a = conv1_chunk(t_ptr, u_ptr, e1_ptr, e2_ptr, sums_ptr, ca_w1, ca_b1, ca_w2t, ca_b2, inv_hw, w1_ptr,
                            b1_ptr, x_ptr, inner, n, r, c, H, W, j, C, DEFERRED, N_ADD, WRITE_X, FP16, CP, CRP,
                            NCHUNK)
            a = tl.where(in_image[:, None], a, 0.0)  # conv2 pads with zeros outside the image
            ch = j * 16 + ci
            tl.store(scratch + q[:, None] * CP + ch[None, :], a.to(scratch_ptr.dtype.element_ty))
        tl.debug_barrier()
        u = tl.zeros([EH * EW, CP], tl.float32)
        for j in tl.static_range(NCHUNK):
            ch = j * 16 + ci
            acc = tl.zeros([EH * EW, 16], tl.float32)
            for tap in tl.range(9):
                qq = q + (tap // 3 - 1) * EW + (tap % 3 - 1)
                a_tap = tl.load(scratch + qq[:, None] * CP + ch[None, :], mask=inner[:, None], other=0.0)
                w = tl.load(w2_ptr + ((tap * NCHUNK + j) * 16 + ci[:, None]) * 16 + ci[None, :])
                acc = mma(a_tap, w, acc, FP16)
            h = tl.maximum(acc + tl.load(b2_ptr + ch)[None, :], 0.0).to(u_out_ptr.dtype.element_ty)
            w3 = tl.load(w3_ptr + (j * 16 + ci[:, None]) * CP + cp[None, :])
            u = mma(h, w3, u, FP16)
        u += tl.load(b3_ptr + cp)[None, :]
        keep = (inner & in_image)[:, None] & (cp < C)[None, :]
        offs = ((n * H + r) * W + c)[:, None] * C + cp[None, :]
        tl.store(u_out_ptr + offs, u.to(u_out_ptr.dtype.element_ty), mask=keep)
        tl.atomic_add(sums_out_ptr + n * C + cp, tl.sum(tl.where(keep, u, 0.0), axis=0), mask=cp < C)
        tl.debug_barrier()  # the next tile overwrites the scratch slot
        job += nprog


def lattice(cp: int) -> tuple[int, int, int]:
    """(EH, EW, warps): 16×16 keeps 77% of conv1's work; wide channel counts need a smaller tile."""
    if not gpu_tiles():
        return 16, 16, 4
    return (16, 16, 8) if cp <= 32 else (8, 16, 8)


def programs(device: torch.device, jobs: int) -> int:
    if device.type != "cuda":
        return min(jobs, 4)
    return min(jobs, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def scratch_numel(device: torch.device, cp: int, n: int, h: int, w: int) -> int:
    eh, ew, _ = lattice(cp)
    jobs = n * triton.cdiv(h, eh - 2) * triton.cdiv(w, ew - 2)
    return programs(device, jobs) * eh * ew * cp


def rrcab_fused(src: Source, w1, b1, w2, b2, w3, b3, u_out: torch.Tensor, sums: torch.Tensor,
                scratch: torch.Tensor, x_out: torch.Tensor | None = None) -> None:
    """The whole pass; ``scratch`` needs at least ``scratch_numel(...)`` elements of the storage dtype."""
    args = source_args(src)
    n, h, w, c = src.t.shape
    check_nhwc("u_out", u_out, src.t)
    if x_out is not None:
        check_nhwc("x_out", x_out, src.t)
    cp, nchunk = args["consts"]["CP"], triton.cdiv(c, 16)
    if w1.shape != (9, nchunk, 16, 16) or w2.shape != (9, nchunk, 16, 16) or w3.shape != (nchunk, 16, cp):
        raise ValueError(f"RRCAB weights packed for another width than {c} channels")
    if sums.shape != (n, c) or sums.dtype != torch.float32:
        raise ValueError(f"sums: expected ({n}, {c}) float32, got {tuple(sums.shape)} {sums.dtype}")
    eh, ew, warps = lattice(cp)
    tiles_h, tiles_w = triton.cdiv(h, eh - 2), triton.cdiv(w, ew - 2)
    grid = programs(src.t.device, n * tiles_h * tiles_w)
    if scratch.numel() < grid * eh * ew * cp or scratch.dtype != src.t.dtype or scratch.device != src.t.device:
        raise ValueError(f"scratch: need {grid * eh * ew * cp} {src.t.dtype} elements on {src.t.device}")
    _rrcab_fused_kernel[(grid,)](
        *args["ptrs"], args["sums"], *args["ca"], args["inv_hw"], w1, b1, w2, b2, w3, b3,
        x_out if x_out is not None else u_out, u_out, sums, scratch, n, h, w, c, tiles_h, tiles_w, grid,
        WRITE_X=x_out is not None, FP16=src.t.dtype == torch.float16, NCHUNK=nchunk, EH=eh, EW=ew,
        num_warps=warps, num_stages=stages(src.t.dtype), **args["consts"],
    )
