"""Where the native CPU backend's time goes: each launch kind's milliseconds, GFLOP/s and share of
the machine's measured fp32 peak.

    python benchmarks/native_profile.py                       # MSFIN and MSFIN-S at LR 64x64
    python benchmarks/native_profile.py --sizes 64x64 180x320 --iters 5 --out benchmarks/results/x.md
    python benchmarks/native_profile.py --dtypes fp32 bf16          # the bf16 mode beside fp32

The peak is measured here, as the issue that set the CPU targets measured it: a dense 64→64 3×3
convolution by PyTorch (oneDNN) on a 128×128 channels_last input, fp32, with torch's threads. Each
launch kind (RRCAB pass per width and resolution, dense conv per shape, head, tail, materialize) is
timed by wrapping the backend's operations, median over ``--iters`` forwards after one warm-up;
FLOPs count a multiply-add as two, from the shapes and the packed weights (the padded outputs of
the tail's 3→8 GEMM count as work done). With ``--dtypes ... bf16`` the bf16 mode (the addends
stored in bf16, fp32 arithmetic) is profiled too, and the same oneDNN convolution in bf16 is
reported as the bf16 peak (on a CPU without bf16 arithmetic oneDNN emulates it, and the kernels,
which compute in fp32, are measured against the fp32 peak).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msfin_fast  # noqa: E402
from msfin_fast.engine.backends import native  # noqa: E402


def measured_peak(iters: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of oneDNN's dense 64→64 3×3 conv on 128×128, channels_last (best of 3 medians)."""
    x = torch.randn(1, 64, 128, 128).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * 64 * 64 * 9 * 128 * 128
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            F.conv2d(x, w, padding=1)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                F.conv2d(x, w, padding=1)
                times.append(time.perf_counter() - t0)
            best = min(best, statistics.median(times))
    return flops / best / 1e9


def pass_flops(src, p) -> float:
    n, h, w, c = src.t.shape
    return 2.0 * n * h * w * (2 * 9 * c * (c // p.groups) + c * c)


def conv_flops(parts, p) -> float:
    n, h, w, _ = parts[0].shape
    pad = p.ksize // 2
    ho, wo = (h + 2 * pad - p.ksize) // p.stride + 1, (w + 2 * pad - p.ksize) // p.stride + 1
    return 2.0 * n * ho * wo * p.w.shape[0] * p.w.shape[1] * p.w.shape[2]


def profile(preset: str, h: int, w: int, iters: int, dtype: torch.dtype = torch.float32) -> tuple[dict, float, float]:
    """({kind: (calls per forward, median ms per forward, FLOPs per forward)}, forward ms, total FLOPs)."""
    model = msfin_fast.load_pretrained(preset, allow_download=False)
    engine = msfin_fast.optimize(model, dtype=dtype, backend="native", output_dtype=torch.float32)
    impl = engine.backend_object
    impl.records_calls = False  # every forward through the launches (a replay would bypass the wrappers)
    record: dict = defaultdict(lambda: [0, 0.0, 0.0])

    def wrap(name, describe):
        real = getattr(impl, name)

        def timed(*args, **kw):
            t0 = time.perf_counter()
            out = real(*args, **kw)
            entry = record[describe(*args)]
            entry[0] += 1
            entry[1] += time.perf_counter() - t0
            return out
        setattr(impl, name, timed)
        return real

    def pass_kind(src, p, *rest, **kw):
        _, hh, ww, c = src.t.shape
        record_flops[f"rrcab pass C={c} at {hh}x{ww}"] = pass_flops(src, p)
        return f"rrcab pass C={c} at {hh}x{ww}"

    def conv_kind(inputs, p, *rest, **kw):
        parts = [inputs.t] if isinstance(inputs, native.Source) else list(inputs)
        kind = {0: "", 1: " shuffled"}[p.store]
        key = (f"conv {p.ksize}x{p.ksize}/{p.stride} {p.w.shape[1]}→{p.K}{kind} at "
               f"{parts[0].shape[1]}x{parts[0].shape[2]}")
        record_flops[key] = conv_flops(parts, p)
        return key

    def head_kind(x, p, out):
        record_flops["head (upsample + conv)"] = 2.0 * out.numel() * 27
        return "head (upsample + conv)"

    def tail_kind(src, p, out):
        record_flops["tail (finish + conv)"] = 2.0 * out.numel() * src.t.shape[3] * 9  # 3 outputs, C·9 terms
        return "tail (finish + conv)"

    record_flops: dict = {}
    wrap("rrcab_pass", pass_kind)
    wrap("conv", conv_kind)
    wrap("head", head_kind)
    wrap("tail", tail_kind)
    wrap("materialize", lambda src, out: "materialize (finish a deferred value)")
    x = torch.rand(1, 3, h, w) * 255
    totals = []
    with torch.no_grad():
        engine(x)
        per_iter = []
        for _ in range(iters):
            record.clear()
            t0 = time.perf_counter()
            engine(x)
            totals.append((time.perf_counter() - t0) * 1e3)
            per_iter.append({k: (v[0], v[1] * 1e3) for k, v in record.items()})
    kinds = {}
    for key in per_iter[0]:
        calls = per_iter[0][key][0]
        ms = statistics.median(it[key][1] for it in per_iter)
        kinds[key] = (calls, ms, record_flops.get(key, 0.0) * calls)
    return kinds, statistics.median(totals), sum(k[2] for k in kinds.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["msfin-x4", "msfin-s-x4"], choices=list(msfin_fast.PRESETS))
    ap.add_argument("--sizes", nargs="+", default=["64x64"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    if not native.available():
        print(native.not_built_reason(), file=sys.stderr)
        return 1
    peak = measured_peak()
    lines = [f"# native backend profile ({native.isa()}, {torch.get_num_threads()} threads, torch {torch.__version__})",
             "", f"Measured fp32 peak (oneDNN dense 64→64 3×3 at 128², channels_last): **{peak:.0f} GFLOP/s**."]
    if "bf16" in args.dtypes:
        lines.append(f"The same convolution in bf16: {measured_peak(dtype=torch.bfloat16):.0f} GFLOP/s. The bf16 mode "
                     "computes in fp32 (bf16 is how the addends are stored), so its % of peak is of the fp32 peak.")
    lines.append("")
    for preset in args.models:
        for size, name in ((s, d) for s in args.sizes for d in args.dtypes):
            h, w = (int(v) for v in size.split("x"))
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            kinds, total_ms, flops = profile(preset, h, w, args.iters, dtype)
            timed = sum(k[1] for k in kinds.values())
            lines += [f"## {preset}, LR {h}x{w}, batch 1, {name}", "",
                      f"Forward {total_ms:.1f} ms (median of {args.iters}), {flops / 1e9:.2f} GFLOP: "
                      f"**{flops / total_ms / 1e6:.0f} GFLOP/s, {100 * flops / total_ms / 1e6 / peak:.0f} % of peak**; "
                      f"the launches' medians below add up to {timed:.1f} ms.", "",
                      "| launch | calls | ms | share | GFLOP/s | % of peak |", "|---|---|---|---|---|---|"]
            for key, (calls, ms, fl) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
                rate = fl / ms / 1e6 if ms > 0 and fl else 0.0
                lines.append(f"| {key} | {calls} | {ms:.2f} | {100 * ms / total_ms:.0f} % | "
                             + (f"{rate:.0f} | {100 * rate / peak:.0f} % |" if fl else "— | — |"))
            lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
