"""Resize and metrics against MATLAB values and first principles."""

import math

import numpy as np
import pytest

from msfin_fast import InvalidInputError
from msfin_fast.evaluate import (
    bicubic_upscaler,
    evaluate_folder,
    hr_lr_pair,
    imresize,
    modcrop,
    psnr,
    rgb2y,
    ssim,
)


def test_imresize_matches_matlab_on_a_3x3_matrix():
    # MATLAB: imresize([1 2 3; 4 5 6; 7 8 9], 1/1.4) (double input, bicubic, antialiasing), as quoted
    # in a public Q&A on porting imresize to Python.
    matlab = np.array(
        [[1.7583, 3.2062, 3.5251],
         [6.1021, 7.5500, 7.8688],
         [7.0586, 8.5065, 8.8254]]
    )
    out = imresize(np.arange(1.0, 10.0).reshape(3, 3), 1 / 1.4)
    np.testing.assert_allclose(out, matlab, atol=1e-4)


def test_imresize_output_size_is_ceil():
    img = np.zeros((10, 7, 3), np.uint8)
    assert imresize(img, 0.25).shape == (3, 2, 3)
    assert imresize(img, 4.0).shape == (40, 28, 3)
    assert imresize(img[..., 0], 1 / 3).shape == (4, 3)


@pytest.mark.parametrize("scale", [0.25, 1 / 3, 0.5, 2.0, 3.0, 4.0])
def test_imresize_keeps_constants_and_dtype(scale):
    img = np.full((13, 11, 3), 77, np.uint8)
    out = imresize(img, scale)
    assert out.dtype == np.uint8 and np.all(out == 77)
    assert imresize(img.astype(np.float64), scale).dtype == np.float64


def test_imresize_downscale_of_a_ramp_is_the_ramp_at_the_new_centres():
    # A linear ramp is reproduced exactly by a normalised symmetric kernel away from the edges.
    x = np.arange(64, dtype=np.float64)
    img = np.tile(x, (8, 1))
    out = imresize(img, 0.25)
    centres = (np.arange(16) + 0.5) * 4 - 0.5  # 0-based input coordinate of output pixel centres
    np.testing.assert_allclose(out[1, 3:-3], centres[3:-3], atol=1e-9)


def test_imresize_antialiases_when_shrinking():
    # A Nyquist checkerboard must average out when shrunk (a plain cubic would alias it).
    img = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.float64)
    out = imresize(img, 0.25)
    assert np.abs(out[2:-2, 2:-2] - 127.5).max() < 1.0


def test_imresize_rejects_bad_input():
    with pytest.raises(InvalidInputError):
        imresize(np.zeros((0, 4)), 0.5)
    with pytest.raises(InvalidInputError):
        imresize(np.zeros((4, 4)), 0)


def test_modcrop():
    assert modcrop(np.zeros((229, 343, 3)), 4).shape == (228, 340, 3)


def test_rgb2y_is_bt601_studio_range():
    assert rgb2y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16.0)
    assert rgb2y(np.full((1, 1, 3), 255.0))[0, 0] == pytest.approx(235.0)
    assert rgb2y(np.array([[[255.0, 0, 0]]]))[0, 0] == pytest.approx(16 + 65.481)


def test_psnr_by_hand():
    a = np.zeros((10, 10))
    b = np.full((10, 10), 5.0)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(a, a) == math.inf
    b[0, :] = 100  # inside the shaved border: ignored
    assert psnr(a, b, shave=1) == pytest.approx(10 * math.log10(255**2 / 25))


def test_ssim_of_identical_images_is_one_and_drops_with_noise():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (40, 30))
    assert ssim(img, img) == pytest.approx(1.0)
    slightly = ssim(img, img + rng.normal(0, 10, img.shape))
    badly = ssim(img, img + rng.normal(0, 80, img.shape))
    assert 0 < badly < slightly < 1


def test_ssim_equals_a_direct_2d_window_computation():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 255, (2, 24, 19))
    r = np.arange(11) - 5
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w = g / g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert ssim(a, b) == pytest.approx(np.mean(values), abs=1e-12)


def test_metrics_reject_mismatched_or_tiny_images():
    with pytest.raises(InvalidInputError, match="differ in shape"):
        psnr(np.zeros((5, 5)), np.zeros((5, 6)))
    with pytest.raises(InvalidInputError, match="too small"):
        psnr(np.zeros((8, 8)), np.zeros((8, 8)), shave=4)
    with pytest.raises(InvalidInputError, match="11×11"):
        ssim(np.zeros((12, 12)), np.zeros((12, 12)), shave=1)


def test_hr_lr_pair_crops_then_shrinks():
    hr, lr = hr_lr_pair(np.zeros((230, 341, 3), np.uint8), 4)
    assert hr.shape == (228, 340, 3) and lr.shape == (57, 85, 3)


def test_bicubic_baseline_on_set5_matches_matlab(data_dir):
    # Published MATLAB bicubic ×4 values: baby 31.78 dB, Set5 mean 28.42 dB / 0.8104.
    result = evaluate_folder(bicubic_upscaler(4), data_dir / "Set5", 4)
    per_image = {s.name: s for s in result.images}
    assert per_image["baby"].psnr == pytest.approx(31.78, abs=0.01)
    assert result.psnr == pytest.approx(28.42, abs=0.015)
    # (published SSIMs differ in the third decimal between evaluators)
    assert result.ssim == pytest.approx(0.8104, abs=0.0015)


def test_evaluate_folder_rejects_wrong_upscaler_output(data_dir):
    with pytest.raises(InvalidInputError, match="expected uint8"):
        evaluate_folder(lambda lr: lr, data_dir / "Set5", 4)


def test_evaluate_folder_without_images(tmp_path):
    with pytest.raises(InvalidInputError, match="no images"):
        evaluate_folder(bicubic_upscaler(4), tmp_path, 4)
