"""``msfin-fast``: upscale images, evaluate on benchmark sets, show what is installed."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .console import FrameProgress, ImageProgress, Progress, Terminated, stop_signals_interrupt
from .errors import InvalidInputError, MSFINError

PROG = "msfin-fast"


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                      help="float32 (default; the exact reference)")
    prec.add_argument("--fp16", "--half", dest="precision", action="store_const", const="fp16",
                      help="float16 (for GPUs)")
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                      help="bfloat16 (on a CPU, the native kernels store what is added to the residual stream in "
                           "bf16: less memory, within 1 grey level of fp32)")
    p.set_defaults(precision="fp32")
    p.add_argument("--weights", type=Path, default=None,
                   help="your own checkpoint for the preset's architecture instead of the released file")
    from .engine.backends import CHOICES

    p.add_argument("--backend", default=None, choices=CHOICES,
                   help="default: auto on a CPU (native: the C++ CPU kernels, the fastest CPU path, else cpu: "
                        "PyTorch fp32 channels-last; the reference for exact tiles), reference on a GPU; "
                        "triton/cuda: the fused GPU engine (msfin_fast.optimize; not yet verified on a GPU)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tile", type=_positive_int, default=None, metavar="N",
                   help="run N×N LR-pixel tiles instead of the whole image (default: whole image, "
                        "falling back to tiles when it would not fit)")
    p.add_argument("--tile-pad", type=int, default=10, metavar="N",
                   help="LR pixels of context around each plain tile (default 10)")
    p.add_argument("--tile-mode", choices=["plain", "exact"], default="plain",
                   help="plain: fast, channel attention pools per tile; exact: layer by layer, "
                        "the same output as a whole-image run")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the 8 flips/rotations (MSFIN+; 8× the work)")


def _outscale(text: str) -> float:
    """-s as the Upscaler checks it, refused at parse time (exit 2 with the usage)."""
    from .upscaler import check_outscale

    try:
        return check_outscale(text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_help(presets) -> str:
    described = {"msfin-x4": "MSFIN ×4, the default (682k parameters, the better pictures)",
                 "msfin-s-x4": "MSFIN-S ×4 (352k parameters, about 2.5× faster on a CPU)"}
    return "the network: " + "; ".join(f"{name}: {described.get(name, name)}" for name in presets) + \
        ". -n and --model-name (Real-ESRGAN's) are the same flag"


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .images import DEFAULT_MAX_PIXELS
    from .resume import MANIFEST_NAME

    parser = argparse.ArgumentParser(prog=PROG, description="MSFIN ×4 image super-resolution.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("upscale", help="upscale an image file or every image in a folder",
                        description="Upscale an image, a video, or every image and video in a folder. The "
                                    "flags of Real-ESRGAN's inference script work too: -n, -s, -t, --suffix, "
                                    "--ext, --half.")
    up.add_argument("-i", "--input", required=True, type=Path, help="image or video file, or folder")
    up.add_argument("-o", "--output", default=None,  # text: a trailing / says "a folder"
                    help="output folder (default results/), or for one input file an output file name whose "
                         "suffix picks the format. A path that exists as a folder, ends in /, or has no suffix "
                         "is a folder")
    up.add_argument("-n", "--model-name", "--model", dest="model", default="msfin-x4", choices=list(PRESETS),
                    metavar="MODEL", help=_model_help(PRESETS))
    up.add_argument("-s", "--outscale", type=_outscale, default=None, metavar="S",
                    help="output size as a multiple of the input's, any number > 0 (the ×4 result resized with "
                         "Lanczos; default 4). Images only")
    up.add_argument("--suffix", default="", metavar="TEXT",
                    help="output names NAME_TEXT.EXT instead of the input's name (default: no suffix)")
    up.add_argument("--ext", default="auto", metavar="EXT",
                    help="output image format: auto (the input's; default), png, jpg, webp, bmp or tif")
    _add_model_options(up)
    _add_run_options(up)
    up.add_argument("-v", "--verbose", action="store_true",
                    help="with --ray: Ray's own log lines on the terminal (by default they go to its log folder)")
    up.add_argument("-r", "--recursive", action="store_true",
                    help="a folder input: its whole tree, mirrored under the output folder")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary")
    up.add_argument("--skip-existing", action="store_true",
                    help="a folder input: skip the outputs a folder run of this package already made from the "
                         "same input with the same settings (recorded in the output folder's "
                         f"{MANIFEST_NAME}); redo the rest, saying why. --ray always does this")
    up.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                    help="refuse an input image over N pixels (w·h, read from its header, before any work; "
                         f"default {DEFAULT_MAX_PIXELS:,})")
    vid = up.add_argument_group("video files: .mp4, .mkv, .mov, .webm (pip install 'msfin_fast[video]')")
    vid.add_argument("--codec", default=None,
                     help="video encoder: libx264 (h264; default, webm: libvpx-vp9), libx265 (hevc), "
                          "libvpx-vp9 (vp9), libsvtav1 (av1), ffv1, …")
    vid.add_argument("--crf", type=float, default=None,
                     help="constant quality, lower is better (default x264 18, x265 22, VP9/AV1 24)")
    vid.add_argument("--bitrate", default=None, help="target bitrate such as 8M or 2500k, instead of a CRF")
    vid.add_argument("--pix-fmt", default=None, help="output pixel format (default yuv420p)")
    vid.add_argument("--preset", default=None, help="encoder speed preset (x264: ultrafast … veryslow)")
    vid.add_argument("--frames", default=None, metavar="A:B",
                     help="only frames A (from 0) up to, not including, B; A: or :B")
    vid.add_argument("--frame-batch", type=_positive_int, default=None, metavar="N",
                     help="frames per model run; on a GPU one CUDA graph serves them all (default 8)")
    vid.add_argument("--keep-partial", action="store_true",
                     help="on Ctrl-C, finish a playable file of the frames done so far instead of removing it")
    ray = up.add_argument_group("scale-out on Ray (pip install 'msfin_fast[scale]')")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="upscale the folder with a pool of Ray workers: on the cluster at ADDRESS (auto, "
                          "host:port or ray://host:port), else RAY_ADDRESS, else a local one. Outputs "
                          "already made from the same input with the same settings are skipped (as "
                          "--skip-existing), so a rerun resumes a killed job and redoes what a changed model, "
                          "option or input changes")
    ray.add_argument("--workers", type=_positive_int, default=None, help="Ray workers (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                     help="GPUs per worker; fractions share a GPU (default 0: CPU workers)")
    ray.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                     help="CPUs per worker: its torch, decode and encode threads (default: the cluster's "
                          "CPUs shared among CPU workers; 1 per GPU worker)")
    ray.add_argument("--batch-size", type=_positive_int, default=None,
                     help="images per worker call; same-size ones run as one batch on a GPU (default 8)")
    ray.add_argument("--overwrite", action="store_true",
                     help="redo every output, even those already made with the same settings")

    ev = sub.add_parser("eval", help="PSNR/SSIM (Y, paper convention) on HR image folders")
    ev.add_argument("--model", nargs="+", default=["msfin-x4"], choices=[*PRESETS, "bicubic"],
                    help="one or more presets; 'bicubic' is the MATLAB-bicubic baseline")
    ev.add_argument("--data", nargs="+", required=True, type=Path, help="folders of HR images")
    ev.add_argument("--per-image", action="store_true", help="also print every image's scores")
    _add_model_options(ev)
    _add_run_options(ev)

    sv = sub.add_parser("serve", help="HTTP service: POST an image to /upscale, get the ×4 PNG")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--model", default="msfin-x4", choices=list(PRESETS))
    _add_model_options(sv)
    sv.add_argument("--max-batch", type=_positive_int, default=8, help="images per model run (default 8)")
    sv.add_argument("--batch-window-ms", type=float, default=2.0,
                    help="how long the oldest request waits for same-shape company (default 2 ms)")
    sv.add_argument("--max-queue", type=_positive_int, default=64,
                    help="waiting requests before new ones get 503 (default 64)")
    sv.add_argument("--max-body-mb", type=float, default=20.0, help="largest upload in MiB, else 413 (default 20)")
    sv.add_argument("--max-pixels", type=_positive_int, default=2_000_000,
                    help="largest image in LR pixels (w·h), else 400 (default 2,000,000)")
    sv.add_argument("--max-work", type=float, default=16.0, metavar="MPX",
                    help="largest work per request in millions of LR pixel-runs, counting self-ensemble (×8) "
                         "and tile overhead, else 400 (default 16)")
    sv.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                    help="seconds for a connection to deliver a request head, else 408 (default 10)")
    sv.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                    help="seconds to receive a whole body, else 408 (default 60)")
    sv.add_argument("--max-bodies", type=_positive_int, default=16,
                    help="uploads received at once; more wait up to 1 s, then 503 (default 16)")
    sv.add_argument("--max-connections", type=_positive_int, default=512,
                    help="open connections; beyond it requests get 503 (default 512)")
    sv.add_argument("--graph-cache", type=int, default=8,
                    help="captured CUDA graphs kept, one per batch size and shape (default 8; 0: none)")
    sray = sv.add_argument_group("replicated on Ray Serve (pip install 'msfin_fast[scale]')")
    sray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                      help="serve from Ray Serve replicas on the cluster at ADDRESS, else RAY_ADDRESS, else a "
                           "local one; Ray's HTTP proxy listens on --host:--port, and it, not this package, "
                           "holds the connections (--header-timeout and --max-connections do not apply)")
    sray.add_argument("--replicas", type=_positive_int, default=None, help="replicas (default 1)")
    sray.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                      help="GPUs per replica (default 0: CPU replicas)")
    sray.add_argument("--cpus-per-replica", type=float, default=None, metavar="C",
                      help="CPUs per replica (default 1)")

    ex = sub.add_parser("export", help="write the model as an ONNX file (ONNX Runtime, TensorRT, chaiNNer)")
    ex.add_argument("output", type=Path, help="the .onnx file to write")
    ex.add_argument("--model", default="msfin-x4", choices=list(PRESETS))
    ex.add_argument("--weights", type=Path, default=None,
                    help="your own checkpoint for the preset's architecture instead of the released file")
    exp = ex.add_mutually_exclusive_group()
    exp.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="float32 graph (default)")
    exp.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                     help="float16 graph, fp16 input and output; the channel-attention means stay in fp32")
    ex.set_defaults(precision="fp32")
    ex.add_argument("--range", dest="value_range", type=float, choices=[255.0, 1.0], default=255.0,
                    help="pixel scale of input and output: 255 (default, the model's own) or 1 (0–1 images)")
    ex.add_argument("--static", default=None, metavar="NxHxW",
                    help="fix the input shape, e.g. 1x270x480 (default: dynamic batch, height and width)")
    ex.add_argument("--opset", type=int, default=None,
                    help="ONNX opset (default 20; 18 up to the newest the installed onnx knows)")

    sub.add_parser("info", help="presets, weights, devices and backends")

    sm = sub.add_parser("sample", help="write a synthetic low-resolution test picture")
    sm.add_argument("output", type=Path, help="where to write it (png, jpg, bmp, webp, tif)")
    sm.add_argument("--size", type=int, default=128, help="width and height in pixels (default 128)")

    _add_train_parser(sub, PRESETS)
    return parser


def _make_upscaler(model: str, args):
    from .upscaler import Upscaler

    return Upscaler(model, device=args.device, dtype=args.precision, weights=args.weights,
                    tile=args.tile, tile_pad=args.tile_pad, tile_mode=args.tile_mode,
                    self_ensemble=args.self_ensemble, backend=args.backend,
                    outscale=getattr(args, "outscale", None))


VIDEO_OPTIONS = ("codec", "crf", "bitrate", "pix_fmt", "preset", "frames", "frame_batch", "keep_partial")
RAY_UPSCALE_OPTIONS = ("workers", "gpus_per_worker", "cpus_per_worker", "batch_size", "overwrite")
RAY_SERVE_OPTIONS = ("replicas", "gpus_per_replica", "cpus_per_replica")


def _worker_weights(args) -> str | None:
    """--weights as an absolute path: Ray workers and replicas do not share the driver's directory."""
    return None if args.weights is None else str(args.weights.resolve())


