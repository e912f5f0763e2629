"""Latency of MSFIN / MSFIN-S per backend, input size and batch: JSON, a markdown table, a PNG plot.

    python benchmarks/latency.py                      # everything that can run here
    python benchmarks/latency.py --quick              # one size, batch 1, no torch.compile (< 1 min)
    python benchmarks/latency.py --models msfin-x4 --sizes 180x320 --batch 1 --backends engine-fp16-graph

Backends: ref-fp32 (eager reference), ref-fp16-cl (eager fp16, channels_last), compile (torch.compile
max-autotune, which CUDA-graphs the call; minutes to build), engine-fp16 / engine-fp32 (the Triton
engine), engine-fp16-graph / engine-fp32-graph (the engine replaying a CUDA graph per shape),
engine-fp16-fused[-graph] (one launch per RRCAB pass, conv1 kept in L2) and engine-fp16-cudnn-graph
(the layers between blocks through cuDNN instead of kernels/conv.py); cuda-fp16[-graph] / cuda-fp32
(the RRCAB passes by the CUDA C++ kernel of csrc/); auto-fp16-graph (what backend="auto" picks).
On a GPU each number is the median of CUDA-event timings after warm-up; peak memory is the
allocator's high-water mark during the timed calls. "floor" is the time to move each RRCAB pass's
activation once in and once out at the card's copy bandwidth (``--bandwidth``), the bound the
kernels are written against; "% floor" = floor / median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msfin_fast  # noqa: E402
from msfin_fast.engine import plan as P  # noqa: E402

BACKENDS = ["ref-fp32", "ref-fp16-cl", "compile", "engine-fp16", "engine-fp32", "engine-fp16-graph",
            "engine-fp32-graph", "engine-fp16-fused", "engine-fp16-fused-graph", "engine-fp16-cudnn-graph",
            "cuda-fp16", "cuda-fp16-graph", "cuda-fp32", "auto-fp16-graph"]
SIZES = ["64x64", "180x320", "270x480"]


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 180x320 (LR height x width), got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def floor_bytes(model: msfin_fast.MSFIN, n: int, h: int, w: int, elem: int) -> int:
    """One read and one write of every RRCAB pass's activation, at the network's resolutions."""
    H, W = 4 * h, 4 * w
    total = 0
    for launch in P.build_plan(model).launches:
        if isinstance(launch, P.RRCABPass):
            t = launch.src.t
            total += 2 * n * (H // t.div) * (W // t.div) * t.channels * elem
    return total


def load_model(preset: str, device: str) -> msfin_fast.MSFIN:
    try:
        return msfin_fast.load_pretrained(preset, device=device, allow_download=False)
    except msfin_fast.MSFINError:
        torch.manual_seed(0)  # latency does not depend on the weights' values
        return msfin_fast.MSFIN(preset).to(device).eval()


def build(backend: str, model: msfin_fast.MSFIN):
    """A callable for ``backend`` and the dtype its input takes, or a reason it cannot run here."""
    cuda = model.head.weight.is_cuda
    if backend == "ref-fp32":
        return model.float(), torch.float32
    if backend == "ref-fp16-cl":
        if not cuda:
            return "fp16 convolutions on the CPU are not a serving configuration", None
        import copy

        m = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
        m.check_finite = False
        return (lambda x: m(x.contiguous(memory_format=torch.channels_last))), torch.float16
    if backend == "compile":
        if not cuda:
            return "torch.compile max-autotune targets the GPU", None
        import copy

        m = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
        m.check_finite = False
        return torch.compile(m, mode="max-autotune"), torch.float16
    dtype = torch.float16 if "fp16" in backend else torch.float32
    graphs = backend.endswith("-graph")
    if graphs and not cuda:
        return "CUDA graphs need a GPU", None
    kind = "cuda" if backend.startswith("cuda") else "triton" if backend.startswith("engine") else "auto"
    try:
        engine = msfin_fast.optimize(model, dtype=dtype, backend=kind, cuda_graphs=graphs,
                                     fuse_rrcab="-fused" in backend, conv_kernels="-cudnn" not in backend)
    except msfin_fast.MSFINError as exc:
        return f"cannot run here ({exc})", None
    if engine.backend == "reference":
        return f"engine falls back to the reference here ({engine.fallback_reason})", None
    engine.check_finite = False
    return engine, dtype


def time_it(fn, x: torch.Tensor, warmup: int, iters: int) -> tuple[list[float], int | None]:
    cuda = x.is_cuda
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() if cuda else None
    return times, peak


def environment(device: str, argv: list[str]) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["latency.py"] + argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "msfin_fast": msfin_fast.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def markdown(results: list[dict]) -> str:
    lines = ["| model | LR size | batch | backend | median ms | p10–p90 ms | peak MiB | floor ms | % floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['backend']} | — | skipped: {r['skipped']} | | | |")
            continue
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "—"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch']} | {r['backend']} | {r['median_ms']:.3f} | "
            f"{r['p10_ms']:.3f}–{r['p90_ms']:.3f} | {peak} | {r['floor_ms']:.3f} | {100 * r['floor_ms'] / r['median_ms']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot (pip install matplotlib)", file=sys.stderr)
        return False
    done = [r for r in results if "median_ms" in r]
    groups = sorted({(r["model"], r["batch"]) for r in done})
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 4), squeeze=False)
    for ax, (model, batch) in zip(axes[0], groups):
        rows = [r for r in done if r["model"] == model and r["batch"] == batch]
        sizes = sorted({r["size"] for r in rows}, key=lambda s: parse_size(s)[0] * parse_size(s)[1])
        for backend in dict.fromkeys(r["backend"] for r in rows):
            ys = {r["size"]: r["median_ms"] for r in rows if r["backend"] == backend}
            ax.plot([s for s in sizes if s in ys], [ys[s] for s in sizes if s in ys], marker="o", label=backend)
        floors = {r["size"]: r["floor_ms"] for r in rows}
        ax.plot(sizes, [floors[s] for s in sizes], "k--", label="floor")
        ax.set_yscale("log")
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("LR size")
        ax.set_ylabel("median latency (ms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["msfin-x4", "msfin-s-x4"], choices=list(msfin_fast.PRESETS))
    ap.add_argument("--sizes", nargs="+", type=parse_size, default=None, help=f"LR sizes (default {' '.join(SIZES)})")
    ap.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 8)")
    ap.add_argument("--backends", nargs="+", default=None, choices=BACKENDS)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bandwidth", type=float, default=2.95e12, help="bytes/s the floor assumes (H100 copy)")
    ap.add_argument("--quick", action="store_true",
                    help="defaults to 180x320, batch 1, no torch.compile, 10 iterations")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="file stem for the results (default: latency-<device>-<date>)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.batch = args.sizes or [(180, 320)], args.batch or [1]
        args.iters, args.warmup = min(args.iters, 10), min(args.warmup, 3)
    args.sizes = args.sizes or [parse_size(s) for s in SIZES]
    args.batch = args.batch or [1, 8]
    backends = args.backends or [b for b in BACKENDS if not (args.quick and b == "compile")]
    if any(b < 1 for b in args.batch):
        ap.error("--batch values must be >= 1")

    env = environment(args.device, sys.argv[1:] if argv is None else argv)
    results = []
    for preset in args.models:
        model = load_model(preset, args.device)
        for backend in backends:
            fn, dtype = build(backend, model)
            for h, w in args.sizes:
                for n in args.batch:
                    row = {"model": preset, "size": f"{h}x{w}", "batch": n, "backend": backend}
                    if dtype is None:
                        row["skipped"] = fn
                        results.append(row)
                        print(f"{preset} {h}x{w} b{n} {backend}: skipped ({fn})", flush=True)
                        continue
                    x = (torch.rand(n, 3, h, w, device=args.device) * 255).to(dtype)
                    try:
                        times, peak = time_it(fn, x, args.warmup, args.iters)
                    except torch.cuda.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        results.append(row)
                        torch.cuda.empty_cache()
                        continue
                    elem = 2 if dtype == torch.float16 else 4
                    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
                    row.update(
                        median_ms=statistics.median(times), p10_ms=q[0], p90_ms=q[-1], peak_bytes=peak,
                        floor_ms=floor_bytes(model, n, h, w, elem) / args.bandwidth * 1e3,
                    )
                    results.append(row)
                    print(f"{preset} {h}x{w} b{n} {backend}: {row['median_ms']:.3f} ms", flush=True)
            del fn

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"latency-{args.device}-{env['date'][:10]}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"environment": env, "results": results}, indent=1))
    table = markdown(results)
    (args.out_dir / f"{stem}.md").write_text(
        f"# Latency ({env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']})\n\n"
        f"Command: `python benchmarks/{env['command']}`\n\n{table}"
    )
    plotted = plot(results, args.out_dir / f"{stem}.png")
    print(table)
    print(f"wrote {args.out_dir / stem}.json, .md" + (", .png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
