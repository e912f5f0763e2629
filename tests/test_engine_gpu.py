"""The Triton engine on a GPU against the fp32 reference (``pytest -m gpu``; skipped without CUDA).

Bounds on the 0–255 scale (tests/bounds.py, the CPU tests' own, except fp32's): fp32 max |Δ| ≤ 5e-3
(tf32x3 dots; 1e-3 on the CPU); fp16 max |Δ| ≤ 1.0, at most 1 grey level after rounding, ≤ 8% of the
values changed; and for every variant, Set5 PSNR within 0.01 dB of the fp32 reference (Set14 too
for the fp16 Triton variants). The reference is true fp32 (conftest turns TF32 off: with it, cuDNN's
fp32 is itself ~2 grey levels off). Inputs are crops of the Set14 pictures (uniform noise is no
picture: fp16 is up to 1.2 off there). The engine-vs-reference tests use the
released weights where they are found and seeded random weights otherwise (they compare two
implementations of one network); the PSNR tests need the weights and the images. Every arena
tensor, the fused kernel's scratch and the captured outputs are poisoned with NaN before each
checked run, so a kernel that reads a value nobody wrote during that run fails loudly.
"""

from __future__ import annotations

import pytest
import torch
from bounds import check_engine_output, natural_batch

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
def test_engine_matches_reference(reference, data_dir, n, h, w, variant):
    dtype, graphs, fused, convs = VARIANTS[variant]
    backend = "cuda" if fused == "cuda" else "triton"
    engine = msfin_fast.optimize(reference, dtype=dtype, backend=backend, cuda_graphs=graphs,
                                 fuse_rrcab=fused is True, conv_kernels=convs)
    assert engine.backend == backend
    x = natural_batch(data_dir, n, h, w, seed=n * 1000 + h * w).cuda()
    with torch.no_grad():
        want = reference(x)
    engine(x)  # plan the arena (and capture the graph)
    engine.poison_buffers()
    check_engine_output(engine(x), want, dtype, f"{variant} {n}x{h}x{w}")


_REFERENCE_PSNR: dict = {}


def upscaler(model):
    def run(lr):
        x = torch.from_numpy(lr).permute(2, 0, 1)[None].float().cuda()
        with torch.no_grad():
            y = model(x).float()
        return y[0].round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    return run


PSNR_CASES = [(variant, "Set5") for variant in VARIANTS] + [("fp16", "Set14"), ("fp16-fused-graph", "Set14")]


@pytest.mark.parametrize("variant, folder", PSNR_CASES)
def test_engine_keeps_the_paper_psnr(reference, weights_dir, data_dir, variant, folder):
    """Every variant on Set5, and the fp16 Triton ones on Set14: within 0.01 dB of the fp32 reference."""
    dtype, graphs, fused, convs = VARIANTS[variant]
    engine = msfin_fast.optimize(reference, dtype=dtype, backend="cuda" if fused == "cuda" else "triton",
                                 cuda_graphs=graphs, fuse_rrcab=fused is True, conv_kernels=convs)
    key = (id(reference), folder)
    if key not in _REFERENCE_PSNR:
        _REFERENCE_PSNR[key] = evaluate_folder(upscaler(reference), data_dir / folder, 4).psnr
    got = evaluate_folder(upscaler(engine), data_dir / folder, 4)
    assert abs(got.psnr - _REFERENCE_PSNR[key]) <= 0.01, (got.psnr, _REFERENCE_PSNR[key])