def _given(args, names) -> list[str]:
    """The flags among ``names`` given on the command line."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False)]


def _ray_only(args, names) -> None:
    given = _given(args, names)
    if given and args.ray is None:
        raise InvalidInputError(f"{', '.join(given)} only apply with --ray")


def _ray_upscale(args) -> int:
    from .cluster import JobOptions, run_job
    from .run import RunOptions
    from .video import list_video_files

    if not args.input.is_dir():
        raise InvalidInputError(f"{args.input}: --ray upscales a folder; for one file leave out --ray")
    given = _given(args, VIDEO_OPTIONS)
    if given:
        raise InvalidInputError(f"{', '.join(given)} apply to videos, which --ray does not upscale")
    if args.outscale is not None:
        raise InvalidInputError("-s/--outscale does not apply with --ray yet; run without --ray")
    videos = list_video_files(args.input, args.recursive)
    if videos:
        warnings.warn(f"{len(videos)} video file(s) in {args.input} are left out (e.g. {videos[0].name}): --ray "
                      "upscales images; run without --ray for the videos")
    options = JobOptions(
        model=args.model, dtype=args.precision, backend=args.backend, device=args.device,
        weights=_worker_weights(args), run=RunOptions(args.tile, args.tile_pad, args.tile_mode, args.self_ensemble),
        workers=args.workers or 1, gpus_per_worker=args.gpus_per_worker or 0,
        cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size or 8, max_pixels=args.max_pixels,
        suffix=args.suffix, ext=args.ext, verbose=args.verbose,
    )

    def report(row) -> None:
        if not row["ok"]:
            _error(row["error"])

    summary = run_job(args.input, args.output, options, address=args.ray or None, recursive=args.recursive,
                      overwrite=args.overwrite, progress=not args.quiet, on_row=report)
    if not args.quiet:
        print(summary.line())
    return 1 if summary.failures else 0


def _video_args(args) -> dict:
    """upscale_video's keyword arguments from the command line (checked by the folder plan or by
    ``folders.video_options`` for each output's container, before any model loads)."""
    return dict(codec=args.codec, crf=args.crf, bitrate=args.bitrate, pix_fmt=args.pix_fmt, preset=args.preset,
                frames=args.frames, batch_size=args.frame_batch, keep_partial=args.keep_partial)


