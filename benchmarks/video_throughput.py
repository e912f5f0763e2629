"""Video throughput: frames per second of ``upscale_video``, pipelined against sequential, in one run.

    python benchmarks/video_throughput.py --size 64x48 --frames 60 \
        --out-dir benchmarks/results/2026-11-29-cpu --name video-cpu
    # on a GPU (the figure the README still waits for):
    python benchmarks/video_throughput.py --device cuda --dtype fp16 --backend auto --size 480x270 \
        --frames 240 --batch 8 --out-dir "$OUT" --name video-gpu

Synthesises a clip (H.264 with AAC audio, 30000/1001 fps) with PyAV, then for each model upscales it
into H.264 CRF 18 ``--repeats`` times in each mode, alternating the modes:
  pipelined   decode, compute and encode in three threads joined by bounded queues (the default);
  sequential  the same three stages, one after another in one thread (``pipelined=False``).
The first run of each model is a warm-up and is not counted. Two measures of what the overlap hides:
  A/B      1 − pipelined / sequential, medians over the runs: the saving a user sees, but it
           includes the run-to-run noise of the machine;
  in-run   1 − wall / (decode + compute + encode) within each pipelined run (median): the share of
           the stages' work that ran while another stage ran, free of run-to-run noise.
The stage times are the pipelined runs' busy seconds per stage (medians; waiting on a queue is not
counted). Writes NAME.md (the table) and NAME.json (every run and the environment) to --out-dir;
``--render NAME.json`` rewrites the table from a saved run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthesise(path: Path, frames: int, w: int, h: int) -> None:
    import av

    rate = Fraction(30000, 1001)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=rate, options={"crf": "18"})
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        a = out.add_stream("aac", rate=48000)
        for i in range(frames):
            rgb = np.stack([128 + 100 * np.sin((x + 2 * i) / 9), 128 + 100 * np.cos((y - i) / 7),
                            255 * (((x - 3 * i) % w) < w / 3)], -1)
            frame = av.VideoFrame.from_ndarray(np.clip(rgb, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts = i
            out.mux(v.encode(frame))
        out.mux(v.encode(None))
        samples = int(frames / rate * 48000)
        wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
        for j in range(0, samples - 1024, 1024):
            af = av.AudioFrame.from_ndarray(wave[None, j:j + 1024], format="fltp", layout="mono")
            af.sample_rate, af.pts = 48000, j
            out.mux(a.encode(af))
        out.mux(a.encode(None))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="64x48", help="LR width×height")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--models", nargs="+", default=["msfin-s-x4", "msfin-x4"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--backend", default=None, help="default: cpu on a CPU, reference on a GPU")
    p.add_argument("--batch", type=int, default=8, help="frames per model run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--name", default="video-cpu")
    p.add_argument("--render", type=Path, default=None, help="print the table of a saved NAME.json and exit")
    args = p.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        print(render(saved["env"], saved["rows"]), end="")
        return 0
    w, h = (int(v) for v in args.size.lower().split("x"))

    import av
    import torch

    from msfin_fast import Upscaler, __version__, upscale_video

    backend = args.backend or ("cpu" if args.device == "cpu" else "reference")
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "msfin_fast": __version__, "torch": torch.__version__, "av": av.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype, "backend": backend, "batch": args.batch, "size": [w, h],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        synthesise(clip, args.frames, w, h)
        for model in args.models:
            up = Upscaler(model, device=args.device, dtype=args.dtype, backend=backend)
            upscale_video(clip, Path(tmp) / "warm.mp4", up, batch_size=args.batch)  # warm-up, not counted
            runs = {True: [], False: []}
            for r in range(args.repeats):
                for pipelined in ((True, False) if r % 2 == 0 else (False, True)):
                    s = upscale_video(clip, Path(tmp) / "out.mp4", up, batch_size=args.batch, pipelined=pipelined)
                    assert s.frames == args.frames, s.line()
                    runs[pipelined].append({"seconds": s.seconds, "fps": s.fps, "stages": s.timings})
                    print(f"{model:<11} {'pipelined ' if pipelined else 'sequential'} {s.seconds:7.2f} s "
                          f"{s.fps:7.2f} fps  {s.timings}", flush=True)
            for run in runs[True]:
                run["in_run_hidden"] = 1 - run["seconds"] / sum(run["stages"].values())
            pipe = statistics.median(x["seconds"] for x in runs[True])
            seq = statistics.median(x["seconds"] for x in runs[False])
            stages = {k: statistics.median(x["stages"][k] for x in runs[True]) for k in runs[True][0]["stages"]}
            rows.append({"model": model, "frames": args.frames, "pipelined_s": pipe, "sequential_s": seq,
                         "pipelined_fps": args.frames / pipe, "sequential_fps": args.frames / seq,
                         "hidden": 1 - pipe / seq, "stages_s": stages, "runs": {"pipelined": runs[True],
                                                                                 "sequential": runs[False]}})
    text = render(env, rows)
    print(text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{args.name}.md").write_text(text)
        (args.out_dir / f"{args.name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


def render(env: dict, rows: list[dict]) -> str:
    w, h = env["size"]
    frames, repeats = rows[0]["frames"], len(rows[0]["runs"]["pipelined"])
    lines = [
        f"# Video throughput, {w}×{h} → {4 * w}×{4 * h}, {frames} frames (H.264 CRF 18, AAC copied)",
        "",
        f"{env['date']}; `{env['command']}`",
        f"msfin_fast {env['msfin_fast']}, torch {env['torch']}, PyAV {env['av']}, python {env['python']}; "
        f"device {env['device']} ({env['dtype']}, backend {env['backend']}, batch {env['batch']}); "
        f"{env['cpu_threads']} torch CPU threads on {env['cpu']}.",
        f"Medians of {repeats} runs per mode, the modes alternating, after one warm-up run.",
        "",
        "| model | pipelined fps | sequential fps | hidden, A/B | hidden, in-run | pipelined s (min–max) "
        "| sequential s (min–max) | decode s | compute s | encode s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["stages_s"]
        pipe = [x["seconds"] for x in r["runs"]["pipelined"]]
        seq = [x["seconds"] for x in r["runs"]["sequential"]]
        in_run = statistics.median(1 - x["seconds"] / sum(x["stages"].values()) for x in r["runs"]["pipelined"])
        lines.append(
            f"| {r['model']} | {r['pipelined_fps']:.2f} | {r['sequential_fps']:.2f} | {100 * r['hidden']:.1f} % "
            f"| {100 * in_run:.1f} % | {r['pipelined_s']:.2f} ({min(pipe):.2f}–{max(pipe):.2f}) "
            f"| {r['sequential_s']:.2f} ({min(seq):.2f}–{max(seq):.2f}) "
            f"| {st.get('decode', 0):.2f} | {st.get('compute', 0):.2f} | {st.get('encode', 0):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
