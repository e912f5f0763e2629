"""The engine (plan, packing, arena, fall-back) against the reference model, on the CPU.

``emulate`` runs the engine's exact plan with each kernel computed by PyTorch ops, so the plan's
deferred values, folded sums, materialisations and arena reuse are checked at full speed; one
slow test runs the real Triton kernels end to end in Triton's interpreter.
Tolerances on the 0–255 scale (tests/bounds.py): fp32 max |Δ| ≤ 1e-3 (measured ≤ 9.2e-5 here; an
engine that stores its passes in fp16 is 0.07 off); fp16, for the released weights, max |Δ| ≤ 1.0,
at most 1 grey level after rounding and ≤ 8% of the values changed. Random models have trained-
looking MeanShifts (not identities), so a fold that drops their matrix fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from bounds import ENGINE_FP32_CPU, check_engine_output
from helpers import random_model, require_module

import msfin_fast
from msfin_fast import MSFIN, optimize
from msfin_fast.engine import plan as P
from msfin_fast.errors import ConfigError, DeviceError, InvalidInputError



def lr_batch(n: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 255


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
@pytest.mark.parametrize("n, h, w", [(1, 5, 7), (3, 6, 3)])
def test_emulated_plan_matches_reference_fp32(preset, n, h, w):
    model = random_model(preset)
    engine = optimize(model, dtype=torch.float32, backend="emulate")
    x = lr_batch(n, h, w)
    with torch.no_grad():
        want = model(x)
    got = engine(x)
    assert got.shape == want.shape == (n, 3, 4 * h, 4 * w)
    check_engine_output(got, want, torch.float32)


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_released_weights_through_the_plan(pretrained, data_dir, preset):
    """Real weights (trained MeanShift, large activations) on a crop of a real picture."""
    from msfin_fast.images import read_image

    model = pretrained(preset)
    rgb = read_image(data_dir / "Set5" / "baby.png").rgb[100:116, 120:140]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    x = torch.cat([x, x.flip(-1)])  # batch 2, different content per sample
    with torch.no_grad():
        want = model(x)
    check_engine_output(optimize(model, dtype=torch.float32, backend="emulate")(x), want, torch.float32, "fp32")
    check_engine_output(optimize(model, dtype=torch.float16, backend="emulate")(x), want, torch.float16, "fp16")


def test_fused_plan_has_no_conv1_buffers_and_matches():
    model = random_model("msfin-x4")
    fused = optimize(model, dtype=torch.float32, backend="emulate", fuse_rrcab=True)
    two = optimize(model, dtype=torch.float32, backend="emulate")
    passes = [launch for launch in fused.plan.launches if isinstance(launch, P.RRCABPass)]
    assert [launch.fused for launch in passes].count(True) == 2 * (9 + 5)  # the 24-channel blocks
    assert fused.arena_bytes(1, 16, 16) < two.arena_bytes(1, 16, 16)
    x = lr_batch(1, 4, 7)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max().item() <= ENGINE_FP32_CPU


def test_layers_through_pytorch_instead_of_conv_kernels():
    model = random_model("msfin-x4")
    engine = optimize(model, dtype=torch.float32, backend="emulate", conv_kernels=False)
    counts = engine.plan.counts()
    assert "Conv" not in counts and counts["Layer"] == 15
    # A4, A4b, A8, A8b, B5 and B1..B3 (B1..B4 feed the next block together with an addend).
    assert counts["Materialize"] == 8
    x = lr_batch(2, 5, 3)
    with torch.no_grad():
        assert (engine(x) - model(x)).abs().max().item() <= ENGINE_FP32_CPU


def test_plan_folds_channel_attention_and_sums():
    plan = P.build_plan(random_model("msfin-x4"))
    counts = plan.counts()
    assert counts["RRCABPass"] == 24 * 2  # 24 blocks, each applied twice
    assert counts["Head"] == counts["Tail"] == 1
    assert counts["Conv"] == 19 and "Layer" not in counts  # 15 layers, the downs are 2 convs each
    # A value is materialised only when no RRCAB pass writes it as its residual base and no single-
    # input conv finishes it while loading: A4 and A8, which also feed a concatenation.
    assert counts["Materialize"] == 2
    deferred_convs = [launch.module for launch in plan.launches if isinstance(launch, P.Conv) and launch.src]
    assert sorted(deferred_convs) == sorted(["ds4_up4.0", "ds4_up5.0", "ds2_up.up.0", "Ft01", "Ft02", "Ft03"])
    passes = [launch for launch in plan.launches if isinstance(launch, P.RRCABPass)]
    # Every `+` node is folded into the prologue of the pass that reads it.
    with_addends = [launch.block for launch in passes if launch.src.e1 is not None]
    assert with_addends == ["ds2_rcab", "ds2_rcab2", "ds2_rcab3", "ds2_rcab4", "ds0_body", "ds0_body2",
                            "ds0_body3", "ds0_body4", "block_re1"]
    block_re1 = next(launch for launch in passes if launch.block == "block_re1")
    assert block_re1.src.u is not None and block_re1.src.e2 is not None  # C5 + CA, + L2, + L3


def test_arena_reuses_buffers_and_every_read_is_written_first():
    model = random_model("msfin-s-x4")
    engine = optimize(model, dtype=torch.float32, backend="emulate")
    x = lr_batch(2, 4, 6)
    first = engine(x)
    executor = engine.executor
    kernel_bufs = {b.id for launch in executor.plan.launches for b in launch.writes() if b.kernel}
    assert len(executor.assignment.slots) < len(kernel_bufs) / 2
    (arena,) = engine._arenas.values()
    for t in arena.tensors:
        t.fill_(float("nan"))
    assert torch.equal(engine(x), first)
    assert engine.arena_bytes(2, 4, 6) == arena.nbytes
    assert engine.arena_bytes(2, 8, 12) == 4 * arena.nbytes - 3 * arena.sums_flat.numel() * 4


def test_upsampling_runs_late_and_the_arena_stays_near_the_live_peak():
    """L3 and L2 (full resolution) are made just before the reconstruction reads them, and slots
    are shared across shapes: MSFIN's arena is ~10 full-resolution maps, not the 15 of shape-keyed slots."""
    engine = optimize(random_model("msfin-x4"), dtype=torch.float16, backend="emulate")
    order = [getattr(launch, "module", None) or getattr(launch, "block", None) for launch in engine.plan.launches]
    first_re = order.index("block_re1")
    assert order.index("ds4_up5.0") > order.index("ds0_body5") and order.index("ds4_up5.0") < first_re
    assert order.index("ds2_up.up.0") > order.index("ds0_body5") and order.index("ds2_up.up.0") < first_re
    maps = float(sum(engine.executor.assignment.slots)) / 24
    assert maps <= 10.5, maps
    # 1080p output, fp16: the planned arena is under the 1.5 GB peak budget.
    assert engine.arena_bytes(1, 270, 480) < 1.0 * 2**30


