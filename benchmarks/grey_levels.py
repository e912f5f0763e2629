"""How far an engine's 8-bit images are from the fp32 reference's, over Set5 and Set14 (LR made as
the paper makes it: MATLAB bicubic of the HR cropped to a multiple of 4).

    python benchmarks/grey_levels.py --dtype bf16 --backend native [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msfin_fast import Upscaler  # noqa: E402
from msfin_fast.evaluate import hr_lr_pair  # noqa: E402
from msfin_fast.images import read_image  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["msfin-x4", "msfin-s-x4"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--backend", default="native")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    args = ap.parse_args(argv)
    files = [f for folder in ("Set5", "Set14") for f in sorted((args.data / folder).glob("*.png"))]
    if not files:
        print(f"no Set5/Set14 pictures under {args.data}", file=sys.stderr)
        return 1
    for preset in args.models:
        ref = Upscaler(preset, device="cpu", dtype="fp32", backend="reference")
        test = Upscaler(preset, device="cpu", dtype=args.dtype, backend=args.backend)
        worst, changed, total = 0, 0, 0
        for f in files:
            _, lr = hr_lr_pair(read_image(f).rgb, 4)
            d = np.abs(ref.upscale_rgb(lr).astype(int) - test.upscale_rgb(lr).astype(int))
            worst, changed, total = max(worst, int(d.max())), changed + int((d > 0).sum()), total + d.size
        print(f"{preset} {args.backend} {args.dtype} against the fp32 reference: {len(files)} images, at most {worst} "
              f"grey level(s) apart, {changed / total:.3%} of the 8-bit values differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
