"""Each Triton kernel against the PyTorch emulation of its contract (engine/backends.py).

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes are small; they are odd, batched, and cover every channel count of both presets.
The emulation computes from the reference modules' own weights with F.conv2d, so these tests
check the weight packing as well as the kernels. Tolerances, relative to the largest magnitude
of the expected tensor: fp32 1e-4 (exact fp32 dot, only the summation order differs);
fp16 2e-2 (fp16 storage of x, a, h and u, a few roundings that may land one ulp apart).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from msfin_fast.engine.backends import EmulatedOps, TritonOps  # noqa: E402
from msfin_fast.engine.packing import pack_head, pack_rrcab, pack_tail  # noqa: E402
from msfin_fast.kernels.contract import Source  # noqa: E402
from msfin_fast.model import RRCAB, MeanShift  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}
PRESET_WIDTHS = [(16, 4, 4), (24, 6, 5), (32, 4, 4), (48, 6, 5), (64, 4, 4), (96, 6, 5)]  # C, G, r


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (a masked store missed?)"
    scale = want.abs().max().item() + 1e-6
    err = (got - want).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max |Δ| {err:.3g} > {TOL[dtype]} × {scale:.3g}"


def random_block(c: int, g: int, r: int, dtype: torch.dtype, seed: int) -> RRCAB:
    torch.manual_seed(seed)
    block = RRCAB(c, g, r, num_steps=0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.to(DEVICE)


def nhwc(n, h, w, c, dtype, scale=1.0):
    return (torch.randn(n, h, w, c, device=DEVICE) * scale).to(dtype)


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def producer_ca(c, g, r, dtype, seed):
    """A deferred source needs the producing block's CA weights; any block of that width will do."""
    return pack_rrcab(random_block(c, g, r, dtype, seed + 100), dtype).ca


# (C, G, r), dtype, batch, (h, w), deferred, number of addends, write x_out
RRCAB_CASES = [
    (PRESET_WIDTHS[0], torch.float32, 1, (5, 7), False, 0, False),
    (PRESET_WIDTHS[1], torch.float32, 3, (9, 5), True, 2, True),
    (PRESET_WIDTHS[1], torch.float16, 2, (7, 6), True, 0, True),
    (PRESET_WIDTHS[2], torch.float16, 2, (6, 9), False, 1, True),
    (PRESET_WIDTHS[3], torch.float32, 2, (5, 5), True, 1, True),
    (PRESET_WIDTHS[4], torch.float16, 1, (4, 7), True, 0, True),
    (PRESET_WIDTHS[5], torch.float32, 1, (3, 5), True, 2, False),
    (PRESET_WIDTHS[5], torch.float16, 2, (5, 3), False, 0, False),
]


@pytest.mark.parametrize("width, dtype, n, hw, deferred, n_add, write_x", RRCAB_CASES)
def test_rrcab_pass(width, dtype, n, hw, deferred, n_add, write_x):
    c, g, r = width
    h, w = hw
    packed = pack_rrcab(random_block(c, g, r, dtype, seed=c + n), dtype)
    t = nhwc(n, h, w, c, dtype, 10)
    src = Source(t)
    if deferred:
        sums = torch.randn(n, c, device=DEVICE) * h * w
        src = src._replace(u=nhwc(n, h, w, c, dtype, 5), sums=sums, ca=producer_ca(c, g, r, dtype, c))
    adds = [nhwc(n, h, w, c, dtype, 3) for _ in range(n_add)]
    src = src._replace(e1=adds[0] if n_add > 0 else None, e2=adds[1] if n_add > 1 else None)

    results = {}
    for ops in (EmulatedOps(), TritonOps()):
        x_out = poisoned_like(t) if write_x else None
        a, u = poisoned_like(t), poisoned_like(t)
        sums_out = torch.full((n, c), 7.0, device=DEVICE)  # the kernel adds to what is there
        ops.rrcab_pass(src, packed, x_out, a, u, sums_out)
        results[ops.name] = (x_out, a, u, sums_out)
    want, got = results["pytorch-emulation"], results["triton"]
    for name, wt, gt in zip(("x_out", "a", "u", "sums"), want, got):
        if wt is not None:
            assert_close(gt, wt, dtype if name != "sums" else dtype, f"{name} (C={c}, {dtype})")