def test_arenas_are_kept_for_the_most_recent_shapes_only():
    """A service that sees many sizes must not keep an arena per size for ever."""
    model = random_model("msfin-s-x4")
    engine = optimize(model, dtype=torch.float32, backend="emulate", max_arenas=2)
    shapes = [(1, 4, 5), (1, 5, 4), (2, 4, 5), (1, 4, 5)]
    for n, h, w in shapes:
        x = lr_batch(n, h, w)
        with torch.no_grad():
            assert (engine(x) - model(x)).abs().max().item() <= ENGINE_FP32_CPU
    assert list(engine._arenas.entries) == [(2, 3, 4, 5), (1, 3, 4, 5)]  # (1, 3, 5, 4) was evicted
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="max_arenas"):
            optimize(model, backend="emulate", max_arenas=bad)
    with pytest.raises(ConfigError, match="max_graphs"):
        optimize(model, backend="emulate", max_graphs=0)


@pytest.mark.parametrize("backend", ["emulate", "cpu"])
@pytest.mark.parametrize("first, then", [(torch.inference_mode, torch.no_grad),
                                         (torch.no_grad, torch.inference_mode)])
def test_an_engine_serves_calls_in_and_out_of_inference_mode(backend, first, then):
    """Upscaler and serving call under inference_mode, other code under no_grad: an arena (or packed
    weights) made in the first mode is reused in the second, in place, for the same shape."""
    model = random_model("msfin-s-x4")
    x = lr_batch(2, 4, 5)
    with torch.no_grad():
        want = model(x)
    with first():
        engine = optimize(model, dtype=torch.float32, backend=backend)
    outputs = []
    for mode in (first, then, first, then):
        with mode():
            outputs.append(engine(x).clone())
    for got in outputs:
        assert (got - want).abs().max().item() <= ENGINE_FP32_CPU
    if engine.has_arena:
        (arena,) = engine._arenas.values()
        assert not any(t.is_inference() for t in [*arena.tensors, arena.sums_flat])