def _say_partial(exc: KeyboardInterrupt, video: dict | None) -> None:
    """After Ctrl-C in a video: whether a playable partial file was kept."""
    from .video import is_video

    source = getattr(exc, "source", None)
    if source is None or not is_video(source):
        return
    summary = getattr(exc, "summary", None)
    if summary is not None and summary.kept_partial:
        print(f"{PROG}: kept a playable partial file {exc.output} ({summary.frames} frames)", file=sys.stderr)
    elif (video or {}).get("keep_partial"):
        print(f"{PROG}: interrupted before any frame of {source.name} was encoded; no partial file to keep",
              file=sys.stderr)


DEFAULT_OUTPUT = Path("results")  # as Real-ESRGAN's inference script


def _is_folder_target(text: str, path: Path) -> bool:
    """-o names a folder: it is one, it ends in a separator, or it has no suffix (no file format)."""
    return path.is_dir() or text.endswith(("/", os.sep)) or not path.suffix


def _single_output(args, text: str | None, src: Path) -> Path:
    """The output file of one input file: -o itself (``text`` as given) when it is a file name, else
    the input's name (with --suffix and --ext) in the -o folder (default results/), made if need be."""
    from .folders import check_ext, output_name

    ext = check_ext(args.ext)
    if args.output is not None and not _is_folder_target(text, args.output):
        dst = args.output
        if args.suffix:
            raise InvalidInputError(f"--suffix names outputs in a folder; -o {dst} is a file name "
                                    "(give a folder, or put the suffix in the name)")
        if ext is not None and dst.suffix.lower() != ext:
            raise InvalidInputError(f"--ext {args.ext} contradicts -o {dst}; its suffix picks the format")
        return dst
    folder = args.output if args.output is not None else DEFAULT_OUTPUT
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"{folder}: is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / output_name(src.name, args.suffix, ext)