def test_rrcab_emulation_is_one_reference_step():
    """The emulated pass plus the deferred CA is exactly the reference block's step."""
    block = random_block(24, 6, 5, torch.float32, 0)
    packed = pack_rrcab(block, torch.float32)
    ops = EmulatedOps()
    x = torch.randn(2, 24, 6, 7, device=DEVICE) * 10
    t = x.permute(0, 2, 3, 1).contiguous()
    a, u, sums = torch.empty_like(t), torch.empty_like(t), torch.zeros(2, 24, device=DEVICE)
    ops.rrcab_pass(Source(t), packed, None, a, u, sums)
    out = torch.empty_like(t)
    ops.materialize(Source(t, u, sums, packed.ca), out)
    with torch.no_grad():
        want = block(x)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c, dtype, n, hw, n_add", [(48, torch.float32, 2, (5, 7), 2), (16, torch.float16, 3, (9, 4), 1),
                                                    (96, torch.float16, 1, (3, 3), 0)])
def test_materialize(c, dtype, n, hw, n_add):
    h, w = hw
    g, r = (6, 5) if c % 6 == 0 else (4, 4)
    adds = [nhwc(n, h, w, c, dtype, 3) for _ in range(n_add)]
    src = Source(nhwc(n, h, w, c, dtype, 10), nhwc(n, h, w, c, dtype, 5), torch.randn(n, c, device=DEVICE) * h * w,
                 producer_ca(c, g, r, dtype, 1), *(adds + [None, None])[:2])
    want, got = poisoned_like(src.t), poisoned_like(src.t)
    EmulatedOps().materialize(src, want)
    TritonOps().materialize(src, got)
    assert_close(got, want, dtype, "materialize")


@pytest.mark.parametrize("c, dtype, n, hw", [(24, torch.float32, 2, (3, 5)), (16, torch.float16, 1, (4, 3))])
def test_head(c, dtype, n, hw):
    torch.manual_seed(c)
    sub_mean = MeanShift(255, (0.4488, 0.4371, 0.4040), sign=-1)
    conv = torch.nn.Conv2d(3, c, 3, padding=1)
    with torch.no_grad():
        sub_mean.weight.add_(torch.randn_like(sub_mean.weight) * 0.03)  # trained MeanShifts are not identities
    packed = pack_head(sub_mean.to(DEVICE), conv.to(DEVICE), 4)
    x = (torch.rand(n, 3, *hw, device=DEVICE) * 255).to(dtype)
    out_shape = (n, 4 * hw[0], 4 * hw[1], c)
    want = torch.full(out_shape, float("nan"), device=DEVICE, dtype=dtype)
    got = torch.full_like(want, float("nan"))
    EmulatedOps().head(x, packed, want)
    TritonOps().head(x, packed, got)
    assert_close(got, want, dtype, "head")


@pytest.mark.parametrize("c, dtype, n, hw", [(24, torch.float32, 2, (5, 6)), (16, torch.float16, 1, (7, 5))])
def test_tail(c, dtype, n, hw):
    torch.manual_seed(c)
    g, r = (6, 5) if c % 6 == 0 else (4, 4)
    tail = torch.nn.Conv2d(c, 3, 3, padding=1).to(DEVICE)
    add_mean = MeanShift(255, (0.4488, 0.4371, 0.4040), sign=1).to(DEVICE)
    packed = pack_tail(tail, add_mean, dtype)
    h, w = hw
    src = Source(nhwc(n, h, w, c, dtype, 10), nhwc(n, h, w, c, dtype, 5), torch.randn(n, c, device=DEVICE) * h * w,
                 producer_ca(c, g, r, dtype, 2))
    want = torch.full((n, 3, h, w), float("nan"), device=DEVICE, dtype=dtype)
    got = torch.full_like(want, float("nan"))
    EmulatedOps().tail(src, packed, want)
    TritonOps().tail(src, packed, got)
    assert_close(got, want, dtype, "tail")


