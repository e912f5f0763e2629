"""Self-ensemble ×8: batching the variants is exact, the maps back are right, and MSFIN-S+ scores
the paper's Set5 number."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msfin_fast import Upscaler
from msfin_fast.cli import main
from msfin_fast.ensemble import self_ensemble, variants
from msfin_fast.evaluate import evaluate_folder
from msfin_fast.model import MSFIN

BATCH_TOL = 1e-3  # fp32 on the CPU: a batch of 8 may pick other conv blockings than a batch of 1


class Spy(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x):
        self.batches.append(tuple(x.shape))
        return self.model(x)


def _one_by_one(model, x):
    """The ensemble written out: each variant alone, mapped back, averaged."""
    outs = []
    for flip, transpose in variants():
        v = x.flip(flip) if flip else x
        v = v.transpose(-2, -1) if transpose else v
        y = model(v)
        y = y.transpose(-2, -1) if transpose else y
        outs.append(y.flip(flip) if flip else y)
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("shape, batches", [((2, 3, 9, 9), [(16, 3, 9, 9)]),
                                            ((2, 3, 7, 10), [(8, 3, 7, 10), (8, 3, 10, 7)])])
def test_batched_ensemble_equals_each_variant_alone(shape, batches):
    torch.manual_seed(0)
    model = MSFIN("msfin-s-x4").eval()
    x = torch.rand(shape) * 255
    spy = Spy(model)
    y = self_ensemble(spy, x)
    assert spy.batches == batches  # one forward for a square, one per orientation otherwise
    with torch.no_grad():
        expected = _one_by_one(model, x)
    assert y.shape == (shape[0], 3, 4 * shape[2], 4 * shape[3]) and y.dtype == torch.float32
    assert (y - expected).abs().max() <= BATCH_TOL
    with torch.no_grad():
        assert (y - model(x)).abs().max() > 10 * BATCH_TOL  # the ensemble is not the plain output


def test_variants_are_the_eight_symmetries_of_the_square():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    seen = set()
    for flip, transpose in variants():
        v = x.flip(flip) if flip else x
        seen.add(tuple((v.transpose(-2, -1) if transpose else v).flatten().tolist()))
    assert len(seen) == 8


def test_ensemble_of_an_equivariant_model_is_the_model():
    up = nn.Upsample(scale_factor=4, mode="nearest")  # commutes with every flip and transpose
    x = torch.rand(1, 3, 5, 8) * 255
    assert torch.allclose(self_ensemble(up, x), up(x))


def test_ensemble_of_a_shifting_model_averages_the_shifts():
    def shift_right(x):  # output column j = input column j-1 (zero at the left edge)
        return F.pad(x, (1, 0))[..., :-1]

    x = torch.ones(1, 3, 4, 4)
    y = self_ensemble(shift_right, x)
    # Each edge of the 4×4 square is zeroed by 2 of the 8 variants; corners by 4.
    assert y[0, 0, 0, 0] == 0.5 and y[0, 0, 0, 1] == 0.75 and y[0, 0, 1, 1] == 1.0


def test_upscaler_self_ensemble(pretrained):
    model = pretrained("msfin-s-x4")
    rgb = np.random.default_rng(0).integers(0, 256, (9, 12, 3), dtype=np.uint8)
    out = Upscaler(model, device="cpu", self_ensemble=True).upscale(rgb)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        expected = _one_by_one(model, x)[0].clamp(0, 255).round().permute(1, 2, 0).to(torch.uint8).numpy()
    assert out.shape == (36, 48, 3) and np.abs(out.astype(int) - expected).max() <= 1


@pytest.mark.slow
def test_msfin_s_plus_reproduces_the_paper_on_set5(pretrained, data_dir):
    """Paper (Table 1): MSFIN-S+ Set5 ×4 32.18 dB / 0.8945. About 35 s on two CPU cores."""
    up = Upscaler(pretrained("msfin-s-x4"), device="cpu", self_ensemble=True)
    result = evaluate_folder(up.upscale_rgb, data_dir / "Set5", 4)
    assert abs(result.psnr - 32.18) <= 0.02 and abs(result.ssim - 0.8945) <= 0.0005
    assert result.psnr > 32.0672 + 0.08  # and clearly above the plain MSFIN-S


def test_cli_eval_self_ensemble(tmp_path, weights_dir, capsys):
    from PIL import Image

    folder = tmp_path / "set"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / "a.png")
    assert main(["eval", "--model", "msfin-s-x4", "--data", str(folder), "--self-ensemble"]) == 0
    assert "msfin-s-x4+" in capsys.readouterr().out