def cmd_upscale(args) -> int:
    from .folders import FolderSummary, plan_folder, remove_stale, run_file, video_options
    from .images import check_writable
    from .video import VIDEO_SUFFIXES, is_video

    src, text = args.input, args.output
    args.output = None if text is None else Path(text)
    _ray_only(args, RAY_UPSCALE_OPTIONS)
    if args.skip_existing and args.overwrite:
        raise InvalidInputError("--skip-existing and --overwrite contradict each other; give one")
    if not src.exists():
        raise InvalidInputError(f"{src}: no such file or folder")
    if args.skip_existing and not src.is_dir():
        raise InvalidInputError(f"--skip-existing applies to a folder run; {src} is a file")
    if args.ray is not None:
        if args.output is None:
            args.output = DEFAULT_OUTPUT
        return _ray_upscale(args)
    given, video = _given(args, VIDEO_OPTIONS), _video_args(args)
    plan = None
    if src.is_dir():
        dst = args.output if args.output is not None else DEFAULT_OUTPUT
        # checks everything, before the model loads
        plan = plan_folder(src, dst, recursive=args.recursive, video=video, suffix=args.suffix, ext=args.ext)
        any_video, video = bool(plan.videos), plan.video
    else:
        dst = _single_output(args, text, src)
        if dst.resolve() == src.resolve():
            raise InvalidInputError(f"{dst}: would overwrite the input; choose another output name")
        any_video = is_video(src)
        if any_video != is_video(dst):
            kind = "a video" if any_video else "an image"
            raise InvalidInputError(f"{dst}: {src} is {kind}, so the output must be one too "
                                    f"(videos: {', '.join(VIDEO_SUFFIXES)})")
    if given and not any_video:
        raise InvalidInputError(f"{', '.join(given)} only apply to videos ({', '.join(VIDEO_SUFFIXES)})")
    if args.outscale is not None and any_video and (plan is None or len(plan.videos) == len(plan.pairs)):
        raise InvalidInputError("-s/--outscale applies to images; videos are upscaled ×4")
    if plan is None:
        video = video_options(video, {dst.suffix.lower()}) if any_video else None
        check_writable(dst, image=not any_video)
        remove_stale([dst.parent])

    upscaler = _make_upscaler(args.model, args)
    frames = None if args.quiet else (lambda path: FrameProgress(path.name))
    tiles = None if args.quiet else (lambda path: ImageProgress(path.name))
    progress = Progress(0, enabled=False)

    def start(summary) -> None:
        nonlocal progress
        if args.skip_existing and not args.quiet:
            print(summary.resumed.line(), flush=True)
        progress = Progress(summary.todo, enabled=summary.todo > 1 and not args.quiet)

    def done(result) -> None:
        if not result.ok:
            _error(result.error)
        elif result.video is not None and not args.quiet:
            print(result.video.line())
        progress.step(result.src.name)

    try:
        if plan is not None:
            summary = plan.run(upscaler, skip_existing=args.skip_existing, max_pixels=args.max_pixels,
                               on_start=start, on_file=done, frame_progress=frames, image_progress=tiles)
            results, line = summary.results, summary.line()
        else:
            result = run_file(upscaler, src, dst, max_pixels=args.max_pixels, video=video, frame_progress=frames,
                              image_progress=tiles)
            if not result.ok:
                _error(result.error)
                return 1
            done(result)
            summary = FolderSummary(upscaler.describe(), upscaler.output_scale, todo=1, results=[result])
            results, line = summary.results, summary.line()
    except KeyboardInterrupt as exc:
        _say_partial(exc, video)
        raise
    if not args.quiet and any(not r.is_video for r in results):
        print(line)
    return 1 if any(not r.ok for r in results) else 0