def test_launchers_reject_mismatched_buffers():
    packed = pack_rrcab(random_block(24, 6, 5, torch.float32, 0), torch.float32)
    t = nhwc(1, 4, 4, 24, torch.float32)
    ops = TritonOps()
    with pytest.raises(ValueError, match="a_out"):
        ops.rrcab_pass(Source(t), packed, None, nhwc(1, 4, 5, 24, torch.float32), torch.empty_like(t),
                       torch.zeros(1, 24, device=DEVICE))
    with pytest.raises(ValueError, match="deferred source needs"):
        ops.materialize(Source(t, u=torch.empty_like(t)), torch.empty_like(t))
    with pytest.raises(ValueError, match="conv1 weight"):
        ops.rrcab_pass(Source(t.half()), packed, None, torch.empty_like(t.half()), torch.empty_like(t.half()),
                       torch.zeros(1, 24, device=DEVICE))


def _conv_case(kind: str, c: int):
    from msfin_fast.engine.plan import Conv

    torch.manual_seed(c)
    if kind == "down":  # stride-2 3×3 + LeakyReLU(0.2), as in the down-sampling blocks
        return torch.nn.Conv2d(c, c, 3, stride=2, padding=1), Conv("", [], None, 3, 2, leaky=True), 1
    if kind == "nobias":  # the second conv of a down-sampling block
        return torch.nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), Conv("", [], None, 3, 1), 1
    if kind == "up":  # 3×3 conv to 4·c, PixelShuffle(2)
        return torch.nn.Conv2d(2 * c, 4 * c, 3, padding=1), Conv("", [], None, 3, 1, shuffle=True), 1
    if kind == "transposed":  # ConvTranspose2d(2c → c, 2, stride 2)
        return torch.nn.ConvTranspose2d(2 * c, c, 2, stride=2), Conv("", [], None, 1, 1, shuffle=True), 1
    return torch.nn.Conv2d(3 * c, c, 1), Conv("", [], None, 1, 1), 3  # 1×1 over a concat of three


@pytest.mark.parametrize("kind, c, dtype, n, hw", [
    ("down", 24, torch.float32, 2, (9, 7)), ("down", 16, torch.float16, 1, (6, 11)),
    ("nobias", 24, torch.float16, 2, (5, 6)), ("up", 24, torch.float32, 1, (5, 7)),
    ("up", 16, torch.float16, 2, (4, 3)), ("transposed", 24, torch.float16, 2, (3, 5)),
    ("transposed", 32, torch.float32, 1, (4, 4)), ("concat", 96, torch.float16, 1, (3, 5)),
    ("concat", 16, torch.float32, 3, (5, 4)),
])
def test_conv(kind, c, dtype, n, hw):
    from msfin_fast.engine.packing import pack_conv

    module, step, n_src = _conv_case(kind, c)
    packed = pack_conv(module.to(DEVICE), n_src, dtype)
    c_in = (module.in_channels) // n_src
    inputs = [nhwc(n, *hw, c_in, dtype, 10) for _ in range(n_src)]
    with torch.no_grad():
        x = torch.cat([t.permute(0, 3, 1, 2).float() for t in inputs], 1)
        y = module(x)  # only for the output shape; the values come from the emulation
    if step.shuffle and isinstance(module, torch.nn.Conv2d):
        y = torch.nn.functional.pixel_shuffle(y, 2)
    shape = (y.shape[0], y.shape[2], y.shape[3], y.shape[1])
    want = torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)
    got = torch.full_like(want, float("nan"))
    EmulatedOps().conv(inputs, packed, want, step)
    TritonOps().conv(inputs, packed, got, step)
    assert_close(got, want, dtype, f"conv {kind}")


