"""Plain tiles place every core where it belongs; exact tiles reproduce the whole-image run; the
memory estimate drives the fall-back to tiles, and a CUDA out-of-memory error is retried tiled."""

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from msfin_fast import InvalidInputError, Upscaler, get_config
from msfin_fast import tiling
from msfin_fast.cli import main
from msfin_fast.model import MSFIN
from msfin_fast.tiling import (
    Footprint,
    bytes_per_output_pixel,
    choose_tile,
    exact_tiled_forward,
    fits,
    footprint,
    tiled_forward,
)

# fp32 on the CPU: tiles run the same convs on other crops, so sums may round differently.

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXACT_TOL = 1e-3  # on the 0–255 scale


class LocalUpscaler(nn.Module):
    """×4 nearest, then two 3×3 convs: no global pooling, receptive radius 1 LR pixel."""

    scale = 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, x):
        return self.body(F.interpolate(x, scale_factor=4, mode="nearest"))


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_exact_tiles_equal_the_whole_image_random_weights(preset):
    torch.manual_seed(0)
    model = MSFIN(preset).eval()
    # 23×17 LR with 4-px tiles: 6×5 tiles at full resolution, 3×3 at half, 2×2 at quarter.
    x = torch.rand(2, 3, 23, 17) * 255
    with torch.no_grad():
        whole = model(x)
    exact = exact_tiled_forward(model, x, tile=4)
    assert exact.shape == whole.shape == (2, 3, 92, 68)
    assert (exact - whole).abs().max() <= EXACT_TOL


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_exact_tiles_equal_the_whole_image_released_weights(pretrained, preset):
    model = pretrained(preset)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 21, 26) * 255  # 8-px tiles: 3×4 at full resolution, 2×2 at half
    with torch.no_grad():
        whole = model(x)
        plain = tiled_forward(model, x, tile=8, tile_pad=2)
    exact = exact_tiled_forward(model, x, tile=8)
    assert (exact - whole).abs().max() <= EXACT_TOL
    # Plain tiles pool the attention per tile: visibly not the same computation.
    assert (plain - whole).abs().max() > 100 * EXACT_TOL


def test_exact_tiles_pad_other_scales_like_the_reference():
    torch.manual_seed(0)
    model = MSFIN(get_config("msfin-s-x4").replace(scale=3)).eval()
    x = torch.rand(1, 3, 13, 11) * 255  # 39×33 HR, padded to 40×36 inside
    with torch.no_grad():
        whole = model(x)
    assert (exact_tiled_forward(model, x, tile=4) - whole).abs().max() <= EXACT_TOL


def test_exact_tiles_refuse_other_modules():
    with pytest.raises(InvalidInputError, match="reference MSFIN"):
        exact_tiled_forward(LocalUpscaler(), torch.zeros(1, 3, 8, 8), tile=4)


def test_plain_tiles_place_every_core_without_seams():
    model = LocalUpscaler().eval()
    x = torch.rand(2, 3, 19, 13) * 255
    with torch.no_grad():
        whole = model(x)
        for tile, pad in [(4, 1), (5, 3), (7, 1), (50, 0)]:
            assert torch.allclose(tiled_forward(model, x, tile, pad), whole, atol=1e-4), (tile, pad)
        # Without context the border of each tile sees zero padding: the seam is visible.
        assert not torch.allclose(tiled_forward(model, x, 4, 0), whole, atol=1e-2)


def _sample(size):
    from io import BytesIO

    from msfin_fast.sample import sample_lr

    buffer = BytesIO()
    Image.fromarray(sample_lr(size)).save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("tile, pad", [(0, 1), (4, -1), (2.5, 1)])
def test_bad_tiles(tile, pad):
    with pytest.raises(InvalidInputError, match="tile"):
        tiled_forward(LocalUpscaler(), torch.zeros(1, 3, 8, 8), tile, pad)


def test_footprints_follow_the_layers():
    model = MSFIN("msfin-s-x4")
    # Down4: stride-2 conv (halo 1), conv (1 at 1/2 → 2), stride-2 conv (2), conv (1 at 1/4 → 4).
    assert footprint(model.ds4_down) == Footprint(Fraction(1, 4), Fraction(9))
    assert footprint(model.ds4_up4) == Footprint(Fraction(2), Fraction(1))
    assert footprint(model.Fd21) == Footprint(Fraction(2), Fraction(0))
    assert footprint(model.block_re1.body[:-1]) == Footprint(Fraction(1), Fraction(2))
    with pytest.raises(NotImplementedError, match="undilated"):
        footprint(nn.Conv2d(3, 3, 3, padding=2, dilation=2))


def test_memory_estimate_scales_with_width_and_dtype():
    msfin, small = get_config("msfin-x4"), get_config("msfin-s-x4")
    per_px = bytes_per_output_pixel(msfin)
    # At least the 24-channel fp32 map of one full-resolution RRCAB, its input and output.
    assert 3 * 24 * 4 < per_px < 40 * 24 * 4
    assert bytes_per_output_pixel(small) < per_px
    assert bytes_per_output_pixel(msfin, torch.float16) == pytest.approx(per_px / 2)
    budget = int(tiling.HEADROOM * per_px * 16 * 200 * 200)  # a 200×200 LR image, one at a time
    assert fits(msfin, torch.float32, (1, 3, 200, 200), budget)
    assert not fits(msfin, torch.float32, (2, 3, 200, 200), budget)
    tile = choose_tile(msfin, torch.float32, 1, budget, tile_pad=10)
    assert 170 <= tile <= 180 and fits(msfin, torch.float32, (1, 3, tile + 20, tile + 20), budget)