def cmd_eval(args) -> int:
    from .evaluate import bicubic_upscaler, evaluate_folder

    for folder in args.data:
        if not folder.is_dir():
            raise InvalidInputError(f"{folder}: not a folder of HR images")
    rows = []
    for model in args.model:
        if model == "bicubic":
            upscale, scale = bicubic_upscaler(4), 4
        else:
            upscaler = _make_upscaler(model, args)
            upscale, scale = upscaler.upscale_rgb, upscaler.scale
        for folder in args.data:
            def show(score, model=model, folder=folder):
                if args.per_image:
                    print(f"  {model:<11} {folder.name:<10} {score.name:<16} "
                          f"{score.psnr:8.4f}  {score.ssim:.4f}", flush=True)

            result = evaluate_folder(upscale, folder, scale, on_image=show)
            rows.append((model + ("+" if args.self_ensemble and model != "bicubic" else ""), result))
    print(f"{'model':<11}  {'set':<10} {'images':>6}  {'PSNR (dB)':>9}  {'SSIM':>6}  {'seconds':>7}")
    for model, r in rows:
        print(f"{model:<11}  {r.name:<10} {len(r.images):>6}  {r.psnr:>9.4f}  {r.ssim:>6.4f}  {r.seconds:>7.1f}")
    print("Y of BT.601, ×4, HR cropped to a multiple of 4, LR by MATLAB bicubic, 4-pixel shave.")
    return 0


