"""How much of a native RRCAB pass's time is memory traffic: the pass at the three widths each
preset runs it at (MSFIN-S: 16 channels at full resolution, 32 at half, 64 at quarter; MSFIN: 24,
48, 96), sized so that every case does the same FLOPs, timed interleaved.

    python benchmarks/pass_traffic.py                          # LR 64x64 (full resolution 256x256)
    python benchmarks/pass_traffic.py --lr 128 --rounds 40 --out benchmarks/results/x.md

A pass reads its input t, the previous pass's u and one addend e (what the full-resolution passes
read: a transposed conv's output) and writes x_out and u: five tensors of C channels at its
resolution. Halving the resolution and doubling C keeps the FLOPs (the groups stay 4 or 6, so
the grouped convs' and the 1x1's work per pixel grows 4x on a quarter of the pixels) while the
bytes moved halve: the narrow full-resolution pass moves 4x the bytes of the wide
quarter-resolution one for the same work. Were the passes bound by their arithmetic alone, they
would take the same time. With ``--bf16`` each case
is also timed with its addends (u, e, u_out) stored in bf16, which cuts 2/5 of the traffic
(the engine's bf16 mode) and leaves the arithmetic unchanged.

Random weights and inputs (the arithmetic does not depend on the values); each round calls every
case once untimed and once timed, in turn; min and median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from msfin_fast.engine.backends import native  # noqa: E402

PRESETS = {"msfin-s-x4": (16, 4, 4), "msfin-x4": (24, 6, 5)}  # n_feats, groups, CA reduction


class Case:
    def __init__(self, name: str, hw: int, c: int, groups: int, cr: int, bf16: bool, threads: int):
        g = torch.Generator().manual_seed(0)

        def r(*shape, scale=1.0):
            return torch.randn(*shape, generator=g) * scale

        self.name, self.hw, self.c, self.bf16 = name, hw, c, bf16
        addend = torch.bfloat16 if bf16 else torch.float32
        self.t = r(1, hw, hw, c)
        self.u, self.e = r(1, hw, hw, c).to(addend), r(1, hw, hw, c).to(addend)
        self.sums = torch.rand(1, c, generator=g) * hw * hw
        self.ca = [r(cr, c), r(cr), r(c, cr), r(c)]
        self.x_out, self.u_out = torch.empty(1, hw, hw, c), torch.empty(1, hw, hw, c, dtype=addend)
        self.sums_out = torch.zeros(1, c)
        self.w = [r(c, c // groups, 3, 3, scale=0.2), r(c), r(c, c // groups, 3, 3, scale=0.2), r(c),
                  r(c, c, scale=0.2), r(c)]
        self.groups, self.cr, self.threads = groups, cr, threads
        cols = min(hw, native.STRIP_COLS)
        self.cols, self.rows = cols, native.band_rows(hw, -(-hw // cols))
        self.args = native._cpu.CaArgs(self.sums.data_ptr(), *(t.data_ptr() for t in self.ca), cr)

    def flops(self) -> float:
        c, g = self.c, self.groups
        return 2.0 * self.hw * self.hw * (2 * 9 * c * (c // g) + c * c)

    def bytes(self) -> float:
        addend = 2 if self.bf16 else 4
        per_px = self.c * (4 + 4 + 2 * addend + addend)  # t and x_out fp32; u, e read and u_out written
        return float(self.hw * self.hw * per_px)

    def __call__(self) -> None:
        self.sums_out.zero_()
        native._cpu.rrcab_pass(self.t.data_ptr(), self.u.data_ptr(), self.e.data_ptr(), 0, self.args,
                               self.x_out.data_ptr(), self.u_out.data_ptr(), self.sums_out.data_ptr(),
                               *(w.data_ptr() for w in self.w), 1, self.hw, self.hw, self.c, self.groups,
                               self.threads, self.cols, self.rows, self.bf16, self.bf16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--lr", type=int, default=64, help="LR side: the passes run at 4x, 2x and 1x this")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--bf16", action="store_true", help="also time each case with bf16 addends")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if not native.available():
        print(native.not_built_reason(), file=sys.stderr)
        return 1
    threads = torch.get_num_threads()
    dtypes = (False, True) if args.bf16 else (False,)
    groups: dict[tuple[str, bool], list[Case]] = {}  # (preset, bf16 addends): its passes, narrowest first
    for preset in args.models:
        c0, g, cr = PRESETS[preset]
        for m in (1, 2, 4):  # m x the channels at 1/m of the full resolution
            for bf16 in dtypes:
                hw = 4 * args.lr // m
                name = f"{preset} C={c0 * m} at {hw}²" + (", bf16 addends" if bf16 else "")
                groups.setdefault((preset, bf16), []).append(Case(name, hw, c0 * m, g, cr, bf16, threads))
    cases = [case for group in groups.values() for case in group]
    times: dict[Case, list[float]] = {case: [] for case in cases}
    for case in cases:
        case()
    for _ in range(args.rounds):
        for case in cases:
            case()
            t0 = time.perf_counter()
            case()
            times[case].append((time.perf_counter() - t0) * 1e3)
    lines = [f"# native RRCAB passes of equal FLOPs at three widths ({native.isa()}, {threads} threads, "
             f"torch {torch.__version__}, LR {args.lr}², {args.rounds} interleaved rounds)", "",
             "| pass | GFLOP | MB moved | min ms | median ms | GFLOP/s (median) | GB/s (median) | ms vs the widest |",
             "|---|---|---|---|---|---|---|---|"]
    for group in groups.values():
        widest = statistics.median(times[group[-1]])
        for case in group:
            t, med = times[case], statistics.median(times[case])
            lines.append(f"| {case.name} | {case.flops() / 1e9:.3f} | {case.bytes() / 1e6:.1f} | {min(t):.3f} | "
                         f"{med:.3f} | {case.flops() / med / 1e6:.0f} | {case.bytes() / med / 1e6:.1f} | "
                         f"{med / widest:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
