"""A synthetic test picture, so the CLI can be tried without downloading any image.

An HR scene with the structures super-resolution is judged on (edges at many angles, fine
stripes, a zone plate, smooth gradients, text-like blocks) is rendered at 4× the requested size
and reduced with MATLAB-style bicubic, exactly as benchmark LR images are made.
"""

from __future__ import annotations

import numpy as np

from .evaluate import imresize


def sample_hr(size: int) -> np.ndarray:
    """Deterministic H×W×3 uint8 scene of ``size``×``size`` pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.stack([0.25 + 0.5 * xx, 0.35 + 0.4 * yy, 0.65 - 0.3 * xx * yy], axis=2)

    # Zone plate (chirp) in the top-left quarter: frequencies rising towards its corner.
    r2 = (xx - 0.0) ** 2 + (yy - 0.0) ** 2
    zone = 0.5 + 0.5 * np.cos(np.pi * 90.0 * r2)
    q = (xx < 0.5) & (yy < 0.5)
    img[q] = zone[q, None] * np.array([0.95, 0.9, 0.8])

    # Stripes at three angles in the top-right quarter.
    for k, angle in enumerate((15.0, 45.0, 80.0)):
        t = np.deg2rad(angle)
        band = (xx >= 0.5) & (yy >= k / 6) & (yy < (k + 1) / 6)
        stripes = np.sin(2 * np.pi * 24 * (xx * np.cos(t) + yy * np.sin(t))) > 0
        img[band] = np.where(stripes[band, None], [0.1, 0.1, 0.15], [0.95, 0.85, 0.3])

    # Discs with hard edges in the bottom-left quarter.
    for cx, cy, rad, colour in ((0.14, 0.64, 0.09, (0.85, 0.15, 0.1)),
                                 (0.33, 0.70, 0.12, (0.1, 0.55, 0.2)),
                                 (0.20, 0.87, 0.07, (0.15, 0.25, 0.85))):
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < rad ** 2
        img[disc] = colour

    # Checkerboard and block "glyphs" in the bottom-right quarter.
    checker = ((np.floor(xx * 48) + np.floor(yy * 48)) % 2 == 0) & (xx >= 0.5) & (yy >= 0.5) & (yy < 0.75)
    img[checker] = (0.05, 0.05, 0.05)
    glyph_rows = (yy >= 0.8) & (yy < 0.95) & (xx >= 0.55) & (xx < 0.95)
    glyph = (np.floor(xx * 40) % 3 != 2) & (np.floor(yy * 60) % 4 != 3) & \
            ((np.floor(xx * 40) * 7 + np.floor(yy * 60) * 3) % 5 > 1)
    img[glyph_rows & glyph] = (0.1, 0.1, 0.1)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def sample_lr(size: int = 128, scale: int = 4) -> np.ndarray:
    """The LR picture (``size``×``size``): the HR scene reduced by ``scale`` with MATLAB bicubic."""
    return imresize(sample_hr(size * scale), 1.0 / scale)