def cmd_info(args) -> int:
    import platform

    import torch

    from .engine import statuses
    from .config import PRESETS
    from .model import MSFIN
    from .weights import REGISTRY, candidate_paths, locate, sha256_of

    print(f"msfin_fast {__version__}  (python {platform.python_version()}, torch {torch.__version__})")
    print("presets:")
    for name, c in PRESETS.items():
        params = sum(p.numel() for p in MSFIN(c).parameters())
        print(f"  {name:<11} ×{c.scale}  n_feats {c.n_feats}  groups {c.groups}  reduction {c.reduction}  "
              f"num_steps {c.num_steps}  {params:,} parameters")
    print("weights:")
    for name, entry in REGISTRY.items():
        path = locate(name)
        if path is None:
            looked = ", ".join(str(p) for _, p in candidate_paths(name))
            print(f"  {name:<11} not found locally (looked in {looked}); downloads from {entry.url}")
        else:
            ok = "SHA-256 ok" if sha256_of(path) == entry.sha256 else "SHA-256 MISMATCH (corrupt?)"
            print(f"  {name:<11} {path} ({ok})")
    print("backends:")
    for b in statuses():
        print(f"  {b.name:<20} {'yes' if b.available else 'no ':<4} {b.detail}")
    try:
        import av

        print(f"video: PyAV {av.__version__}, FFmpeg {av.ffmpeg_version_info}")
    except ImportError:
        print("video: not installed (pip install 'msfin_fast[video]')")
    for label, modules, extra in (("onnx export", ("onnx", "onnxscript", "onnxruntime"), "onnx"),
                                  ("16-bit colour images", ("cv2",), "image16")):
        versions = _versions(modules)
        print(f"{label}: " + (", ".join(versions) if versions else f"not installed (pip install 'msfin_fast[{extra}]')"))
    return 0


def _versions(modules: tuple[str, ...]) -> list[str] | None:
    """``name version`` for each module, or None when one of them is missing."""
    import importlib

    found = []
    for name in modules:
        try:
            found.append(f"{'OpenCV' if name == 'cv2' else name} {importlib.import_module(name).__version__}")
        except ImportError:
            return None
    return found


def _parse_static(spec: str) -> tuple[int, int, int]:
    parts = spec.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise InvalidInputError(f"--static {spec!r}: expected NxHxW with positive integers, e.g. 1x270x480")
    n, h, w = (int(p) for p in parts)
    return n, h, w


def cmd_export(args) -> int:
    from .export import DEFAULT_OPSET, export_onnx
    from .weights import load_pretrained

    if args.output.suffix.lower() != ".onnx":
        raise InvalidInputError(f"{args.output}: the output of export is an ONNX file; name it *.onnx")
    shape = _parse_static(args.static) if args.static else None
    model = load_pretrained(args.model, weights=args.weights)
    started = time.perf_counter()
    path = export_onnx(
        model, args.output, dynamic=shape is None, dtype=args.precision, value_range=args.value_range,
        input_size=(shape[1], shape[2]) if shape else (64, 64), batch=shape[0] if shape else 1,
        opset=args.opset if args.opset is not None else DEFAULT_OPSET,
    )
    dims = "x".join(map(str, shape)) if shape else "dynamic batch, height, width"
    print(f"wrote {path} ({args.model}, {args.precision}, {dims}, pixels 0–{args.value_range:g}, "
          f"{path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s; checker passed)")
    return 0


