"""The Triton engine on a GPU against the fp32 reference (``pytest -m gpu``; skipped without CUDA).

Bounds on the 0–255 scale: fp32 max |Δ| ≤ 0.05; fp16 ≤ 2 grey levels after rounding, and
Set5 / Set14 PSNR within 0.01 dB of the fp32 reference. The reference is true fp32 (conftest turns
TF32 off: with it, cuDNN's fp32 is itself ~2 grey levels off). The engine-vs-reference tests use the
released weights where they are found and seeded random weights otherwise (they compare two
implementations of one network); the PSNR tests need the weights and the images. Every arena
tensor, the fused kernel's scratch and the captured outputs are poisoned with NaN before each
checked run, so a kernel that reads a value nobody wrote during that run fails loudly.
"""

from __future__ import annotations

import pytest
import torch

import msfin_fast
from msfin_fast.evaluate import evaluate_folder

pytestmark = pytest.mark.gpu

SIZES = [(1, 17, 23), (2, 32, 32), (3, 9, 45), (8, 24, 20), (1, 61, 37)]


@pytest.fixture(scope="module", params=["msfin-x4", "msfin-s-x4"])
def reference(request, model_for):
    return model_for(request.param, "cuda")


VARIANTS = {  # dtype, CUDA graphs, one-launch RRCAB passes ("cuda": the CUDA C++ kernel), conv kernels
    "fp32": (torch.float32, False, False, True),
    "fp32-cuda": (torch.float32, False, "cuda", True),
    "fp16-cuda-graph": (torch.float16, True, "cuda", True),
    "fp32-fused": (torch.float32, False, True, True),
    "fp16": (torch.float16, False, False, True),
    "fp16-graph": (torch.float16, True, False, True),
    "fp16-fused-graph": (torch.float16, True, True, True),
    "fp16-cudnn": (torch.float16, False, False, False),
}


@pytest.mark.parametrize("n, h, w", SIZES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_matches_reference(reference, n, h, w, variant):
    dtype, graphs, fused, convs = VARIANTS[variant]
    backend = "cuda" if fused == "cuda" else "triton"
    engine = msfin_fast.optimize(reference, dtype=dtype, backend=backend, cuda_graphs=graphs,
                                 fuse_rrcab=fused is True, conv_kernels=convs)
    assert engine.backend == backend
    g = torch.Generator(device="cuda").manual_seed(n * 1000 + h * w)
    x = torch.rand(n, 3, h, w, device="cuda", generator=g) * 255
    with torch.no_grad():
        want = reference(x)
    engine(x)  # plan the arena (and capture the graph)
    engine.poison_buffers()
    got = engine(x).float()
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        assert (got - want).abs().max().item() <= 0.05
    else:
        levels = (got.round().clamp(0, 255) - want.round().clamp(0, 255)).abs().max().item()
        assert levels <= 2


@pytest.mark.parametrize("folder", ["Set5", "Set14"])
@pytest.mark.parametrize("fused", [False, True])
def test_fp16_engine_keeps_the_paper_psnr(reference, weights_dir, data_dir, folder, fused):
    engine = msfin_fast.optimize(reference, dtype=torch.float16, backend="triton", fuse_rrcab=fused)

    def upscale(model):
        def run(lr):
            x = torch.from_numpy(lr).permute(2, 0, 1)[None].float().cuda()
            with torch.no_grad():
                y = model(x).float()
            return y[0].round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
        return run

    want = evaluate_folder(upscale(reference), data_dir / folder, 4)
    got = evaluate_folder(upscale(engine), data_dir / folder, 4)
    assert abs(got.psnr - want.psnr) <= 0.01, (got.psnr, want.psnr)
