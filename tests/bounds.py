"""Tolerances and guarded outputs shared by the kernel tests.

A kernel test compares two implementations of one contract (a kernel and its PyTorch emulation, or
the CUDA kernel and its float64 reference). Both read the same inputs, round to the storage dtype at
the same points, and differ only in the order of their fp32 sums. The bound on
``max |got − want| / max |want|`` follows from that:

* ``k · u_acc``: the worst-case error of an fp32 sum of ``k`` products taken in another order
  (Higham's γ_k ≈ k·u), with the products' magnitude taken as the output's. ``k`` is the whole
  chain's reduction length: every conv and every sum between the inputs and the output.
  ``u_acc`` is fp32's unit roundoff, 2⁻²⁴, for exact fp32 arithmetic (the CPU, the CUDA C++ kernel's
  FMAs, fp16 tensor-core dots that accumulate in fp32). Triton's fp32 dots on a GPU are ``tf32x3``:
  the dropped lo·lo product is 2⁻²² of each product, so ``u_acc`` is 2⁻²² there.
* ``2 · u_storage``: two values that close may still round to neighbouring numbers of the storage
  dtype, one ulp (2u) apart: 2⁻¹⁰ for fp16, 2⁻²³ for fp32.

For fp16 storage this is about 1e-3 and for fp32 2e-6 to 4e-5, where the tests used to allow 2e-2
and 1e-4. Measured in the interpreter (tests/MUTATIONS.md): at most 5.0e-4 (fp16) and 5.0e-7 (fp32).
A wrong kernel is off by more: fp16 storage in an fp32 output is 2.4e-4 to 4.9e-4 of the largest
value (fp16's own rounding), a misplaced bias or a lost partial sum a per cent or more.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11}
TF32X3_ROUNDOFF = 2.0 ** -22
# Elements of poison before and after every output: more than one program can write out of bounds
# (a 1024-pixel block of 128 channels, or a tile's rows below a small image), so a store that
# escapes its mask lands in the guard and is reported instead of crashing the process. A multiple
# of 8, so views stay 16-byte aligned.
GUARD_MIN = 1 << 17


def tolerance(dtype: torch.dtype, k: int, *, tf32x3: bool = False) -> float:
    """Bound on max|Δ| / max|want| for an output stored in ``dtype`` after a chain of ``k`` products."""
    u_acc = TF32X3_ROUNDOFF if tf32x3 else UNIT_ROUNDOFF[torch.float32]
    return k * u_acc + 2 * UNIT_ROUNDOFF[dtype]


def triton_tf32x3(dtype: torch.dtype, device) -> bool:
    """Whether Triton's dots on ``device`` use tf32x3 (fp32 storage on a GPU; the interpreter is exact)."""
    return dtype == torch.float32 and torch.device(device).type == "cuda"


def ca_length(c: int, deferred: bool) -> int:
    """Reduction length of reading a Source: the CA's two matrix products (C and C/r ≤ C terms) and
    the four addends ``t + s·u + e1 + e2``."""
    return (2 * c if deferred else 0) + 4


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.double().abs().max().clamp_min(1e-30)
    return ((got.double() - want.double()).abs().max() / scale).item()


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite values (a masked store missed?)"
    err = max_rel_error(got, want)
    assert err <= tol, f"{what}: max |Δ| / max |want| = {err:.3g} > {tol:.3g}"