def cmd_sample(args) -> int:
    from .images import write_image
    from .pictures import Picture
    from .sample import sample_lr

    if not 16 <= args.size <= 4096:
        raise InvalidInputError(f"--size {args.size} is out of range (16 to 4096)")
    write_image(args.output, Picture(sample_lr(args.size)))
    print(f"wrote {args.output} ({args.size}×{args.size}, synthetic low-resolution test picture)")
    return 0


def _add_train_parser(sub, presets) -> None:
    # Defaults are None so that --resume can tell what was given; TrainConfig holds the real ones.
    tr = sub.add_parser("train", help="train or fine-tune on a folder of HR images (the paper's recipe)")
    tr.add_argument("--data", type=Path, metavar="DIR", help="folder of HR training images (needed for a new run)")
    tr.add_argument("--out", required=True, type=Path, metavar="DIR",
                    help="run folder: model.pt, model_best.pt, train_state.pt, log.csv, lr_cache/")
    tr.add_argument("--steps", type=int, metavar="N", help="optimiser steps of the whole run (needed for a new run)")
    tr.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    tr.add_argument("--model", choices=list(presets), help="architecture (default msfin-x4)")
    tr.add_argument("--scale", type=int, metavar="S", help="any integer scale (default 4)")
    tr.add_argument("--patch", type=int, metavar="N", help="LR patch side (default 48)")
    tr.add_argument("--batch", type=int, metavar="N", dest="batch_size", help="patches per step (default 16)")
    tr.add_argument("--lr", type=float, help="initial learning rate (default 1e-4)")
    tr.add_argument("--lr-min", type=float, help="final learning rate of the cosine (default 6.25e-6)")
    tr.add_argument("--seed", type=int, help="initial weights and patch stream (default 0)")
    init = tr.add_mutually_exclusive_group()
    init.add_argument("--from-pretrained", action="store_const", const=True,
                      help="start from the preset's released ×4 weights")
    init.add_argument("--init-weights", type=Path, metavar="FILE", help="start from this checkpoint")
    tr.add_argument("--val", type=Path, metavar="DIR", dest="val_data", help="folder of HR images for validation PSNR")
    tr.add_argument("--val-every", type=int, metavar="N", help="steps between validations (default 1000)")
    tr.add_argument("--save-every", type=int, metavar="N", help="steps between checkpoints (default 1000)")
    tr.add_argument("--log-every", type=int, metavar="N", help="steps per log.csv row (default 100)")
    tr.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    tr.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto (default): bf16 or fp16 autocast on CUDA, fp32 on the CPU")
    tr.add_argument("--workers", type=int, metavar="N", dest="num_workers", help="data-loader processes (default 4)")
    tr.add_argument("--cache", type=Path, metavar="DIR", dest="cache_dir", help="HR/LR cache folder (default OUT/lr_cache)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def cmd_train(args) -> int:
    from .train import TrainConfig, open_run

    options = {name: getattr(args, name, None) for name in TrainConfig.__dataclass_fields__ if name != "out"}
    if not args.resume:
        missing = [flag for flag, name in (("--data", "data"), ("--steps", "steps")) if options[name] is None]
        if missing:
            raise InvalidInputError(f"{' and '.join(missing)} needed to start a run (or --resume one in --out)")
    with open_run(args.out, resume=args.resume, progress=not args.quiet, **options) as trainer:
        summary = trainer.run()
    cfg = trainer.config
    line = (f"trained {cfg.model} ×{cfg.scale} to step {summary.step}/{summary.steps} on {trainer.device} "
            f"({trainer.precision}) in {summary.seconds:.1f} s")
    if summary.loss is not None:
        line += f"; loss {summary.loss:.4f}"
    if summary.best_psnr is not None:
        line += f"; val PSNR {summary.val_psnr:.3f} dB (best {summary.best_psnr:.3f})"
    print(line + f"; weights {summary.model_path}")
    if summary.interrupted:
        print(f"{PROG}: interrupted; checkpoint saved, continue with: {PROG} train --out {args.out} --resume",
              file=sys.stderr)
        return 128 + int(getattr(trainer, "stop_signal", None) or signal.SIGINT)
    return 0


def cmd_serve(args) -> int:
    from .server import Limits, make_server
    from .serving import ServingUpscaler

    if not 0 <= args.port <= 65535:
        raise InvalidInputError(f"--port {args.port} is out of range (0 to 65535)")
    if args.batch_window_ms < 0 or args.max_body_mb <= 0 or args.graph_cache < 0:
        raise InvalidInputError("--batch-window-ms and --graph-cache must be >= 0 and --max-body-mb > 0")
    limits = Limits(max_body=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                    max_work=args.max_work * 1e6, header_timeout=args.header_timeout,
                    body_timeout=args.body_timeout, max_bodies=args.max_bodies,
                    max_connections=args.max_connections)
    _ray_only(args, RAY_SERVE_OPTIONS)
    if args.ray is not None:
        return _ray_serve(args, limits)
    upscaler = ServingUpscaler(
        args.model, device=args.device, dtype=args.precision, weights=args.weights,
        max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000, max_queue=args.max_queue,
        graph_cache=args.graph_cache, backend=args.backend,
    )
    server = make_server(upscaler, args.host, args.port, limits)
    print(f"serving {args.model} on {upscaler.device} ({args.precision}) at http://{args.host}:{args.port} "
          "(POST /upscale, GET /healthz, GET /metrics)", flush=True)
    try:
        server.run()
    finally:
        upscaler.close()
    return 0


def _ray_serve(args, limits) -> int:
    from .cluster import ServiceOptions, ray_session, run_service

    options = ServiceOptions(
        model=args.model, dtype=args.precision, backend=args.backend, device=args.device,
        weights=_worker_weights(args),
        replicas=args.replicas or 1, gpus_per_replica=args.gpus_per_replica or 0,
        cpus_per_replica=1 if args.cpus_per_replica is None else args.cpus_per_replica,
        max_batch=args.max_batch, batch_window=args.batch_window_ms / 1000, max_queue=args.max_queue,
        graph_cache=args.graph_cache,
    )
    with ray_session(args.ray or None):  # MSFINError naming the extra when Ray is missing
        from ray import serve

        run_service(options, limits, host=args.host, port=args.port, blocking=False)
        print(f"serving {args.model} from {options.replicas} Ray Serve replica{'s' if options.replicas != 1 else ''} "
              f"({args.precision}) at http://{args.host}:{args.port} (POST /upscale, GET /healthz, GET /metrics); "
              "Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the service stops, as msfin-fast serve does
            print(f"{PROG}: stopping the service", file=sys.stderr)
        finally:
            serve.delete("msfin")
    return 0


COMMANDS = {"upscale": cmd_upscale, "eval": cmd_eval, "info": cmd_info, "sample": cmd_sample,
            "serve": cmd_serve, "train": cmd_train, "export": cmd_export}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed; an unknown flag is reported with its command's usage (``msfin-fast
    upscale --bogus`` shows ``upscale``'s, not the top-level one), exit status 2."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


PACKAGE_DIR = Path(__file__).resolve().parent


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The package's own warnings as ``msfin-fast: warning: …``; any other library's (Ray's, torch's)
    in Python's usual form, so that nobody takes them for this package's."""
    try:
        ours = Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError, TypeError):
        ours = False
    if ours:
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with warnings.catch_warnings(), stop_signals_interrupt():
        # every warning of this package, each time; other libraries' as Python's filters have them
        warnings.filterwarnings("always", module=r"msfin_fast(\.|$)")
        warnings.showwarning = _show_warning
        try:
            return COMMANDS[args.command](args)
        except MSFINError as exc:
            _error(str(exc))
            return 1
        except MemoryError:
            _error("out of memory; try a smaller image or another device")
            return 1
        except Terminated as exc:
            print(f"{PROG}: terminated", file=sys.stderr)
            return 128 + exc.signum
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                _error(f"out of memory ({str(exc).splitlines()[0][:120]}); "
                       "try a smaller image, --fp16 on a GPU, or --device cpu")
                return 1
            raise


if __name__ == "__main__":
    sys.exit(main())
