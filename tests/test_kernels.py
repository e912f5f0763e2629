"""Each Triton kernel against the PyTorch emulation of its contract (engine/backends/emulate.py).

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes are small; they are odd, batched, and cover every channel count of both presets.
Each backend packs the same modules its own way (``SIDES``: the backend and its module of
packers); the emulation computes from the reference modules' own weights with F.conv2d, so these
tests check the Triton packing as well as the kernels.

* Tolerances (tests/bounds.py): derived from the storage dtype and each output's reduction length,
  about 1e-3 of the largest value for fp16 and 2e-6 to 4e-5 for fp32; the channel sums are fp32
  whatever the storage, and are judged by fp32's bound.
* Every output lives inside NaN guard bands (``Guarded``), checked after each launch; outputs start
  as NaN, and the sums as random values the kernels must add to.
* Tile grids: the ``grid`` cases are taller and wider than several tiles and run twice in the
  interpreter: with its own 16×16 tiles and with the GPU's tile sizes (``MSFIN_INTERPRET_TILES=gpu``:
  4×8, 8×16, 8×8, lattices 16×16 / 8×16), so the launch configurations the GPU uses, and the
  tile-to-pixel mappings of every kernel, are exercised on the CPU.
* The faults these tests must catch, and how to re-run the audit: tests/MUTATIONS.md.
"""

from __future__ import annotations

import os

import pytest
import torch
from bounds import UNIT_ROUNDOFF, Guarded, assert_close, ca_length, initial_sums, tolerance, triton_tf32x3
from helpers import require_module

require_module("triton")

from msfin_fast.engine.backends import emulate, triton
from msfin_fast.engine.source import Source  # noqa: E402
from msfin_fast.model import RRCAB, MeanShift  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET_WIDTHS = [(16, 4, 4), (24, 6, 5), (32, 4, 4), (48, 6, 5), (64, 4, 4), (96, 6, 5)]  # C, G, r
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# In the interpreter both tile settings; on a GPU the launches always use the GPU's.
TILE_MODES = ["interpreter-tiles", "gpu-tiles"] if INTERPRETED else ["gpu-tiles"]


@pytest.fixture(params=TILE_MODES)
def tiles(request, monkeypatch):
    if request.param == "gpu-tiles":
        monkeypatch.setenv("MSFIN_INTERPRET_TILES", "gpu")
    else:
        monkeypatch.delenv("MSFIN_INTERPRET_TILES", raising=False)
    return request.param


def tol(dtype: torch.dtype, k: int) -> float:
    """The bound for an output of the Triton kernels on this test's device (tf32x3 on a GPU in fp32)."""
    return tolerance(dtype, k, tf32x3=triton_tf32x3(dtype, DEVICE))


def rrcab_lengths(c: int, deferred: bool, h: int, w: int) -> dict[str, int]:
    """Reduction lengths of a pass's outputs: conv1 and conv2 sum 9 taps × a 16-channel chunk each,
    the 1×1 sums C_padded channels, and the sums add h·w pixels of u on top."""
    cp = 1 << (c - 1).bit_length()
    src = ca_length(c, deferred)
    u = src + 2 * 9 * 16 + cp
    return {"x_out": src, "a": src + 9 * 16, "u": u, "sums": u + h * w}