@pytest.mark.parametrize("width, dtype, n, hw, deferred, n_add, write_x", [
    (PRESET_WIDTHS[1], torch.float16, 2, (17, 30), True, 0, True),   # 18 tiles over 4 persistent programs
    (PRESET_WIDTHS[0], torch.float32, 1, (15, 15), True, 2, True),
    (PRESET_WIDTHS[2], torch.float16, 1, (9, 20), False, 1, True),
    (PRESET_WIDTHS[0], torch.float16, 3, (5, 4), False, 0, False),
])
def test_rrcab_fused_pass(width, dtype, n, hw, deferred, n_add, write_x):
    """The one-launch pass (conv1 kept in a scratch) against the same emulated contract."""
    from msfin_fast.kernels.rrcab_fused import scratch_numel

    c, g, r = width
    h, w = hw
    packed = pack_rrcab(random_block(c, g, r, dtype, seed=c * n), dtype)
    t = nhwc(n, h, w, c, dtype, 10)
    adds = [nhwc(n, h, w, c, dtype, 3) for _ in range(n_add)]
    src = Source(t, e1=adds[0] if n_add > 0 else None, e2=adds[1] if n_add > 1 else None)
    if deferred:
        src = src._replace(u=nhwc(n, h, w, c, dtype, 5), sums=torch.randn(n, c, device=DEVICE) * h * w,
                           ca=producer_ca(c, g, r, dtype, c))
    results = {}
    for ops, fused in ((EmulatedOps(), False), (TritonOps(fused_rrcab=True), True)):
        x_out = poisoned_like(t) if write_x else None
        u = poisoned_like(t)
        a = torch.full((scratch_numel(t.device, 32 if c > 16 else 16, n, h, w),), float("nan"), dtype=dtype,
                       device=DEVICE) if fused else poisoned_like(t)
        sums = torch.full((n, c), -3.0, device=DEVICE)
        ops.rrcab_pass(src, packed, x_out, a, u, sums, fused=fused)
        results[fused] = (x_out, u, sums)
    for name, want, got in zip(("x_out", "u", "sums"), results[False], results[True]):
        if want is not None:
            assert_close(got, want, dtype, f"fused {name} (C={c}, {dtype})")


@pytest.mark.parametrize("c, dtype, n_add", [(24, torch.float16, 0), (48, torch.float32, 1)])
def test_conv_with_a_deferred_input(c, dtype, n_add):
    """An up-sampling conv reading a block's unfinished output t + CA(u) (+ addends)."""
    from msfin_fast.engine.packing import pack_conv
    from msfin_fast.engine.plan import Conv

    torch.manual_seed(c)
    module = torch.nn.Conv2d(c, 4 * (c // 2), 3, padding=1).to(DEVICE)
    packed = pack_conv(module, 1, dtype)
    step = Conv("", [], None, 3, 1, shuffle=True)
    n, h, w = 2, 5, 7
    g, r = (6, 5) if c % 6 == 0 else (4, 4)
    adds = [nhwc(n, h, w, c, dtype, 3) for _ in range(n_add)]
    src = Source(nhwc(n, h, w, c, dtype, 10), nhwc(n, h, w, c, dtype, 5), torch.randn(n, c, device=DEVICE) * h * w,
                 producer_ca(c, g, r, dtype, 3), *(adds + [None, None])[:2])
    want = torch.full((n, 2 * h, 2 * w, c // 2), float("nan"), device=DEVICE, dtype=dtype)
    got = torch.full_like(want, float("nan"))
    EmulatedOps().conv(src, packed, want, step)
    TritonOps().conv(src, packed, got, step)
    assert_close(got, want, dtype, "conv of a deferred input")