def test_a_captured_graph_replays_in_and_out_of_inference_mode():
    """The graph's static inputs outlive the call that captured it; the CPU stand-in below captures
    by running ``fn`` and replays by running it again (the copy into the inputs is the real code)."""
    from helpers import EagerGraph

    with torch.inference_mode():
        graph = EagerGraph(lambda x: x * 2, (torch.ones(3),))
    with torch.no_grad():
        assert torch.equal(graph.replay(torch.full((3,), 4.0)), torch.full((3,), 8.0))
    assert not graph.inputs[0].is_inference()


def test_poisoning_reaches_every_buffer_and_the_plan_rewrites_them():
    engine = optimize(random_model("msfin-x4"), dtype=torch.float32, backend="emulate", fuse_rrcab=True)
    x = lr_batch(1, 4, 6)
    first = engine(x)
    engine.poison_buffers()
    (arena,) = engine._arenas.values()
    assert all(torch.isnan(t).all() for t in arena.tensors)
    assert torch.equal(engine(x), first)


def test_engine_repacks_when_the_source_model_changes():
    model = random_model("msfin-s-x4", seed=0)
    engine = optimize(model, dtype=torch.float32, backend="emulate")
    x = lr_batch(1, 4, 5)
    before = engine(x)
    model.load_state_dict(random_model("msfin-s-x4", seed=7).state_dict())
    after = engine(x)
    with torch.no_grad():
        want = model(x)
    assert not torch.allclose(before, after)
    assert (after - want).abs().max().item() <= ENGINE_FP32_CPU


@pytest.mark.parametrize("change", ["parameter", "module", "assign"])
def test_engine_repacks_when_a_parameter_or_module_is_replaced(change):
    """Replacing a parameter or a submodule object (not updating it in place) is seen too."""
    model = random_model("msfin-s-x4", seed=0)
    engine = optimize(model, dtype=torch.float32, backend="emulate")
    x = lr_batch(1, 4, 5)
    before = engine(x)
    other = random_model("msfin-s-x4", seed=7)
    if change == "parameter":
        model.tail2.weight = torch.nn.Parameter(other.tail2.weight.detach().clone())
    elif change == "module":
        model.tail2 = other.tail2
    else:
        model.load_state_dict(other.state_dict(), assign=True)
    after = engine(x)
    with torch.no_grad():
        want = model(x)
    assert not torch.allclose(before, after)
    assert (after - want).abs().max().item() <= ENGINE_FP32_CPU


@pytest.mark.slow
@pytest.mark.parametrize("fuse_rrcab", [False, True])
def test_triton_kernels_end_to_end(fuse_rrcab):
    """The real kernels (Triton interpreter on the CPU), MSFIN-S, batch 2, odd size."""
    require_module("triton")
    model = random_model("msfin-s-x4")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    engine = optimize(model, dtype=torch.float32, backend="triton", fuse_rrcab=fuse_rrcab)
    assert engine.backend == "triton"
    assert sum(launch.fused for launch in engine.plan.launches if isinstance(launch, P.RRCABPass)) == (
        19 if fuse_rrcab else 0)  # MSFIN-S passes of 16 and 32 channels
    x = lr_batch(2, 3, 5).to(device)
    with torch.no_grad():
        want = model(x)
    # Over NaN-poisoned buffers: nothing may be read that this call did not write, the fused
    # kernel's per-program scratch included.
    arena = engine._arena(x)
    engine.poison_buffers()
    assert (arena.scratch is not None) == fuse_rrcab
    if fuse_rrcab:
        assert torch.isnan(arena.scratch).all()
    assert (engine(x) - want).abs().max().item() <= ENGINE_FP32_CPU


