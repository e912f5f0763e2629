"""A small run of every CUDA RRCAB variant, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 3 python csrc/sanitize_rrcab.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python csrc/sanitize_rrcab.py
    compute-sanitizer --tool synccheck --error-exitcode 3 python csrc/sanitize_rrcab.py

Each (channels, dtype) runs once on an image smaller than a tile and once on one that spans several
tiles with ragged edges, with every optional input and output given, so every code path runs.
"""

import sys

import torch

from msfin_fast.config import PRESETS
from msfin_fast.engine.backends import cuda as cuda_backend
from msfin_fast.model import RRCAB


def reduction_for(groups: int) -> int:
    """The CA reduction of the preset whose RRCABs have ``groups`` groups (6: MSFIN, 4: MSFIN-S)."""
    found = {cfg.reduction for cfg in PRESETS.values() if cfg.groups == groups}
    if len(found) != 1:
        raise SystemExit(f"no single preset with groups={groups} in msfin_fast.config.PRESETS: {sorted(found)}")
    return found.pop()


def configs() -> list[tuple[int, int, int]]:
    """(channels, groups, CA reduction) of every variant the built extension has a kernel for (its
    list is csrc/rrcab.h's MSFIN_FOR_EACH_CONFIG)."""
    from msfin_fast import _C

    return [(c, g, reduction_for(g)) for c, g in _C.supported_configs()]


def main() -> int:
    if not cuda_backend.available():
        print(f"cannot run: {cuda_backend.unavailable_reason()}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for c, g, r in configs():
        block, producer = RRCAB(c, g, r, 1), RRCAB(c, g, r, 1)
        for dtype in (torch.float32, torch.float16):
            packed = cuda_backend.pack_block(block, dtype, "cuda")
            ca = cuda_backend.pack_block(producer, dtype, "cuda")
            for n, h, w in ((1, 3, 5), (2, 19, 37)):
                def act():
                    return torch.randn(n, h, w, c, device="cuda").to(dtype)

                t, u, e1, e2 = act(), act(), act(), act()
                sums_in = torch.randn(n, c, device="cuda")
                x_out, u_out = torch.empty_like(t), torch.empty_like(t)
                sums_out = torch.zeros(n, c, device="cuda")
                cuda_backend.rrcab_pass(packed, t, u=u, sums_in=sums_in, ca=ca, e1=e1, e2=e2,
                                        x_out=x_out, u_out=u_out, sums_out=sums_out)
                cuda_backend.rrcab_pass(packed, t, u_out=u_out, sums_out=sums_out)
    torch.cuda.synchronize()
    print("ok: every variant ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
