"""The Upscaler API keeps the kind of its input and refuses what it cannot take."""

import numpy as np
import pytest
import torch
from PIL import Image

from msfin_fast import DeviceError, InvalidInputError, NonFiniteOutputError, Upscaler
from msfin_fast.devices import resolve_device, resolve_dtype

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def upscaler(pretrained):
    return Upscaler(pretrained("msfin-s-x4"), device="cpu")


def test_array_matches_the_reference_model(upscaler, pretrained):
    """backend='reference' gives the reference model's rounding exactly; the default (on a CPU the
    native kernels, within 1e-3 before rounding) at most one grey level apart, on a few values."""
    rgb = RNG.integers(0, 256, (11, 7, 3), dtype=np.uint8)
    out = Upscaler(pretrained("msfin-s-x4"), device="cpu", backend="reference").upscale(rgb)
    assert out.shape == (44, 28, 3) and out.dtype == np.uint8
    with torch.no_grad():
        ref = pretrained("msfin-s-x4")(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())
    expected = ref[0].clamp(0, 255).round().permute(1, 2, 0).to(torch.uint8).numpy()
    assert np.array_equal(out, expected)
    default = upscaler.upscale(rgb).astype(int)
    assert np.abs(default - expected).max() <= 1 and (default != expected).mean() < 0.01


def test_pil_in_pil_out_keeps_mode(upscaler):
    rgb = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert upscaler.upscale(Image.fromarray(rgb)).size == (20, 24)
    grey = upscaler.upscale(Image.fromarray(rgb[..., 0], "L"))
    assert grey.mode == "L" and grey.size == (20, 24)
    rgba = Image.fromarray(np.dstack([rgb, np.full((6, 5), 200, np.uint8)]), "RGBA")
    out = upscaler.upscale(rgba)
    assert out.mode == "RGBA" and np.all(np.asarray(out)[..., 3] == 200)


def test_grey_arrays_stay_grey_and_keep_their_rank(upscaler):
    grey = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    assert upscaler.upscale(grey).shape == (24, 20)
    assert upscaler.upscale(grey[..., None]).shape == (24, 20, 1)


def test_grey_with_alpha_array(upscaler):
    la = np.dstack([RNG.integers(0, 256, (5, 6), dtype=np.uint8), np.full((5, 6), 9, np.uint8)])
    out = upscaler.upscale(la)
    assert out.shape == (20, 24, 2) and np.all(out[..., 1] == 9)


def test_alpha_is_upscaled_beside_the_colour(upscaler):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, 4:, 3] = 255
    out = upscaler.upscale(rgba)
    assert out.shape == (32, 32, 4)
    assert np.all(out[:, :12, 3] == 0) and np.all(out[:, 20:, 3] == 255)


def test_tensor_in_tensor_out(upscaler):
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64) * 255  # cast to the model dtype
    y = upscaler.upscale(x)
    assert y.shape == (2, 3, 20, 24) and y.dtype == torch.float32


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 5), np.uint8), "H×W×4"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((2, 4, 4, 3), np.uint8), "H×W×3"),
        (torch.zeros(1, 3, 4, 4).fill_(float("nan")), "NaN"),
        (torch.zeros(1, 1, 4, 4), "3 RGB channels"),
        ("photo.png", "cannot upscale a str"),
    ],
)
def test_bad_images(upscaler, image, message):
    with pytest.raises(InvalidInputError, match=message):
        upscaler.upscale(image)


def test_devices_and_precisions():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("fp16") == torch.float16 and resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu:0")
    with pytest.raises(DeviceError, match="unknown precision"):
        resolve_dtype("int8")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_by_name_with_weights_dir(weights_dir):
    up = Upscaler("msfin-x4", device="cpu")
    assert up.scale == 4 and up.name == "msfin-x4"
    assert up.upscale(np.zeros((3, 3, 3), np.uint8)).shape == (12, 12, 3)


