"""Throughput of the Ray batch path against the plain CLI folder run, on the same images, in one run.

    python benchmarks/scale_throughput.py --images 48 --size 64x64 --model msfin-x4 \
        --out-dir benchmarks/results/2026-11-28-cpu --name scale-cpu

Synthesises ``--images`` PNGs, then times, one after the other, in this process:
  cli        ``msfin-fast upscale -i IN -o OUT`` as the CLI runs it (model built, images one by one,
             torch's default threads);
  ray init   starting a local Ray cluster with every CPU (paid once per job, not per image);
  ray ×W     ``msfin_fast.cluster.run_job`` with W workers on that cluster, the CPUs shared
             among them (so each run uses the whole machine), the default batch size.
Each Ray run's wall time counts its actors' start-up and model load; "first row" is when its first
results came back. Writes NAME.md (the table) and NAME.json (rows and environment) to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthesise(folder: Path, count: int, w: int, h: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)  # a picture, not noise
        img.save(folder / f"{i:04d}.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", default="64x64", help="LR width×height")
    p.add_argument("--model", default="msfin-x4")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--name", default="scale-cpu")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))

    import ray
    import torch

    from msfin_fast import __version__
    from msfin_fast.cli import main as cli
    from msfin_fast.cluster import JobOptions, run_job

    cpus = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="msfin-scale-"))
    src = tmp / "in"
    synthesise(src, args.images, w, h)
    out_px = args.images * w * h * 16
    rows = []

    from msfin_fast import Upscaler

    start = time.perf_counter()
    Upscaler(args.model, device="cpu", backend="cpu")  # what the CLI builds before its first image
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    code = cli(["upscale", "-i", str(src), "-o", str(tmp / "cli"), "--model", args.model, "-q"])
    cli_s = time.perf_counter() - start
    assert code == 0, "the CLI run failed"
    rows.append({"run": "cli", "workers": 1, "threads": torch.get_num_threads(), "seconds": cli_s,
                 "first_row": None})
    print(f"cli: {cli_s:.2f} s", flush=True)

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    init_s = time.perf_counter() - start
    print(f"ray init: {init_s:.2f} s", flush=True)
    for workers in args.workers:
        first = []
        options = JobOptions(model=args.model, workers=workers, cpus_per_worker=max(1, cpus // workers),
                             batch_size=args.batch_size)
        start = time.perf_counter()
        summary = run_job(src, tmp / f"ray{workers}", options, progress=False,
                                 on_row=lambda row: first or first.append(time.perf_counter()))
        seconds = time.perf_counter() - start
        assert summary.images == args.images and not summary.failures, summary.failures
        rows.append({"run": f"ray ×{workers}", "workers": workers, "threads": max(1, cpus // workers),
                     "seconds": seconds, "first_row": first[0] - start,
                     "worker_seconds": summary.worker_seconds})
        print(f"ray ×{workers}: {seconds:.2f} s (first row after {first[0] - start:.2f} s)", flush=True)
    ray.shutdown()

    same = {}
    for row in rows[1:]:
        folder = tmp / f"ray{row['workers']}"
        same[row["run"]] = sum((folder / f.name).read_bytes() == f.read_bytes() for f in (tmp / "cli").iterdir())

    lines = [
        f"# Ray batch path against the plain CLI: {args.images} images, {args.model}, {w}×{h} → {4 * w}×{4 * h}",
        "",
        f"`{' '.join(['python', *sys.argv])}`, {time.strftime('%Y-%m-%d')}: "
        f"{cpus} CPUs, python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
        f"msfin_fast {__version__}. One run of each, one after the other, in one process.",
        "",
        "| run | workers × threads | wall s | images/s | out Mpx/s | × CLI | first row after s | "
        "s per image per worker | steady × CLI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cli_per_image = (cli_s - build_s) / args.images
    for row in rows:
        rate = args.images / row["seconds"]
        if row["first_row"] is None:
            first_row, per_image, steady = "—", cli_per_image, 1.0
        else:
            first_row = f"{row['first_row']:.2f}"
            per_image = row["worker_seconds"] / args.images
            steady = cli_per_image * row["workers"] / per_image
        lines.append(
            f"| {row['run']} | {row['workers']} × {row['threads']} | {row['seconds']:.2f} | {rate:.2f} | "
            f"{out_px / row['seconds'] / 1e6:.3f} | {cli_s / row['seconds']:.2f} | "
            f"{first_row} | {per_image:.3f} | {steady:.2f} |")
    lines += [
        "",
        "× CLI is the wall-time ratio of this job. The last two columns leave out what is paid once per "
        "job: a worker's seconds per image are its rows' seconds (decode, model, write), the CLI's are its "
        "wall time less its model build; steady × CLI = workers × CLI s per image / worker s per image, the "
        "ratio a job long enough to hide the start-up tends to.",
    ]
    one = next(r for r in rows if r["run"] == "ray ×1")
    ray_per_image = one["worker_seconds"] / args.images
    startup = one["seconds"] - one["worker_seconds"]
    lines += [
        "",
        f"Starting the local Ray cluster took {init_s:.2f} s (once per job; not in the rows above).",
        f"Ray overhead, 1 worker against the CLI on the same CPUs and threads: "
        f"({one['seconds']:.2f} − {cli_s:.2f}) / {args.images} = {(one['seconds'] - cli_s) / args.images * 1000:.0f} ms "
        "per image over this job. It splits into a fixed part and a part per image:",
        f"- per image: a worker spent {ray_per_image * 1000:.0f} ms on each image (the rows' seconds: decode, "
        f"model, write), the CLI {cli_per_image * 1000:.0f} ms (its wall time less the {build_s:.2f} s model "
        f"build, over {args.images}), so {(ray_per_image - cli_per_image) * 1000:+.0f} ms per image;",
        f"- fixed: {startup:.1f} s of the job's wall time was not spent on images (the worker process and "
        "its imports, the model build, Ray Data's start and the rows' return), once per job.",
        "Per worker the rows sum to " + ", ".join(f"{r['run']} {r['worker_seconds'] / r['workers']:.1f} s"
                                                  for r in rows[1:]) + ".",
        "Outputs byte-identical to the CLI's: " + ", ".join(f"{k} {v}/{args.images}" for k, v in same.items())
        + " (the CLI and a worker with the same number of torch threads give the same bytes; oneDNN's fp32 "
          "convolutions round a few values the other way at another thread count).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{args.name}.md").write_text(text)
        env = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
               "msfin_fast": __version__, "cpus": cpus, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["python", *sys.argv]), "ray_init_seconds": init_s,
               "cli_model_build_seconds": build_s}
        (args.out_dir / f"{args.name}.json").write_text(json.dumps({"env": env, "rows": rows, "same": same},
                                                                   indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
