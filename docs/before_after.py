"""Make docs/images/before_after.png, the README's picture: the package's own sample picture
(``msfin-fast sample``, 64×64) enlarged ×4 by repeating pixels (what the low-resolution image
holds), beside MSFIN's ×4 output of it.

    python docs/before_after.py [OUTPUT]        (default: docs/images/before_after.png)

Needs the released MSFIN weights (``MSFIN_WEIGHTS_DIR``, or the download). The test suite remakes
the picture and compares it with the committed one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64  # LR side; the panels are 4× that
GAP = 8


def before_after(upscaler=None) -> Image.Image:
    from msfin_fast import Upscaler
    from msfin_fast.sample import sample_lr

    upscaler = upscaler or Upscaler("msfin-x4", device="cpu")
    lr = Image.fromarray(sample_lr(SIZE))
    before = lr.resize((4 * SIZE, 4 * SIZE), Image.Resampling.NEAREST)
    after = upscaler.upscale(lr)
    canvas = np.full((4 * SIZE, 8 * SIZE + GAP, 3), 255, np.uint8)
    canvas[:, : 4 * SIZE] = np.asarray(before)
    canvas[:, 4 * SIZE + GAP:] = np.asarray(after)
    return Image.fromarray(canvas)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "images" / "before_after.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    before_after().save(out, optimize=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