def test_auto_on_a_cpu_runs_the_native_kernels_else_the_cpu_backend():
    """On a CPU ``auto`` runs the native C++ kernels where they are built, else the cpu backend (not
    the Triton interpreter, even where it is on); either matches the fp32 reference within 0.05 at
    odd sizes, batch > 1, both presets."""
    from msfin_fast.engine.backends import native

    first = "native" if native.available() else "cpu"
    for preset in ("msfin-x4", "msfin-s-x4"):
        model = random_model(preset)
        with warnings.catch_warnings():
            warnings.simplefilter("error" if first == "native" else "ignore")
            engine = optimize(model, dtype=torch.float32)
        assert engine.backend == first and engine.fallback_reason is None
        x = lr_batch(2, 5, 7)
        with torch.no_grad():
            want = model(x)
        assert (engine(x) - want).abs().max().item() <= 0.05
        # In fp16 it still computes in fp32: the output is fp32's, rounded once to fp16.
        half = optimize(model, dtype=torch.float16)
        assert half.backend == first and half(x).dtype == torch.float16
        assert torch.equal(half(x), engine(x).half())


def _kernel_candidates_only(monkeypatch):
    """Make ``auto`` choose among the GPU's kernel candidates on this CPU (as on a GPU machine
    where they cannot run), so the fall-back to the reference is exercised."""
    from msfin_fast.engine import backends

    monkeypatch.setattr(backends, "candidates", lambda device: {"triton": dict(name="triton"),
                                                                "cuda": dict(name="cuda")})


def test_auto_falls_back_to_the_reference_and_says_so_once(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(msfin_fast.engine, "_warned", set())
    _kernel_candidates_only(monkeypatch)
    model = random_model("msfin-s-x4")
    with pytest.warns(RuntimeWarning, match="reference instead of the kernels"):
        engine = optimize(model, dtype=torch.float32)
    assert engine.backend == "reference" and "CUDA" in engine.fallback_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = optimize(model, dtype=torch.float32)
    x = lr_batch(1, 3, 4)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(DeviceError, match="need a CUDA device"):
        optimize(model, backend="triton")
    with pytest.raises(DeviceError, match="backend='cuda' cannot run"):
        optimize(model, backend="cuda")
    with pytest.raises(DeviceError, match="backend='cpu' cannot run"):
        optimize(model.to("meta"), backend="cpu")


def test_models_the_kernels_do_not_cover_run_the_reference(monkeypatch):
    model = MSFIN(msfin_fast.get_config("msfin-s-x4").replace(scale=3)).eval()
    x = lr_batch(1, 3, 5)
    _kernel_candidates_only(monkeypatch)
    monkeypatch.setattr(msfin_fast.engine, "_warned", set())
    with pytest.warns(RuntimeWarning, match="×4"):
        engine = optimize(model, dtype=torch.float32)
    assert engine.backend == "reference"
    with torch.no_grad():
        assert torch.equal(engine(x), model(x))
    with pytest.raises(DeviceError, match="×4"):
        optimize(model, backend="emulate")
    monkeypatch.undo()
    cpu = optimize(model, dtype=torch.float32)  # the cpu backend runs any MSFIN
    assert cpu.backend == "cpu"
    with torch.no_grad():
        assert (cpu(x) - model(x)).abs().max().item() <= 0.05


def test_engine_rejects_bad_input_and_arguments():
    model = random_model("msfin-s-x4")
    engine = optimize(model, dtype=torch.float32, backend="emulate")
    with pytest.raises(InvalidInputError, match="3 RGB channels"):
        engine(torch.rand(1, 4, 5, 5))
    with pytest.raises(InvalidInputError, match="NaN"):
        engine(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ConfigError, match="dtype"):
        optimize(model, dtype=torch.int8)
    with pytest.raises(ConfigError, match="output_dtype"):
        optimize(model, dtype=torch.float32, output_dtype=torch.float64)
    with pytest.raises(DeviceError, match="computes in float32, float16, not bfloat16"):
        optimize(model, dtype=torch.bfloat16, backend="triton")
    with pytest.raises(ConfigError, match="backend"):
        optimize(model, backend="vulkan")
    with pytest.raises(ConfigError, match="MSFIN"):
        optimize(torch.nn.Conv2d(3, 3, 1))


def test_load_pretrained_loads_weights_and_optimize_builds_the_engine(weights_dir, monkeypatch):
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(weights_dir))
    reference = msfin_fast.load_pretrained("msfin-s-x4")
    assert type(reference) is MSFIN
    with pytest.raises(TypeError, match="backend"):
        msfin_fast.load_pretrained("msfin-s-x4", backend="emulate")  # weights only: engines are optimize's
    engine = optimize(reference, dtype=torch.float32, backend="emulate")
    assert isinstance(engine, msfin_fast.Engine) and engine.backend == "emulate"
    x = lr_batch(1, 4, 4)
    with torch.no_grad():
        assert (engine(x) - reference(x)).abs().max().item() <= ENGINE_FP32_CPU


