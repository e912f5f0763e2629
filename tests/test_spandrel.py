"""spandrel (chaiNNer's loader): both released files load through ``ModelLoader().load_from_file``
once MSFIN is installed in its registry, and the descriptor's output is the reference's."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import require_module


def _import_spandrel():
    """spandrel imports torchvision. On a CPU-only torch, the PyPI torchvision (built against CUDA
    torch) cannot load its C operators, and its import then stops at the fake-tensor registration of
    two of them (nms, qnms), although the pure-Python parts spandrel uses work. Declaring those two
    schemas lets the import finish; a torchvision that matches torch needs none of this."""
    try:
        return require_module("spandrel")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "spandrel")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_spandrel.keep = lib  # the schemas live as long as the Library object
    return require_module("spandrel")


spandrel = _import_spandrel()

from msfin_fast.spandrel_arch import ARCH_ID, install  # noqa: E402
from msfin_fast.weights import REGISTRY  # noqa: E402


@pytest.fixture(scope="module")
def loader():
    install()
    assert not install()  # a second install is a no-op
    return spandrel.ModelLoader()


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_released_file_loads_and_matches_the_reference(loader, weights_dir, pretrained, preset):
    descriptor = loader.load_from_file(weights_dir / REGISTRY[preset].filename)
    config = pretrained(preset).config
    assert isinstance(descriptor, spandrel.ImageModelDescriptor)
    assert descriptor.architecture.id == ARCH_ID and descriptor.purpose == "SR"
    assert descriptor.model.config == config  # groups and recurrence inferred from the weights
    assert descriptor.scale == 4 and descriptor.input_channels == descriptor.output_channels == 3
    assert descriptor.supports_half and descriptor.supports_bfloat16
    assert descriptor.size_requirements.check(1, 1) and descriptor.size_requirements.check(17, 9)
    assert descriptor.tiling == spandrel.ModelTiling.SUPPORTED
    assert f"{config.n_feats}nf" in descriptor.tags

    x = torch.rand(1, 3, 15, 22, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pretrained(preset)(x * 255).clamp(0, 255) / 255
    out = descriptor(x)  # 0–1 in, 0–1 out (spandrel clamps)
    assert out.shape == (1, 3, 60, 88)
    assert torch.equal(out, ref), f"max |Δ| {float((out - ref).abs().max()):.2e}"


def test_other_architectures_are_not_taken(loader, pretrained):
    state = dict(pretrained("msfin-s-x4").state_dict())
    state.pop("tail2.bias")
    with pytest.raises(spandrel.UnsupportedModelError):
        loader.load_from_state_dict(state)
    state = {"conv_first.weight": torch.zeros(64, 3, 3, 3), "conv_first.bias": torch.zeros(64)}
    with pytest.raises(spandrel.UnsupportedModelError):
        loader.load_from_state_dict(state)


def test_half_precision_descriptor(loader, weights_dir, pretrained):
    descriptor = loader.load_from_file(weights_dir / REGISTRY["msfin-s-x4"].filename).to(torch.bfloat16)
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    out = descriptor(x.to(torch.bfloat16)).float()
    with torch.no_grad():
        ref = pretrained("msfin-s-x4")(x * 255).clamp(0, 255) / 255
    # bf16 keeps 8 bits of mantissa: a few grey levels on 0–255 at most.
    assert float((out - ref).abs().max()) * 255 < 8