def random_block(c: int, g: int, r: int, dtype: torch.dtype, seed: int) -> RRCAB:
    torch.manual_seed(seed)
    block = RRCAB(c, g, r, num_steps=0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.to(DEVICE)


def nhwc(n, h, w, c, dtype, scale=1.0):
    return (torch.randn(n, h, w, c, device=DEVICE) * scale).to(dtype)


def sides(fused: bool = False):
    """(backend, module of its packers): the emulation first, then the Triton kernels."""
    return [(emulate.EmulateBackend(), emulate), (triton.TritonBackend(fuse_rrcab=fused), triton)]


def producer(c, g, r, dtype, seed):
    """A deferred source needs the producing block's CA weights; any block of that width will do."""
    return random_block(c, g, r, dtype, seed + 100)


def emulated_and_kernel(what: str, shape, dtype: torch.dtype, launch) -> tuple[torch.Tensor, torch.Tensor]:
    """(want, got): ``launch(ops, packers, out)`` by the emulation and by the Triton kernels, each
    into a fresh guarded NaN output whose guard bands are checked after the launch."""
    results = []
    for ops, packers in sides():
        out = Guarded(DEVICE)
        results.append(out.new(what, shape, dtype))
        launch(ops, packers, results[-1])
        out.check()
    return results[0], results[1]


def run_rrcab_pass(width, dtype, n, h, w, deferred, n_add, write_x, fused, seed):
    """One pass by the emulation and by the kernels, outputs in guarded NaN buffers; compares them."""
    from msfin_fast.kernels.rrcab_fused import scratch_numel

    c, g, r = width
    block = random_block(c, g, r, dtype, seed=seed)
    made_by = producer(c, g, r, dtype, c)
    t = nhwc(n, h, w, c, dtype, 10)
    adds = [nhwc(n, h, w, c, dtype, 3) for _ in range(n_add)]
    u_in = nhwc(n, h, w, c, dtype, 5) if deferred else None
    sums_in = torch.randn(n, c, device=DEVICE) * h * w if deferred else None
    sums0 = initial_sums(n, c, h * w * 10, DEVICE)
    results = {}
    for ops, packers in sides(fused):
        packed = packers.pack_block(block, dtype)
        src = Source(t, u_in, sums_in, packers.pack_block(made_by, dtype) if deferred else None,
                      adds[0] if n_add > 0 else None, adds[1] if n_add > 1 else None)
        out = Guarded(DEVICE)
        kernel_fused = fused and ops.name == "triton"
        x_out = out.new("x_out", t.shape, dtype) if write_x else None
        u = out.new("u", t.shape, dtype)
        if kernel_fused:  # the per-program scratch, guarded like any output
            a = out.new("scratch", (scratch_numel(t.device, 32 if c > 16 else 16, n, h, w),), dtype)
        else:
            a = out.new("a", t.shape, dtype)
        sums = out.new("sums", (n, c), torch.float32, fill=sums0)
        ops.rrcab_pass(src, packed, x_out, a, u, sums, fused=fused)
        out.check()
        results[ops.name] = dict(x_out=x_out, a=None if fused else a, u=u, sums=sums)
    want, got = results["emulate"], results["triton"]
    lengths = rrcab_lengths(c, deferred, h, w)
    for name in ("x_out", "a", "u", "sums"):
        if want[name] is not None:
            store = torch.float32 if name == "sums" else dtype
            assert_close(got[name], want[name], tol(store, lengths[name]),
                         f"{name} (C={c}, {dtype}, {n}×{h}×{w}{', fused' if fused else ''})")


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


def case_id(case) -> str:
    (c, _, _), dtype, n, (h, w), deferred, n_add, write_x = case
    return (f"C{c}-{'fp16' if dtype == torch.float16 else 'fp32'}-{n}x{h}x{w}"
            f"{'-deferred' if deferred else ''}{f'-add{n_add}' if n_add else ''}{'-x' if write_x else ''}")


@pytest.mark.parametrize("width, dtype, n, hw, deferred, n_add, write_x", RRCAB_CASES, ids=map(case_id, RRCAB_CASES))
def test_rrcab_pass(width, dtype, n, hw, deferred, n_add, write_x):
    run_rrcab_pass(width, dtype, n, *hw, deferred, n_add, write_x, fused=False, seed=width[0] + n)


# Taller and wider than two tiles in both tile settings (16×16; 4×8, 8×16, 8×8, lattices of 14×14
# and 6×14 inner pixels): the second tile row is where a wrong tile-to-row mapping shows.
GRID_CASES = [
    (PRESET_WIDTHS[1], torch.float32, 1, (19, 17), True, 1, True),
    (PRESET_WIDTHS[0], torch.float16, 1, (18, 35), True, 0, True),
    (PRESET_WIDTHS[3], torch.float16, 1, (17, 18), False, 2, False),
]


@pytest.mark.parametrize("width, dtype, n, hw, deferred, n_add, write_x", GRID_CASES, ids=map(case_id, GRID_CASES))
def test_rrcab_pass_over_a_grid_of_tiles(tiles, width, dtype, n, hw, deferred, n_add, write_x):
    run_rrcab_pass(width, dtype, n, *hw, deferred, n_add, write_x, fused=False, seed=width[0] + n)


FUSED_CASES = [
    (PRESET_WIDTHS[1], torch.float16, 2, (17, 30), True, 0, True),   # 18 tiles over 4 persistent programs
    (PRESET_WIDTHS[0], torch.float32, 1, (15, 15), True, 2, True),
    (PRESET_WIDTHS[2], torch.float16, 1, (9, 20), False, 1, True),
    (PRESET_WIDTHS[0], torch.float16, 3, (5, 4), False, 0, False),
]


@pytest.mark.parametrize("width, dtype, n, hw, deferred, n_add, write_x", FUSED_CASES, ids=map(case_id, FUSED_CASES))
def test_rrcab_fused_pass(width, dtype, n, hw, deferred, n_add, write_x):
    """The one-launch pass (conv1 kept in a scratch) against the same emulated contract."""
    run_rrcab_pass(width, dtype, n, *hw, deferred, n_add, write_x, fused=True, seed=width[0] * n)


@pytest.mark.parametrize("width, dtype", [(PRESET_WIDTHS[1], torch.float32), (PRESET_WIDTHS[2], torch.float16)])
def test_rrcab_fused_pass_over_a_grid_of_tiles(tiles, width, dtype):
    run_rrcab_pass(width, dtype, 1, 17, 31, True, 1, True, fused=True, seed=width[0])


def test_rrcab_emulation_is_one_reference_step():
    """The emulated pass plus the deferred CA is exactly the reference block's step."""
    block = random_block(24, 6, 5, torch.float32, 0)
    packed = emulate.pack_block(block, torch.float32)
    ops = emulate.EmulateBackend()
    x = torch.randn(2, 24, 6, 7, device=DEVICE) * 10
    t = x.permute(0, 2, 3, 1).contiguous()
    a, u, sums = torch.empty_like(t), torch.empty_like(t), torch.zeros(2, 24, device=DEVICE)
    ops.rrcab_pass(Source(t), packed, None, a, u, sums)
    out = torch.empty_like(t)
    ops.materialize(Source(t, u, sums, packed), out)
    with torch.no_grad():
        want = block(x)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), want, rtol=1e-5, atol=1e-4)


