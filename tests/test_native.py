"""The C++ CPU kernels (``native`` backend, csrc/cpu/) against the PyTorch emulation of the same
launch contracts (engine/backends/emulate.py), and the engine built on them against the reference.

* Every launch operation (RRCAB pass, materialize, head, dense conv in each of its stores, tail) at
  odd sizes, batch > 1, every channel count of both presets, deferred inputs with 0–2 addends.
* Tile edges and halos: the kernel streams rows over column strips and row bands; the cases run
  with strips and bands of a few pixels (``tile_cols``/``band_rows``) as well as with the default
  tiling, so every strip and band edge, and images narrower than a strip, are exercised.
* Every instruction set this CPU and build support (``_cpu.isas()``: avx512, avx2, portable).
* Outputs live in NaN guard bands (tests/bounds.py ``Guarded``), checked after each launch;
  tolerances follow tests/bounds.py: the kernel and the emulation differ only in the order of
  fp32 sums (and FMA contraction), so fp32 outputs agree to ``k·2⁻²⁴`` of the largest value.
* Without the built extension these tests skip on a developer's machine and fail under CI.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from bounds import ENGINE_FP32_CPU, Guarded, assert_close, ca_length, check_engine_output, initial_sums, tolerance
from helpers import missing
from helpers import random_model  # seeded weights, MeanShifts that are not identities

from msfin_fast import MSFIN, optimize
from msfin_fast.engine import plan as P
from msfin_fast.engine.backends import emulate, native
from msfin_fast.engine.source import Source
from msfin_fast.model import RRCAB

if not native.available():
    missing(native.not_built_reason())

from msfin_fast import _cpu  # noqa: E402

PRESET_WIDTHS = [(16, 4, 4), (24, 6, 5), (32, 4, 4), (48, 6, 5), (64, 4, 4), (96, 6, 5)]  # C, G, r
ISAS = _cpu.isas()
F32 = torch.float32


@contextlib.contextmanager
def isa(name: str):
    before = _cpu.use_isa(name)
    try:
        yield
    finally:
        _cpu.use_isa(before)


@pytest.fixture(params=ISAS)
def each_isa(request):
    with isa(request.param):
        yield request.param


def random_block(c: int, g: int, r: int, seed: int) -> RRCAB:
    torch.manual_seed(seed)
    block = RRCAB(c, g, r, num_steps=0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def nhwc(n, h, w, c, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, w, c, generator=g) * scale


def pass_lengths(c: int, g: int, deferred: bool, h: int, w: int) -> dict[str, int]:
    """Reduction lengths: the source (CA products, addends), two grouped 3×3 convs of 9·C/G terms,
    the 1×1 of C terms; the sums add h·w pixels of u."""
    src = ca_length(c, deferred)
    u = src + 2 * 9 * (c // g) + c
    return {"x_out": src, "u": u, "sums": u + h * w}


def run_pass(width, n, h, w, deferred, n_add, write_x, tile_cols=None, band_rows=None, seed=0):
    c, g, r = width
    block, made_by = random_block(c, g, r, seed), random_block(c, g, r, seed + 100)
    t = nhwc(n, h, w, c, 10, seed + 1)
    adds = [nhwc(n, h, w, c, 3, seed + 2 + i) for i in range(n_add)]
    u_in = nhwc(n, h, w, c, 5, seed + 5) if deferred else None
    sums_in = torch.randn(n, c) * h * w if deferred else None
    sums0 = initial_sums(n, c, h * w * 10, "cpu")
    results = {}
    for ops, packers in ((emulate.EmulateBackend(), emulate),
                         (native.NativeBackend(tile_cols=tile_cols, band_rows=band_rows), native)):
        src = Source(t, u_in, sums_in, packers.pack_block(made_by, F32) if deferred else None,
                     adds[0] if n_add > 0 else None, adds[1] if n_add > 1 else None)
        out = Guarded("cpu")
        x_out = out.new("x_out", t.shape, F32) if write_x else None
        u = out.new("u", t.shape, F32)
        sums = out.new("sums", (n, c), F32, fill=sums0)
        ops.rrcab_pass(src, packers.pack_block(block, F32), x_out, torch.empty(0), u, sums, fused=True)
        out.check()
        results[ops.name] = dict(x_out=x_out, u=u, sums=sums)
    want, got = results["emulate"], results["native"]
    lengths = pass_lengths(c, g, deferred, h, w)
    for name in ("x_out", "u", "sums"):
        if want[name] is not None:
            assert_close(got[name], want[name], tolerance(F32, lengths[name]),
                         f"{name} (C={c}, {n}×{h}×{w}, strips {tile_cols}, bands {band_rows})")


# (C, G, r), batch, (h, w), deferred, addends, write x_out
PASS_CASES = [
    (PRESET_WIDTHS[0], 1, (5, 7), False, 0, False),
    (PRESET_WIDTHS[1], 3, (9, 5), True, 2, True),
    (PRESET_WIDTHS[2], 2, (7, 13), True, 1, True),
    (PRESET_WIDTHS[3], 2, (6, 9), False, 1, True),
    (PRESET_WIDTHS[4], 1, (4, 11), True, 0, True),
    (PRESET_WIDTHS[5], 2, (3, 5), True, 2, False),
    (PRESET_WIDTHS[1], 1, (1, 1), True, 1, True),
    (PRESET_WIDTHS[0], 1, (2, 19), True, 2, True),
]


def pass_id(case) -> str:
    (c, _, _), n, (h, w), deferred, n_add, write_x = case
    return f"C{c}-{n}x{h}x{w}{'-deferred' if deferred else ''}{f'-add{n_add}' if n_add else ''}{'-x' if write_x else ''}"


@pytest.mark.parametrize("width, n, hw, deferred, n_add, write_x", PASS_CASES, ids=map(pass_id, PASS_CASES))
def test_rrcab_pass(each_isa, width, n, hw, deferred, n_add, write_x):
    run_pass(width, n, *hw, deferred, n_add, write_x, seed=width[0] + n)


# Strips of 3–9 columns and bands of 2–5 rows over images of 13–37 pixels: every piece has a
# neighbour on each side, and the last strip and band are partial.
GRID_CASES = [
    (PRESET_WIDTHS[1], 2, (17, 29), True, 1, True, 7, 4),
    (PRESET_WIDTHS[0], 1, (13, 37), True, 2, True, 9, 5),
    (PRESET_WIDTHS[5], 1, (11, 13), True, 0, True, 3, 2),
    (PRESET_WIDTHS[2], 1, (16, 16), False, 1, True, 8, 8),
]


@pytest.mark.parametrize("width, n, hw, deferred, n_add, write_x, cols, rows", GRID_CASES,
                         ids=[pass_id(c[:6]) + f"-strips{c[6]}-bands{c[7]}" for c in GRID_CASES])
def test_rrcab_pass_over_strips_and_bands(each_isa, width, n, hw, deferred, n_add, write_x, cols, rows):
    run_pass(width, n, *hw, deferred, n_add, write_x, tile_cols=cols, band_rows=rows, seed=width[0])


@pytest.mark.parametrize("c, n_add, deferred", [(16, 0, True), (48, 2, True), (96, 1, False), (24, 2, True)])
def test_materialize(each_isa, c, n_add, deferred):
    n, h, w = 2, 5, 9
    made_by = random_block(c, 4 if c % 4 == 0 else 6, 4, c)
    t, u = nhwc(n, h, w, c, 10, 1), nhwc(n, h, w, c, 5, 2)
    adds = [nhwc(n, h, w, c, 3, 3 + i) for i in range(n_add)]
    sums = torch.randn(n, c) * h * w
    got = {}
    for ops, packers in ((emulate.EmulateBackend(), emulate), (native.NativeBackend(), native)):
        src = Source(t, u if deferred else None, sums if deferred else None,
                     packers.pack_block(made_by, F32) if deferred else None, *(adds + [None, None])[:2])
        out = Guarded("cpu")
        got[ops.name] = out.new("out", t.shape, F32)
        ops.materialize(src, got[ops.name])
        out.check()
    assert_close(got["native"], got["emulate"], tolerance(F32, ca_length(c, deferred)), f"materialize C={c}")


def _conv_steps(preset: str):
    """(model, every Conv launch of its plan) with seeded weights."""
    torch.manual_seed(3)
    model = MSFIN(preset).eval()
    return model, [launch for launch in P.build_plan(model).launches if isinstance(launch, P.Conv)]


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_every_conv_of_the_plan(each_isa, preset):
    """Each dense conv step (3×3 stride 1 and 2, LeakyReLU, pixel shuffle, the transposed 2×2
    convs, the concatenations read as separate inputs, deferred inputs) at an odd size, batch 2."""
    model, steps = _conv_steps(preset)
    n, H, W = 2, 4 * 5, 4 * 7  # full resolution; every level's size is odd somewhere
    kinds = set()
    for step in steps:
        conv = model.get_submodule(step.module)
        div = step.parts[0].div if step.src is None else step.src.t.div
        h, w = H // div, W // div
        parts = [nhwc(n, h, w, b.channels, 2, i + 7) for i, b in enumerate(step.parts)]
        ctx = []
        if step.src is not None:  # a deferred input: finish it against a producer block of its width
            c = step.src.t.channels
            made_by = random_block(c, {16: 4, 24: 6, 32: 4, 48: 6, 64: 4, 96: 6}[c], 4, c)
            ctx = [nhwc(n, h, w, c, 5, 20), torch.randn(n, c) * h * w, made_by]
        results = {}
        for ops, packers in ((emulate.EmulateBackend(), emulate), (native.NativeBackend(), native)):
            packed = (native.pack_conv(conv, len(step.parts), F32, shuffle=step.shuffle) if packers is native
                      else emulate.pack_conv(conv, len(step.parts), F32))
            inputs = parts
            if ctx:
                u, sums, made_by = ctx
                inputs = Source(parts[0], u, sums, packers.pack_block(made_by, F32))
            out_div = div * step.stride // (2 if step.shuffle else 1)
            out = Guarded("cpu")
            results[ops.name] = out.new("out", (n, H // out_div, W // out_div, step.out.channels), F32)
            ops.conv(inputs, packed, results[ops.name], step)
            out.check()
        terms = sum(b.channels for b in step.parts) * step.ksize ** 2  # the conv's reduction length
        assert_close(results["native"], results["emulate"], tolerance(F32, terms + ca_length(96, bool(ctx))),
                     f"{step.module} ({type(conv).__name__}, stride {step.stride}, leaky {step.leaky}, "
                     f"shuffle {step.shuffle}, {len(step.parts)} inputs{', deferred' if ctx else ''})")
        kinds.add((type(conv).__name__, step.stride, step.leaky, step.shuffle, len(step.parts) > 1, bool(ctx)))
    # the plan exercised every store and epilogue the kernel has
    assert {k[0] for k in kinds} == {"Conv2d", "ConvTranspose2d"}
    assert any(k[1] == 2 and k[2] for k in kinds) and any(k[3] and k[0] == "Conv2d" for k in kinds)
    assert any(k[4] for k in kinds) and any(k[5] for k in kinds)


@pytest.mark.parametrize("cols, rows", [(None, None), (5, 3)], ids=["default-tiling", "strips5-bands3"])
@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_head_and_tail(each_isa, preset, cols, rows):
    """Both stream rows over strips and bands like the pass (the head's upsampled rows and the
    tail's finished rows have halos): with the default tiling (one strip) and with strips of 5
    columns and bands of 3 rows over the 20×12 output (partial last strip and band)."""
    torch.manual_seed(5)
    model = MSFIN(preset).eval()
    with torch.no_grad():  # trained MeanShifts are not identities: the folds must keep the matrix
        for shift in (model.sub_mean, model.add_mean):
            shift.weight.add_(torch.randn_like(shift.weight) * 0.03)
            shift.bias.add_(torch.randn_like(shift.bias) * 3)
    c = model.config.n_feats
    n, h, w = 2, 5, 3
    x = torch.rand(n, 3, h, w) * 255
    feats, image = {}, {}
    made_by = random_block(c, model.config.groups, 4, 1)
    t, u = nhwc(n, 4 * h, 4 * w, c, 10, 1), nhwc(n, 4 * h, 4 * w, c, 5, 2)
    sums = torch.randn(n, c) * 16 * h * w
    for ops, packers in ((emulate.EmulateBackend(), emulate), (native.NativeBackend(tile_cols=cols, band_rows=rows), native)):
        out = Guarded("cpu")
        feats[ops.name] = out.new("head", (n, 4 * h, 4 * w, c), F32)
        ops.head(x, packers.pack_head(model.sub_mean, model.head, 4), feats[ops.name])
        image[ops.name] = out.new("tail", (n, 3, 4 * h, 4 * w), F32)
        ops.tail(Source(t, u, sums, packers.pack_block(made_by, F32)), packers.pack_tail(model.tail2, model.add_mean, F32),
                 image[ops.name])
        out.check()
    assert_close(feats["native"], feats["emulate"], tolerance(F32, 27 + 3 + 8), "head")
    assert_close(image["native"], image["emulate"], tolerance(F32, 9 * c + 3 + ca_length(c, True)), "tail")


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
@pytest.mark.parametrize("n, h, w", [(1, 5, 7), (3, 6, 3), (2, 9, 34)])
def test_engine_matches_the_reference(preset, n, h, w):
    model = random_model(preset)
    engine = optimize(model, dtype=torch.float32, backend="native")
    assert engine.backend == "native" and engine.fallback_reason is None
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(h * w)) * 255
    with torch.no_grad():
        want = model(x)
    engine.poison_buffers()
    got = engine(x)
    assert got.shape == want.shape
    check_engine_output(got, want, F32, f"{preset} {n}×{h}×{w}")
    assert torch.equal(engine(x), got), "two calls of one input gave different outputs"


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_released_weights_on_a_picture(pretrained, data_dir, preset):
    """The released weights on a crop of a real picture (batch 2), within 1e-3 of the reference."""
    from msfin_fast.images import read_image

    model = pretrained(preset)
    rgb = read_image(data_dir / "Set5" / "baby.png").rgb[100:131, 120:147]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    x = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        want = model(x)
    got = optimize(model, dtype=torch.float32, backend="native")(x)
    assert (got - want).abs().max().item() <= ENGINE_FP32_CPU
    # fp16 asked for on a CPU: computed in fp32, rounded once to fp16
    half = optimize(model, dtype=torch.float16, backend="native")
    assert half.storage_dtype == F32 and torch.equal(half(x), got.half())


# ---- bfloat16: what is added to the residual stream stored in bf16 ----------------------------------
# The kernels compute in fp32 whatever the storage; bf16 changes only how u, e1, e2 are read
# (widened) and how u and a conv's output are written (rounded to nearest even). So each launch
# with bf16 operands is checked bit for bit against the same launch with fp32 operands holding the
# same values: x_out and the sums equal, u and conv outputs equal to torch's rounding of the fp32 ones.

BF16 = torch.bfloat16


def _as(x, dtype):
    return None if x is None else x.to(dtype)


def native_pass_pair(width, n, h, w, deferred, n_add, write_x, tile_cols=None, band_rows=None, seed=0):
    """One native pass twice over the same values: addends and u_out in bf16, then in fp32."""
    c, g, r = width
    block, made_by = random_block(c, g, r, seed), random_block(c, g, r, seed + 100)
    t = nhwc(n, h, w, c, 10, seed + 1)
    adds = [nhwc(n, h, w, c, 3, seed + 2 + i).to(BF16) for i in range(n_add)]  # values bf16 holds
    u_in = nhwc(n, h, w, c, 5, seed + 5).to(BF16) if deferred else None
    sums_in = torch.randn(n, c) * h * w if deferred else None
    sums0 = initial_sums(n, c, h * w * 10, "cpu")
    backend = native.NativeBackend(tile_cols=tile_cols, band_rows=band_rows)
    p = native.pack_block(block, F32)
    producer = native.pack_block(made_by, F32) if deferred else None
    results = {}
    for dt in (BF16, F32):
        src = Source(t, _as(u_in, dt), sums_in, producer, *([_as(a, dt) for a in adds] + [None, None])[:2])
        out = Guarded("cpu")
        x_out = out.new("x_out", t.shape, F32) if write_x else None
        u = out.new("u", t.shape, dt)
        sums = out.new("sums", (n, c), F32, fill=sums0)
        backend.rrcab_pass(src, p, x_out, None, u, sums, fused=True)
        out.check()
        results[dt] = dict(x_out=x_out, u=u, sums=sums)
    return results[BF16], results[F32]


BF16_PASS_CASES = [PASS_CASES[1], PASS_CASES[2], PASS_CASES[4], PASS_CASES[5], PASS_CASES[7]]


@pytest.mark.parametrize("width, n, hw, deferred, n_add, write_x, cols, rows",
                         [c + (None, None) for c in BF16_PASS_CASES] + [GRID_CASES[0], GRID_CASES[1]],
                         ids=[pass_id(c) for c in BF16_PASS_CASES] + [pass_id(c[:6]) + f"-strips{c[6]}-bands{c[7]}"
                                                                      for c in GRID_CASES[:2]])
def test_rrcab_pass_with_bf16_addends(each_isa, width, n, hw, deferred, n_add, write_x, cols, rows):
    got, f32 = native_pass_pair(width, n, *hw, deferred, n_add, write_x, cols, rows, seed=width[0] + n)
    if write_x:  # the residual stream: fp32, finished from the widened addends, never rounded to bf16
        assert torch.equal(got["x_out"], f32["x_out"]), "x_out differs with bf16 addends of the same values"
    assert torch.equal(got["sums"], f32["sums"]), "the channel sums must add the fp32 u, before its rounding"
    want_u = f32["u"].to(BF16)  # torch rounds to nearest, ties to even
    bad = (got["u"].view(torch.int16) != want_u.view(torch.int16)).sum().item()
    assert bad == 0, f"{bad} values of u are not the fp32 u rounded to nearest even"


def test_materialize_tail_and_convs_with_bf16_operands(each_isa):
    """materialize and the tail read bf16 addends widened; a dense conv writes bf16 rounded to nearest
    even, in both stores (plain, pixel-shuffled) and with LeakyReLU (every conv step of MSFIN's plan)."""
    n, h, w, c = 2, 5, 9, 24
    made_by = random_block(c, 6, 5, 1)
    t = nhwc(n, h, w, c, 10, 1)
    u, e1, e2 = (nhwc(n, h, w, c, s, 2 + i).to(BF16) for i, s in enumerate((5, 3, 3)))
    sums = torch.randn(n, c) * h * w
    backend = native.NativeBackend(tile_cols=4, band_rows=2)
    model = MSFIN("msfin-x4").eval()
    tail = native.pack_tail(model.tail2, model.add_mean, F32)
    got = {}
    for dt in (BF16, F32):
        src = Source(t, u.to(dt), sums, native.pack_block(made_by, F32), e1.to(dt), e2.to(dt))
        out = Guarded("cpu")
        got[dt] = (out.new("materialized", t.shape, F32), out.new("image", (n, 3, h, w), F32))
        backend.materialize(src, got[dt][0])
        backend.tail(src, tail, got[dt][1])
        out.check()
    assert torch.equal(got[BF16][0], got[F32][0]), "materialize: bf16 addends not read as their values"
    assert torch.equal(got[BF16][1], got[F32][1]), "tail: bf16 addends not read as their values"
    with pytest.raises(ValueError, match="share one dtype"):
        backend.materialize(Source(t, u, sums, native.pack_block(made_by, F32), e1.float()), got[F32][0])

    model, steps = _conv_steps("msfin-x4")
    H, W = 4 * 5, 4 * 7
    for step in steps:
        conv = model.get_submodule(step.module)
        div = step.parts[0].div if step.src is None else step.src.t.div
        parts = [nhwc(n, H // div, W // div, b.channels, 2, i + 7) for i, b in enumerate(step.parts)]
        packed = native.pack_conv(conv, len(step.parts), F32, shuffle=step.shuffle)
        out_div = div * step.stride // (2 if step.shuffle else 1)
        shape = (n, H // out_div, W // out_div, step.out.channels)
        outs = {}
        for dt in (BF16, F32):
            guard = Guarded("cpu")
            outs[dt] = guard.new("out", shape, dt)
            backend.conv(parts, packed, outs[dt], step)
            guard.check()
        assert torch.equal(outs[BF16].view(torch.int16), outs[F32].to(BF16).view(torch.int16)), (
            f"{step.module}: the bf16 output is not the fp32 one rounded to nearest even")


def test_a_bf16_engine_stores_only_the_addends_in_bf16():
    """The residual stream (every launch's base t, x_out, a conv's plain inputs), the sums and the
    image stay fp32; each pass's u and the convs read only as addends are bf16, and the arena shrinks."""
    model = random_model("msfin-x4")
    engine = optimize(model, dtype=BF16, backend="native")
    assert engine.backend == "native" and engine.storage_dtype == F32 and engine.addend_dtype == BF16
    narrow = set(engine.executor.dtypes)
    passes = [launch for launch in engine.plan.launches if isinstance(launch, P.RRCABPass)]
    assert {launch.u for launch in passes} <= narrow
    for launch in engine.plan.launches:
        src = getattr(launch, "src", None)
        if src is not None:
            assert src.t not in narrow, f"{type(launch).__name__}: its base t is stored in bf16"
        if isinstance(launch, P.Conv) and src is None:
            assert not set(launch.parts) & narrow, f"{launch.module}: reads a bf16 input"
        if isinstance(launch, P.RRCABPass) and launch.x_out is not None:
            assert launch.x_out not in narrow
    assert any(isinstance(launch, P.Conv) and launch.out in narrow for launch in engine.plan.launches)
    x = torch.rand(2, 3, 6, 5) * 255
    y = engine(x)
    assert y.dtype == BF16  # the engine's dtype unless output_dtype says otherwise
    (arena,) = engine._arenas.values()
    for buf, tensor in arena.values.items():
        if isinstance(buf, P.Buf):
            assert tensor.dtype == (BF16 if buf in narrow else F32), buf
    fp32 = optimize(model, dtype=F32, backend="native")
    assert engine.arena_bytes(2, 6, 5) < 0.75 * fp32.arena_bytes(2, 6, 5)


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
@pytest.mark.parametrize("n, h, w", [(1, 5, 7), (3, 6, 3), (2, 9, 34)])
def test_a_bf16_engine_matches_its_emulation(preset, n, h, w):
    """Against the emulation of the same contract (engine/backends/emulate.py in its bf16 mode: the
    same buffers in bf16, torch's rounding into them) with the image in fp32. They differ by fp32
    sum order and the odd value rounded to the other bf16 neighbour: measured ≤ 8.3e-5 of the
    largest output, where storing the addends in bf16 at all moves it ≤ 2.9e-4 from the fp32
    reference. Bound: 1e-3, 12× the measured difference; a launch that read bf16 as fp32, or wrote
    the wrong buffer, is off by the whole output."""
    model = random_model(preset)
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(h * w)) * 255
    got = optimize(model, dtype=BF16, backend="native", output_dtype=F32)
    emulated = optimize(model, dtype=BF16, backend="emulate", output_dtype=F32)
    got.poison_buffers()
    a, b = got(x), emulated(x)
    assert a.dtype == F32 and torch.isfinite(a).all()
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert (a - b).abs().max().item() <= 1e-3 * scale
    assert torch.equal(got(x), a), "two calls of one input gave different outputs"


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_bf16_with_the_released_weights_on_pictures(pretrained, data_dir, preset):
    """The released weights on crops of real pictures (odd sizes, batch 1 and 3): within the bf16
    bounds of tests/bounds.py of the fp32 reference, at most one grey level after rounding."""
    from bounds import natural_batch

    model = pretrained(preset)
    engine = optimize(model, dtype=BF16, backend="native", output_dtype=F32)
    for n, h, w in [(1, 17, 23), (3, 21, 16)]:
        x = natural_batch(data_dir, n, h, w, seed=n * 1000 + h * w)
        with torch.no_grad():
            want = model(x)
        check_engine_output(engine(x), want, BF16, f"{preset} bf16 {n}×{h}×{w}")


def test_an_image_gives_the_same_bytes_alone_in_a_batch_and_on_any_number_of_threads():
    """The work is cut by the image's size alone and the sums are added in a fixed order, so the
    doors (a single CLI image, a batched service request, a Ray worker) agree bit for bit."""
    model = random_model("msfin-s-x4", 2)
    engine = optimize(model, dtype=torch.float32, backend="native")
    x = torch.rand(3, 3, 11, 13) * 255
    before = torch.get_num_threads()
    try:
        outs = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs[threads] = [engine(x) for _ in range(2)] + [torch.cat([engine(x[i:i + 1]) for i in range(3)])]
    finally:
        torch.set_num_threads(before)
    first = outs[1][0]
    for threads, runs in outs.items():
        for r in runs:
            assert torch.equal(first, r), f"{threads} threads: an output differs (batched or alone)"
    with torch.no_grad():
        want = model(x)
    check_engine_output(first, want, F32)


def test_a_recorded_forward_replays_for_new_inputs_and_records_again_on_another_thread_count():
    """From an arena's second run on, the engine replays the recorded kernel calls: the new input's
    and output's addresses must be the ones used, in poisoned arenas too, and a call with another
    thread count records again (the calls carry it)."""
    model = random_model("msfin-x4", 4)
    engine = optimize(model, dtype=torch.float32, backend="native")
    g = torch.Generator().manual_seed(9)
    xs = [torch.rand(2, 3, 7, 10, generator=g) * 255 for _ in range(3)]  # all kept alive
    with torch.no_grad():
        wants = [model(x) for x in xs]
    outs = [engine(xs[0])]
    (arena,) = engine._arenas.values()
    program = arena.program
    # one call per launch, and a materialize before each conv that reads a deferred value
    assert program is not None and program.replayable
    assert len(program.calls) == len(engine.plan.launches) + len(program.keep)
    engine.poison_buffers()
    outs.append(engine(xs[1]))  # replayed: a new input and a new output tensor
    assert arena.program is program, "the second run recorded again instead of replaying"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        outs.append(engine(xs[2]))
        assert arena.program is not program and arena.program.threads == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert len({o.data_ptr() for o in outs}) == 3
    for i, (got, want) in enumerate(zip(outs, wants)):
        check_engine_output(got, want, F32, f"run {i}")


def test_bad_operands_are_refused_with_the_reason():
    backend = native.NativeBackend()
    p = native.pack_block(random_block(24, 6, 5, 0), F32)
    t = torch.zeros(1, 4, 5, 24)
    u, sums = torch.zeros_like(t), torch.zeros(1, 24)
    with pytest.raises(ValueError, match="float32"):
        backend.rrcab_pass(Source(t.half()), p, None, None, u.half(), sums)
    with pytest.raises(ValueError, match="contiguous"):
        backend.rrcab_pass(Source(t.transpose(1, 2).contiguous().transpose(1, 2)), p, None, None, u, sums)
    with pytest.raises(ValueError, match="24 channels"):
        backend.rrcab_pass(Source(torch.zeros(1, 4, 5, 16)), p, None, None, torch.zeros(1, 4, 5, 16), torch.zeros(1, 16))
    with pytest.raises(ValueError, match="u_out: expected shape"):
        backend.rrcab_pass(Source(t), p, None, None, torch.zeros(1, 4, 6, 24), sums)
    with pytest.raises(ValueError, match="NativeCA"):
        backend.materialize(Source(t, u, sums, object()), torch.zeros_like(t))
    with pytest.raises(ValueError, match="instruction set"):
        _cpu.use_isa("sse9")


def test_without_the_extension_auto_falls_back_with_one_warning(monkeypatch):
    import msfin_fast.engine

    monkeypatch.setattr(native, "_cpu", None)
    monkeypatch.setattr(msfin_fast.engine, "_warned", set())
    model = random_model("msfin-s-x4")
    assert "not built" in native.NativeBackend().unavailable_reason(model)
    with pytest.warns(RuntimeWarning, match="running the cpu backend: the CPU kernels .* are not built"):
        engine = optimize(model, dtype=torch.float32)
    assert engine.backend == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert optimize(model, dtype=torch.float32).backend == "cpu"
    with pytest.raises(Exception, match="not built"):
        optimize(model, dtype=torch.float32, backend="native")


def test_auto_on_a_cpu_runs_the_native_kernels():
    model = random_model("msfin-x4")
    engine = optimize(model, dtype=torch.float32)
    assert engine.backend == "native"
    assert optimize(model, dtype=BF16).backend == "native"
    half = optimize(model)  # the default dtype, fp16: stored and computed in fp32, cast at the end
    assert half.backend == "native" and half.dtype == torch.float16


def test_widths_the_kernel_has_no_variant_for_are_named():
    assert native.config_problem(24, 6) is None and native.config_problem(96, 6) is None
    assert "multiple of 8" in native.config_problem(20, 5)
    assert "channels per group" in native.config_problem(96, 3)


def test_pass_traffic_benchmark_times_equal_work_at_three_widths(tmp_path):
    """benchmarks/pass_traffic.py: for each preset, passes at 4x, 2x and 1x the LR side with 1x, 2x
    and 4x the channels do the same FLOPs, each halving of the resolution halves the bytes moved,
    and bf16 addends move 0.7x the bytes of fp32; every case runs the real kernel."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "pass_traffic.py"
    spec = importlib.util.spec_from_file_location("pass_traffic", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "traffic.md"
    assert bench.main(["--lr", "4", "--rounds", "2", "--bf16", "--out", str(out)]) == 0
    names = [line.split("|")[1].strip() for line in out.read_text().splitlines() if line.startswith("| msfin")]
    assert names == [f"{p} C={c * m} at {16 // m}²{tag}" for p, c in (("msfin-s-x4", 16), ("msfin-x4", 24))
                     for tag in ("", ", bf16 addends") for m in (1, 2, 4)]
    for c0, groups, cr in bench.PRESETS.values():
        for bf16 in (False, True):
            cases = [bench.Case("", 64 // m, c0 * m, groups, cr, bf16, 1) for m in (1, 2, 4)]
            assert cases[0].flops() == cases[1].flops() == cases[2].flops() > 0
            assert cases[0].bytes() == 2 * cases[1].bytes() == 4 * cases[2].bytes()
        wide, narrow = bench.Case("", 64, c0, groups, cr, False, 1), bench.Case("", 64, c0, groups, cr, True, 1)
        assert narrow.bytes() == pytest.approx(0.7 * wide.bytes())
    # the kernel ran: x_out is the finished input t + s*u + e, with s the channel attention of the sums
    case = bench.Case("check", 16, 16, 4, 4, False, 1)
    case()
    s = torch.sigmoid(torch.relu(case.sums / 256 @ case.ca[0].t() + case.ca[1]) @ case.ca[2].t() + case.ca[3])
    torch.testing.assert_close(case.x_out, case.t + s.view(1, 1, 1, 16) * case.u + case.e, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(case.u_out).all() and case.sums_out.abs().sum() > 0