def test_inputs_beyond_32_bit_indexing_are_refused_before_any_work():
    engine = optimize(random_model("msfin-s-x4"), dtype=torch.float32, backend="emulate")
    huge = torch.zeros(1, 3, 1, 1).expand(64, 3, 1024, 1024)  # no memory behind it
    with pytest.raises(InvalidInputError, match="32-bit indexing"):
        engine(huge)


class _ContractOfTheCudaKernel:
    """Stands in for cuda_backend on a CPU: the pass contract computed from the CUDA-packed weights,
    so the engine's wiring of backend='cuda' (packing, CA of the producer, x_out, sums) is checked."""

    def __init__(self):
        self.calls = 0

    def rrcab_pass(self, packed, t, *, u=None, sums_in=None, ca=None, e1=None, e2=None, x_out=None, u_out, sums_out):
        import torch.nn.functional as F

        self.calls += 1
        c, g = packed.channels, packed.groups
        n, h, w, _ = t.shape

        def grouped(weight):  # [G, ci, dy, dx, co] → [C, C/G, 3, 3]
            return weight.permute(0, 4, 1, 2, 3).reshape(c, c // g, 3, 3)

        x = t.float()
        if u is not None:
            z = torch.relu(sums_in / (h * w) @ ca.w1.t() + ca.b1)
            x = x + torch.sigmoid(z @ ca.w2.t() + ca.b2)[:, None, None, :] * u.float()
        for e in (e1, e2):
            if e is not None:
                x = x + e.float()
        x = x.to(t.dtype)
        if x_out is not None:
            x_out.copy_(x)
        a = torch.relu(F.conv2d(x.permute(0, 3, 1, 2).float(), grouped(packed.w1), packed.b1, padding=1, groups=g))
        hh = torch.relu(F.conv2d(a, grouped(packed.w2), packed.b2, padding=1, groups=g))
        out = F.conv2d(hh, packed.w3t.t()[:, :, None, None], packed.b3).permute(0, 2, 3, 1)
        u_out.copy_(out)
        sums_out += out.sum(dim=(1, 2))


def test_cuda_backend_wiring_against_the_reference(monkeypatch):
    from msfin_fast.engine import cuda_ext
    from msfin_fast.engine.backends import cuda, emulate, triton

    model = random_model("msfin-x4")

    monkeypatch.setattr(triton, "device_problem", lambda device: None)
    monkeypatch.setattr(cuda.CudaBackend, "unavailable_reason", lambda self, model: None)
    monkeypatch.setattr(cuda_ext, "supported_configs", lambda: sorted(cuda.configs_of(model)))
    monkeypatch.setattr(cuda_ext, "_C", object())  # packing needs the extension to be there
    fake = _ContractOfTheCudaKernel()
    monkeypatch.setattr(cuda_ext, "rrcab_pass", fake.rrcab_pass)
    engine = optimize(model, dtype=torch.float32, backend="cuda")
    assert engine.backend == "cuda"
    assert all(launch.fused for launch in engine.plan.launches if isinstance(launch, P.RRCABPass))
    emulated = emulate.EmulateBackend()
    for name in ("head", "tail", "conv", "materialize"):  # the Triton launches, emulated for speed
        setattr(engine.backend_object, name, getattr(emulated, name))
    # The emulated launches read their own packed weights, and a deferred value's CA from its
    # producer's: the CUDA-packed blocks get the emulation's CA beside the kernel's weights.
    own = emulate.EmulateBackend().pack(model, engine.plan, torch.float32)
    for key, packed in engine.executor.packed.items():
        if isinstance(packed, cuda.CudaPacked):
            engine.executor.packed[key] = _WithEmulatedCA(packed, own[key].ca)
        else:
            engine.executor.packed[key] = own[key]
    x = lr_batch(2, 4, 5)
    with torch.no_grad():
        want = model(x)
    assert (engine(x) - want).abs().max().item() <= ENGINE_FP32_CPU
    assert fake.calls == 48


class _WithEmulatedCA:
    def __init__(self, packed, ca):
        self.kernel, self.ca = packed.kernel, ca