def test_upscaler_backend_builds_the_engine_and_falls_back_where_kernels_cannot_run(pretrained, monkeypatch):
    import warnings

    import msfin_fast.engine
    from msfin_fast.engine import backends
    from msfin_fast.errors import InvalidInputError
    from msfin_fast.upscaler import Upscaler

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(msfin_fast.engine, "_warned", set())
    reference = pretrained("msfin-s-x4")
    rgb = (np.arange(7 * 9 * 3) % 251).astype(np.uint8).reshape(7, 9, 3)
    from msfin_fast.engine.backends import native

    want = Upscaler(reference, device="cpu", backend="reference").upscale(rgb)
    default = Upscaler(reference, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        up = Upscaler(reference, device="cpu", backend="auto")  # on a CPU: the native kernels, no warning
    first = "native" if native.available() else "cpu"
    assert up.backend == default.backend == first and isinstance(up.model, msfin_fast.engine.Engine)
    assert np.array_equal(up.upscale(rgb), default.upscale(rgb))  # the default is auto
    assert np.abs(up.upscale(rgb).astype(int) - want).max() <= 1  # within a grey level of the reference
    # Where only kernel candidates exist and none can run, auto falls back to the reference.
    monkeypatch.setattr(backends, "candidates", lambda device: {"triton": dict(name="triton")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        up = Upscaler(reference, device="cpu", backend="auto")
    assert up.backend == "reference" and any("reference instead of the kernels" in str(w.message) for w in caught)
    assert np.array_equal(up.upscale(rgb), want)
    with pytest.raises(InvalidInputError, match="backend='reference'"):
        Upscaler(reference, device="cpu", backend="auto", tile=8, tile_mode="exact")


def test_engine_auto_tiles_from_its_arena_plan(monkeypatch):
    """An engine that would not fit runs tiles sized from its own arena estimate."""
    import msfin_fast.run as up_mod
    from msfin_fast import MSFIN, optimize

    torch.manual_seed(0)
    model = MSFIN("msfin-s-x4").eval()
    engine = optimize(model, dtype=torch.float32, backend="emulate")
    x = torch.rand(1, 3, 20, 24) * 255
    whole = engine.arena_bytes(1, 20, 24)
    monkeypatch.setattr(up_mod, "available_memory", lambda device: int(whole * up_mod.ENGINE_HEADROOM / 2))
    with pytest.warns(UserWarning, match="arena"):
        y = up_mod.run_forward(engine, x, up_mod.RunOptions(tile_pad=2))
    assert y.shape == (1, 3, 80, 96) and torch.isfinite(y).all()
    monkeypatch.setattr(up_mod, "available_memory", lambda device: int(whole * up_mod.ENGINE_HEADROOM * 2))
    with torch.no_grad():
        assert torch.equal(up_mod.run_forward(engine, x, up_mod.RunOptions()), engine(x))


@pytest.mark.parametrize("x, message", [
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating-point tensor"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int32), "floating-point tensor"),
    (torch.zeros(3, 8, 8), r"4-D tensor \[N, 3, h, w\], got shape \(3, 8, 8\); add a batch dimension"),
    (torch.zeros(8, 8), "4-D tensor"),
    (torch.zeros(1, 3, 0, 8), "empty input"),
])
def test_bad_tensors_are_named_before_any_work(upscaler, monkeypatch, x, message):
    """The memory estimate used to run first, so an integer tensor gave a raw TypeError and a 3-D
    one an unpacking error."""
    import msfin_fast.run as module

    monkeypatch.setattr(module, "available_memory", lambda device: pytest.fail("estimated memory first"))
    with pytest.raises(InvalidInputError, match=message):
        upscaler.upscale(x)


@pytest.mark.parametrize("value", [3e38, -3e38])
def test_inputs_that_overflow_raise_instead_of_returning_nan(upscaler, value):
    x = torch.full((1, 3, 6, 6), 100.0)
    x[0, 1, 2, 3] = value
    with pytest.raises(NonFiniteOutputError, match=r"NaN/Inf .*values run from .* the model takes pixels in 0–255"):
        upscaler.upscale(x)


def test_fp16_overflow_is_an_error_not_a_black_image(pretrained):
    """A model whose activations overflow fp16 (here: one weight scaled up) gives an error naming
    the cause; the float32 run of the same model is finite."""
    import copy

    model = copy.deepcopy(pretrained("msfin-s-x4"))
    with torch.no_grad():
        model.tail2.weight.mul_(3e3)
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Upscaler(model, device="cpu").upscale(image)
    with pytest.warns(UserWarning, match="float16 on the CPU is slow"):
        half = Upscaler(model, device="cpu", dtype="fp16", backend="reference")
    with pytest.raises(NonFiniteOutputError, match="overflowed in reduced precision; run this image in fp32"):
        half.upscale(image)