def test_whole_run_that_would_not_fit_falls_back_to_exact_tiles(pretrained, monkeypatch):
    model = pretrained("msfin-s-x4")
    rgb = np.random.default_rng(0).integers(0, 256, (30, 22, 3), dtype=np.uint8)
    whole = Upscaler(model, device="cpu").upscale(rgb)
    per_px = bytes_per_output_pixel(model.config)
    monkeypatch.setattr(tiling, "available_memory", lambda device: int(tiling.HEADROOM * per_px * 16 * 18 * 18))
    import msfin_fast.run as upscaler_module

    monkeypatch.setattr(upscaler_module, "available_memory", tiling.available_memory)
    with pytest.warns(UserWarning, match="would not fit"):
        tiled = Upscaler(model, device="cpu", tile_mode="exact").upscale(rgb)
    assert np.abs(tiled.astype(int) - whole).max() <= 1


class OutOfMemoryAbove(nn.Module):
    """Raises the CUDA out-of-memory error for inputs over ``limit`` pixels (a small GPU, on a CPU)."""

    scale = 4

    def __init__(self, limit):
        super().__init__()
        self.limit, self.sizes = limit, []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return F.interpolate(x, scale_factor=4, mode="nearest")


def test_out_of_memory_is_retried_with_tiles():
    model = OutOfMemoryAbove(limit=30 * 30)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 37, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match="retrying with plain tiles"):
        out = Upscaler(model, device="cpu").upscale(rgb)
    assert np.array_equal(out, rgb.repeat(4, axis=0).repeat(4, axis=1))
    assert model.sizes[0] == (40, 37) and max(h * w for h, w in model.sizes[1:]) <= 30 * 30


def test_out_of_memory_without_auto_tile_is_raised():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Upscaler(OutOfMemoryAbove(limit=10), device="cpu", auto_tile=False).upscale(
            np.zeros((8, 8, 3), np.uint8))


def test_cli_exact_tiles_match_the_whole_image(tmp_path, weights_dir, capsys):
    lr = tmp_path / "lr.png"
    lr.write_bytes(_sample(24).getvalue())
    assert main(["upscale", "-i", str(lr), "-o", str(tmp_path / "whole.png"), "--model", "msfin-s-x4", "-q"]) == 0
    assert main(["upscale", "-i", str(lr), "-o", str(tmp_path / "exact.png"), "--model", "msfin-s-x4", "-q",
                 "--tile", "8", "--tile-mode", "exact"]) == 0
    assert main(["upscale", "-i", str(lr), "-o", str(tmp_path / "plain.png"), "--model", "msfin-s-x4", "-q",
                 "--tile", "8", "--tile-pad", "4"]) == 0
    whole, exact, plain = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int)
                           for n in ("whole", "exact", "plain"))
    assert whole.shape == (96, 96, 3)
    assert np.abs(exact - whole).max() <= 1
    assert np.abs(plain - whole).max() > 1
    assert main(["upscale", "-i", str(lr), "-o", str(tmp_path / "x.png"), "--tile-pad", "-1"]) == 1
    assert "tile_pad must be a non-negative" in capsys.readouterr().err


def test_tiled_runs_report_their_progress_only_where_asked(pretrained):
    """tile_progress: plain tiles report each tile, exact tiles each layer, up to (total, total);
    outside the block nothing is called."""
    model = pretrained("msfin-s-x4")
    x = torch.rand(1, 3, 20, 30) * 255
    seen = []
    with tiling.tile_progress(lambda done, total: seen.append((done, total))):
        tiling.tiled_forward(model, x, 8, 2)
    assert seen == [(i, 12) for i in range(1, 13)]  # 3 rows × 4 columns of 8-px tiles
    seen.clear()
    with tiling.tile_progress(lambda done, total: seen.append((done, total))):
        tiling.exact_tiled_forward(model, x, 16)
    dones, totals = [d for d, _ in seen], {t for _, t in seen}
    assert len(totals) == 1 and dones == sorted(dones) and dones[-1] == totals.pop() > 5
    seen.clear()
    tiling.tiled_forward(model, x, 8, 2)
    assert seen == []


def test_the_cli_shows_tile_progress_for_one_image(tmp_path, weights_dir, monkeypatch):
    """The CLI hands each image its ImageProgress as the tile callback (drawn only on a terminal)."""
    from msfin_fast import cli

    calls = []

    class Recorder:
        def __init__(self, label):
            self.label = label

        def __call__(self, done, total):
            calls.append((self.label, done, total))

        def close(self):
            calls.append((self.label, "closed"))

    monkeypatch.setattr(cli, "ImageProgress", Recorder)
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["upscale", "-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"), "-n", "msfin-s-x4",
                 "-t", "8"]) == 0
    assert calls == [("a.png", i, 6) for i in range(1, 7)] + [("a.png", "closed")]
    calls.clear()
    assert main(["upscale", "-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "c.png"), "-n", "msfin-s-x4",
                 "-q", "-t", "8"]) == 0
    assert calls == []  # -q: no progress