def initial_sums(n: int, c: int, magnitude: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """What ``sums_out`` holds before a pass (the kernels add to it): random, ``magnitude`` times a
    standard normal, as large as the sums themselves, so a kernel that stores its sums instead of
    adding them is off by a whole sum."""
    return torch.randn(n, c, generator=generator, device=device) * magnitude


class Guarded:
    """Output tensors inside poisoned buffers: ``new`` returns a view filled with ``fill`` (NaN by
    default, so a value nobody wrote shows) between guard bands of NaN (GUARD_MIN elements or the
    tensor's size, whichever is larger) on each side; ``check``
    asserts that no launch wrote into any guard band. Every kernel test allocates its outputs here,
    so an out-of-bounds store fails the test instead of corrupting memory by luck."""

    def __init__(self, device):
        self.device = device
        self.buffers: list[tuple[str, torch.Tensor]] = []

    def new(self, name: str, shape, dtype: torch.dtype, fill: torch.Tensor | float = float("nan")) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        guard = max(GUARD_MIN, -(-numel // 8) * 8)
        buf = torch.full((guard + numel + guard,), float("nan"), dtype=dtype, device=self.device)
        view = buf[guard:guard + numel].view(tuple(shape))
        if isinstance(fill, torch.Tensor):
            view.copy_(fill)
        else:
            view.fill_(fill)
        self.buffers.append((name, buf, guard))
        return view

    def check(self) -> None:
        for name, buf, guard in self.buffers:
            before, after = buf[:guard], buf[-guard:]
            assert torch.isnan(before).all() and torch.isnan(after).all(), (
                f"{name}: a store landed outside the tensor (guard band overwritten)")


# ---- whole-network bounds, on the 0–255 scale, against the true-fp32 reference -------------------
# Measured with the released weights on crops of the Set5/Set14 pictures (natural_batch, the GPU
# engine test's sizes), by the emulated plan on the CPU (tests/MUTATIONS.md):
#   fp32: max |Δ| ≤ 9.2e-5 on the CPU test's crop, ≤ 4.9e-4 over every GPU-test size.
#   fp16: max |Δ| ≤ 0.56, at most 1 grey level after rounding, ≤ 4.9% of the values changed.
# An engine whose RRCAB passes store fp16 while asked for fp32 is 0.07 off.
ENGINE_FP32_CPU = 1e-3   # exact fp32 everywhere: 2× the worst measured
ENGINE_FP32_GPU = 5e-3   # tf32x3 dots (≈ 4× fp32's rounding per product): 10× the CPU's worst, 14× under fp16
ENGINE_FP16_RAW = 1.0    # max |Δ| before rounding
ENGINE_FP16_LEVELS = 1   # grey levels after rounding to uint8
ENGINE_FP16_SHARE = 0.08  # share of output values whose rounded value changed
# bf16 (the native CPU kernels: the addends stored in bf16, all else fp32), measured with the
# released weights on natural_batch crops of 17×23 to 90×70, batch 1–3, the image taken in fp32
# (output_dtype): max |Δ| ≤ 0.29 before rounding, at most 1 grey level after it. Cast to bf16 the
# image itself is off by up to 1.03 (bf16's spacing is 1 from 128 and 2 from 256), and rounding
# that again to 8 bits changes 9–17 % of the values (ties of the 0.5 steps between 64 and 128).
ENGINE_BF16_RAW = 0.6     # max |Δ| of the fp32 image: 2× the worst measured
ENGINE_BF16_LEVELS = 1    # grey levels after rounding to uint8
ENGINE_BF16_SHARE = 0.04  # share of rounded values changed (fp32 image)


def check_engine_output(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """The engine's SR output against the fp32 reference's, by the bounds above (``dtype``: the
    engine's; a bf16 engine's image is checked in fp32, see ENGINE_BF16_RAW)."""
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    raw = (got - want).abs().max().item()
    if dtype == torch.float32:
        bound = ENGINE_FP32_GPU if got.is_cuda else ENGINE_FP32_CPU
        assert raw <= bound, f"{what}: fp32 max |Δ| {raw:.3g} > {bound}"
        return
    changed = (got.round().clamp(0, 255) - want.round().clamp(0, 255)).abs()
    levels, share = changed.max().item(), (changed > 0).float().mean().item()
    if dtype == torch.bfloat16:
        assert raw <= ENGINE_BF16_RAW, f"{what}: bf16 max |Δ| {raw:.3g} > {ENGINE_BF16_RAW}"
        assert levels <= ENGINE_BF16_LEVELS, f"{what}: bf16 output {levels:.0f} grey levels off"
        assert share <= ENGINE_BF16_SHARE, f"{what}: bf16 changed {share:.1%} of the values (> {ENGINE_BF16_SHARE:.0%})"
        return
    assert raw <= ENGINE_FP16_RAW, f"{what}: fp16 max |Δ| {raw:.3g} > {ENGINE_FP16_RAW}"
    assert levels <= ENGINE_FP16_LEVELS, f"{what}: fp16 output {levels:.0f} grey levels off"
    assert share <= ENGINE_FP16_SHARE, f"{what}: fp16 changed {share:.1%} of the values (> {ENGINE_FP16_SHARE:.0%})"


@functools.lru_cache(maxsize=2)
def _pictures(folder: str) -> tuple:
    """The pictures of ``folder`` (H×W×3 uint8, grey replicated), decoded once per test session."""
    from msfin_fast.images import read_image

    return tuple(read_image(f).rgb for f in sorted(Path(folder).glob("*.png")))


def natural_batch(data_dir, n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """[n, 3, h, w] float 0–255: crops of the Set14 pictures, chosen by ``seed``.
    What the network is made for; uniform noise drives its activations far outside what any picture
    does (fp16 off by up to 1.2 there, 11% of the values changed)."""
    pictures = _pictures(str(Path(data_dir) / "Set14"))
    g = torch.Generator().manual_seed(seed)
    crops = []
    for _ in range(n):
        rgb = pictures[int(torch.randint(len(pictures), (1,), generator=g))]
        top = int(torch.randint(rgb.shape[0] - h + 1, (1,), generator=g))
        left = int(torch.randint(rgb.shape[1] - w + 1, (1,), generator=g))
        crops.append(torch.from_numpy(rgb[top:top + h, left:left + w].copy()).permute(2, 0, 1).float())
    return torch.stack(crops)