def deferred_source(c, dtype, n, h, w, n_add, seed):
    """A function of a backend's packers → the same deferred operand, its producer packed that way."""
    g, r = (6, 5) if c % 6 == 0 else (4, 4)
    adds = [nhwc(n, h, w, c, dtype, 3) for _ in range(n_add)]
    t, u, sums = nhwc(n, h, w, c, dtype, 10), nhwc(n, h, w, c, dtype, 5), torch.randn(n, c, device=DEVICE) * h * w
    made_by = producer(c, g, r, dtype, seed)
    return lambda packers: Source(t, u, sums, packers.pack_block(made_by, dtype), *(adds + [None, None])[:2])


def check_materialize(c, dtype, n, hw, n_add):
    h, w = hw
    src = deferred_source(c, dtype, n, h, w, n_add, 1)
    want, got = emulated_and_kernel("out", (n, h, w, c), dtype,
                                    lambda ops, packers, out: ops.materialize(src(packers), out))
    assert_close(got, want, tol(dtype, ca_length(c, True)), "materialize")


@pytest.mark.parametrize("c, dtype, n, hw, n_add", [(48, torch.float32, 2, (5, 7), 2), (16, torch.float16, 3, (9, 4), 1),
                                                    (96, torch.float16, 1, (3, 3), 0)])
