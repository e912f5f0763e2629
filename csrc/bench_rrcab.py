"""Time the CUDA RRCAB pass per variant, against the memory floor of the same pass.

    python csrc/bench_rrcab.py [--height 720 --width 1280] [--dtype fp16|fp32|both]

Each block runs at its level's resolution for a 1280×720 output (C = 24/16 at full size, 48/32 at
half, 96/64 at quarter), in the engine's steady-state form: t and u in, the producer's CA applied
as it loads, x_out and u_out written. The floor is those four activations' bytes at the measured
device-to-device copy bandwidth; "exact GFLOP/s" counts only the grouped convolution's own MACs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from msfin_fast.config import PRESETS, MSFINConfig
from msfin_fast.engine.backends import cuda as cuda_backend
from msfin_fast.model import RRCAB


def preset_for(groups: int) -> MSFINConfig:
    """The preset whose RRCABs have ``groups`` groups (6: MSFIN, 4: MSFIN-S)."""
    found = [cfg for cfg in PRESETS.values() if cfg.groups == groups]
    if len(found) != 1:
        raise SystemExit(f"{len(found)} presets with groups={groups} in msfin_fast.config.PRESETS, expected 1")
    return found[0]


def configs() -> list[tuple[int, int, int, int]]:
    """(channels, groups, CA reduction, resolution divisor) of every variant the built extension has
    a kernel for (its list is csrc/rrcab.h's MSFIN_FOR_EACH_CONFIG): the reduction is the preset's,
    the divisor channels / the preset's n_feats (1, 2 or 4: the level the block runs at)."""
    from msfin_fast import _C

    out = []
    for c, g in _C.supported_configs():
        preset = preset_for(g)
        div = c // preset.n_feats
        if c % preset.n_feats or div not in (1, 2, 4):
            raise SystemExit(f"C={c} is not a level of the groups={g} preset (n_feats {preset.n_feats})")
        out.append((c, g, preset.reduction, div))
    return out


def copy_bandwidth() -> float:
    """Bytes per second read+written by a large device-to-device copy."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (start.elapsed_time(end) / 1e3)


def time_pass(c, g, r, h, w, dtype, repeats=50) -> float:
    block, producer = RRCAB(c, g, r, 1), RRCAB(c, g, r, 1)
    packed = cuda_backend.pack_block(block, dtype, "cuda")
    ca = cuda_backend.pack_block(producer, dtype, "cuda")
    t = torch.randn(1, h, w, c, device="cuda").to(dtype)
    u = torch.randn(1, h, w, c, device="cuda").to(dtype)
    sums_in = torch.randn(1, c, device="cuda")
    x_out, u_out = torch.empty_like(t), torch.empty_like(t)
    sums_out = torch.zeros(1, c, device="cuda")

    def run():
        cuda_backend.rrcab_pass(packed, t, u=u, sums_in=sums_in, ca=ca, x_out=x_out, u_out=u_out,
                                sums_out=sums_out, check=False)

    for _ in range(5):
        run()
    graph = torch.cuda.CUDAGraph()  # replay a graph so Python's launch cost is not in the time
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats  # µs per pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--dtype", choices=["fp16", "fp32", "both"], default="both")
    args = parser.parse_args()
    if not cuda_backend.available():
        print(f"cannot run: {cuda_backend.unavailable_reason()}", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    dtypes = {"fp16": [torch.float16], "fp32": [torch.float32], "both": [torch.float16, torch.float32]}[args.dtype]
    print(f"{'dtype':5} {'C':>3} {'G':>2} {'H×W':>10} {'µs':>8} {'floor µs':>9} {'×floor':>7} {'exact GFLOP/s':>14}")
    for dtype in dtypes:
        for c, g, r, div in configs():
            h, w = args.height // div, args.width // div
            us = time_pass(c, g, r, h, w, dtype)
            size = torch.finfo(dtype).bits // 8
            floor_us = 4 * h * w * c * size / bandwidth * 1e6
            flops = 2 * h * w * (2 * c * (c // g) * 9 + c * c)
            name = "fp16" if dtype == torch.float16 else "fp32"
            print(f"{name:5} {c:3d} {g:2d} {f'{h}×{w}':>10} {us:8.1f} {floor_us:9.1f} {us / floor_us:7.2f} "
                  f"{flops / us / 1e3:14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
