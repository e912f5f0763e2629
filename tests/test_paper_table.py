"""The released weights reproduce the paper's ×4 table (Y PSNR / SSIM, 4-pixel shave).

Targets are an independent evaluator's numbers for the released weights; tolerance 0.01 dB and
0.0005 SSIM. The paper rounds them to 32.28/0.8957, 28.57/0.7813 (MSFIN) and 32.08/0.8934,
28.46/0.7782 (MSFIN-S).
"""

import pytest
import torch

from msfin_fast import Upscaler
from msfin_fast.evaluate import evaluate_folder

TARGETS = {
    ("msfin-x4", "Set5"): (32.2849, 0.8956),
    ("msfin-x4", "Set14"): (28.5489, 0.7811),
    ("msfin-s-x4", "Set5"): (32.0673, 0.8932),
    ("msfin-s-x4", "Set14"): (28.4326, 0.7778),
}


def _case(model, data_set):
    marks = [pytest.mark.slow] if data_set == "Set14" else []
    return pytest.param(model, data_set, marks=marks, id=f"{model}-{data_set}")


@pytest.mark.parametrize("model, data_set", [_case(*key) for key in TARGETS])
def test_released_weights_reproduce_the_table(pretrained, data_dir, model, data_set):
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    upscaler = Upscaler(pretrained(model), device="cpu")
    result = evaluate_folder(upscaler.upscale_rgb, data_dir / data_set, 4)
    psnr, ssim = TARGETS[(model, data_set)]
    assert len(result.images) == (5 if data_set == "Set5" else 14)
    assert result.psnr == pytest.approx(psnr, abs=0.01), f"{model} {data_set} PSNR {result.psnr:.4f}"
    assert result.ssim == pytest.approx(ssim, abs=0.0005), f"{model} {data_set} SSIM {result.ssim:.4f}"