def test_materialize(c, dtype, n, hw, n_add):
    check_materialize(c, dtype, n, hw, n_add)


def test_materialize_over_several_blocks(tiles):
    """More pixels than one program's block in both settings (1024; 4096 / C_padded)."""
    check_materialize(16, torch.float32, 2, (33, 35), 1)


def trained_mean_shift(sign: int, seed: int) -> MeanShift:
    """A MeanShift as the released files have it: not an identity. The kernels fold its 3×3 matrix
    (sub_mean into the head, add_mean into the tail); an identity would hide a fold that drops it."""
    torch.manual_seed(seed)
    shift = MeanShift(255, (0.4488, 0.4371, 0.4040), sign=sign)
    with torch.no_grad():
        shift.weight.add_(torch.randn_like(shift.weight) * 0.03)
        shift.bias.add_(torch.randn_like(shift.bias) * 3)
    return shift.to(DEVICE)


@pytest.mark.parametrize("c, dtype, n, hw", [(24, torch.float32, 2, (3, 5)), (16, torch.float16, 1, (4, 3))])
def test_head(c, dtype, n, hw):
    check_head(c, dtype, n, hw)


def test_head_over_a_grid_of_tiles(tiles):
    check_head(24, torch.float16, 1, (5, 9))  # HR 20×36: 2×3 tiles of 16×16, 3×3 of 8×16


def check_head(c, dtype, n, hw):
    torch.manual_seed(c)
    conv = torch.nn.Conv2d(3, c, 3, padding=1).to(DEVICE)
    shift = trained_mean_shift(-1, c)
    x = (torch.rand(n, 3, *hw, device=DEVICE) * 255).to(dtype)
    out_shape = (n, 4 * hw[0], 4 * hw[1], c)
    want, got = emulated_and_kernel("head out", out_shape, dtype,
                                    lambda ops, packers, out: ops.head(x, packers.pack_head(shift, conv, 4), out))
    # bilinear (4 terms) → sub_mean (3) → 3×3 conv over 3 channels (27); head products are FMAs,
    # not dots, so fp32 is exact on the GPU too.
    assert_close(got, want, tolerance(dtype, 4 + 3 + 27), "head")


def check_tail(c, dtype, n, hw, seed):
    torch.manual_seed(c)
    tail = torch.nn.Conv2d(c, 3, 3, padding=1).to(DEVICE)
    shift = trained_mean_shift(1, seed)
    h, w = hw
    src = deferred_source(c, dtype, n, h, w, 0, 2)
    want, got = emulated_and_kernel(
        "tail out", (n, 3, h, w), dtype,
        lambda ops, packers, out: ops.tail(src(packers), packers.pack_tail(tail, shift, dtype), out))
    # Source, 3×3 conv over every 16-channel chunk, add_mean's 3. The kernel rounds the folded
    # weights M·w to the storage dtype, the emulation rounds w and applies M in fp32: one more
    # rounding, of u_storage, between the two (measured in fp16: at most 5.1e-4 over 36 cases).
    k = ca_length(c, True) + 9 * 16 * -(-c // 16) + 3
    assert_close(got, want, tol(dtype, k) + UNIT_ROUNDOFF[dtype], "tail")


@pytest.mark.parametrize("c, dtype, n, hw", [(24, torch.float32, 2, (5, 6)), (16, torch.float16, 1, (7, 5))])
def test_tail(c, dtype, n, hw):
    check_tail(c, dtype, n, hw, seed=c)


def test_tail_over_a_grid_of_tiles(tiles):
    check_tail(24, torch.float32, 1, (17, 35), seed=3)


def test_launchers_reject_mismatched_buffers():
    packed = triton.pack_block(random_block(24, 6, 5, torch.float32, 0), torch.float32)
    t = nhwc(1, 4, 4, 24, torch.float32)
    ops = triton.TritonBackend()
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


def conv_length(ksize: int, n_src: int, c_src: int) -> int:
    """A conv's reduction: ksize² taps × every 16-channel chunk of every input."""
    return ksize * ksize * n_src * 16 * -(-c_src // 16)


def check_conv(kind, c, dtype, n, hw):
    module, step, n_src = _conv_case(kind, c)
    module = module.to(DEVICE)
    c_in = (module.in_channels) // n_src
    inputs = [nhwc(n, *hw, c_in, dtype, 10) for _ in range(n_src)]
    with torch.no_grad():
        x = torch.cat([t.permute(0, 3, 1, 2).float() for t in inputs], 1)
        y = module(x)  # only for the output shape; the values come from the emulation
    if step.shuffle and isinstance(module, torch.nn.Conv2d):
        y = torch.nn.functional.pixel_shuffle(y, 2)
    shape = (y.shape[0], y.shape[2], y.shape[3], y.shape[1])
    want, got = emulated_and_kernel(
        f"conv {kind} out", shape, dtype,
        lambda ops, packers, out: ops.conv(inputs, packers.pack_conv(module, n_src, dtype), out, step))
    assert_close(got, want, tol(dtype, conv_length(step.ksize, n_src, c_in)), f"conv {kind}")


@pytest.mark.parametrize("kind, c, dtype, n, hw", [
    ("down", 24, torch.float32, 2, (9, 7)), ("down", 16, torch.float16, 1, (6, 11)),
    ("nobias", 24, torch.float16, 2, (5, 6)), ("up", 24, torch.float32, 1, (5, 7)),
    ("up", 16, torch.float16, 2, (4, 3)), ("transposed", 24, torch.float16, 2, (3, 5)),
    ("transposed", 32, torch.float32, 1, (4, 4)), ("concat", 96, torch.float16, 1, (3, 5)),
    ("concat", 16, torch.float32, 3, (5, 4)),
])
def test_conv(kind, c, dtype, n, hw):
    check_conv(kind, c, dtype, n, hw)


@pytest.mark.parametrize("kind, c, dtype, hw", [
    ("down", 16, torch.float32, (35, 37)),    # out 18×19: the grid follows the output, not the input
    ("up", 16, torch.float16, (17, 18)),      # shuffled stores from 2×2 tiles or more
    ("concat", 16, torch.float32, (9, 17)),
])
def test_conv_over_a_grid_of_tiles(tiles, kind, c, dtype, hw):
    check_conv(kind, c, dtype, 1, hw)


@pytest.mark.parametrize("c, dtype, n_add", [(24, torch.float16, 0), (48, torch.float32, 1)])
def test_conv_with_a_deferred_input(c, dtype, n_add):
    """An up-sampling conv reading a block's unfinished output t + CA(u) (+ addends)."""
    from msfin_fast.engine.plan import Conv

    torch.manual_seed(c)
    module = torch.nn.Conv2d(c, 4 * (c // 2), 3, padding=1).to(DEVICE)
    step = Conv("", [], None, 3, 1, shuffle=True)
    n, h, w = 2, 5, 7
    src = deferred_source(c, dtype, n, h, w, n_add, 3)
    want, got = emulated_and_kernel("conv out", (n, 2 * h, 2 * w, c // 2), dtype,
                                    lambda ops, packers, out: ops.conv(src(packers), packers.pack_conv(module, 1, dtype),
                                                                       out, step))
    k = ca_length(c, True) + conv_length(3, 1, c)
    assert_close(got, want, tol(dtype, k), "conv of a deferred input")
