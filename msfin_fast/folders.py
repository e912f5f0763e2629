"""Folder runs: every image (and video) of a folder upscaled into the mirrored paths of another.

The one implementation behind ``msfin-fast upscale -i FOLDER``, :func:`upscale_folder` and the Ray
job planner (:func:`msfin_fast.cluster.plan_job`, which keeps its own execution):

- :func:`plan_folder` lists the inputs (the whole tree with ``recursive``, hidden folders left out),
  mirrors them under the output folder, and refuses what cannot work before any model loads: a
  missing or empty input folder, an output folder that is a file, the input itself or (walking the
  tree) inside it, an output that cannot be written, video encoder settings the installed FFmpeg
  cannot write. It removes temporary files left by killed writers.
- :meth:`FolderPlan.run` (and :func:`upscale_folder`, which plans and runs) upscales each pair with
  an :class:`~msfin_fast.Upscaler`, writing each output atomically and recording it in the output
  folder's manifest (:mod:`msfin_fast.resume`), so a later run with ``skip_existing`` skips what is
  already made with the same settings. A file that cannot be read, run or written is that file's
  failed :class:`FileResult`, never the end of the run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInputError, MSFINError
from .images import DEFAULT_MAX_PIXELS, READ_SUFFIXES, check_output_folder, check_writable, list_files
from .video import VIDEO_SUFFIXES, is_video

#: The keyword arguments of :func:`~msfin_fast.video.upscale_video` that decide a video's encoding
#: (they are what the resume manifest records for a video).
ENCODE_KEYS = ("codec", "crf", "bitrate", "pix_fmt", "preset")


def video_options(video: dict | None, suffixes=()) -> dict:
    """``upscale_video`` keyword arguments (codec, crf, bitrate, pix_fmt, preset, frames, batch_size,
    keep_partial) with their defaults filled in, checked against the installed FFmpeg for each
    output suffix in ``suffixes`` (before any model loads)."""
    from .video import DEFAULT_PIX_FMT, EncodeOptions, check_frames, parse_frames

    given = dict(video or {})
    unknown = set(given) - {*ENCODE_KEYS, "frames", "batch_size", "keep_partial"}
    if unknown:
        raise InvalidInputError(f"unknown video option(s) {', '.join(sorted(unknown))}; use "
                                f"{', '.join(ENCODE_KEYS)}, frames, batch_size or keep_partial")
    options = dict(codec=None, crf=None, bitrate=None, pix_fmt=DEFAULT_PIX_FMT, preset=None, frames=None,
                   batch_size=8, keep_partial=False)
    options.update({k: v for k, v in given.items() if v is not None})
    if isinstance(options["frames"], str):
        options["frames"] = parse_frames(options["frames"])
    elif options["frames"] is not None:
        options["frames"] = check_frames(tuple(options["frames"]))
    for suffix in sorted(suffixes):
        EncodeOptions(**{k: options[k] for k in ENCODE_KEYS}).resolve(suffix)
    return options


def recipe_of_video(options: dict) -> dict:
    """The settings that decide a video output, as the resume manifest records them."""
    return {k: options[k] for k in (*ENCODE_KEYS, "frames")}


@dataclass
class FolderPlan:
    """The (input, output) pairs of a folder run, checked; ``video`` holds the checked
    ``upscale_video`` options when there are videos."""

    src: Path
    dst: Path
    recursive: bool
    pairs: list[tuple[Path, Path]]
    video: dict | None = None

    @property
    def videos(self) -> list[tuple[Path, Path]]:
        return [pair for pair in self.pairs if is_video(pair[0])]

    def run(self, upscaler, *, skip_existing: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
            on_start=None, on_file=None, frame_progress=None, image_progress=None) -> FolderSummary:
        """Upscale every pair with ``upscaler`` (an :class:`~msfin_fast.Upscaler`); see
        :func:`upscale_folder`."""
        from .resume import Manifest, extend, file_stat, plan

        manifest = Manifest(self.dst)
        image_recipe = upscaler.recipe
        video_recipe = None if self.video is None else extend(image_recipe, video=recipe_of_video(self.video))

        def made(path):
            return video_recipe if is_video(path) else image_recipe

        pairs, resumed = self.pairs, None
        if skip_existing:
            resumed = plan(pairs, manifest, made, lambda path: None if is_video(path) else upscaler.output_scale)
            pairs = resumed.todo
        summary = FolderSummary(upscaler.describe(), upscaler.output_scale, todo=len(pairs), resumed=resumed)
        if on_start is not None:
            on_start(summary)
        started = time.perf_counter()
        for src, out in pairs:
            result = run_file(upscaler, src, out, max_pixels=max_pixels, video=self.video,
                              frame_progress=frame_progress, image_progress=image_progress, manifest=manifest,
                              made=made(src), input_stat=file_stat(src))
            summary.add(result)
            if on_file is not None:
                on_file(result)
        summary.seconds = time.perf_counter() - started
        return summary


def check_ext(ext: str | None) -> str | None:
    """An output format as ``--ext`` takes it (``png``, ``.JPG``, ``auto``…) → ``".png"``, or None
    for ``auto``/None (each output keeps its input's format)."""
    if ext is None or str(ext).strip().lower() in ("", "auto"):
        return None
    suffix = "." + str(ext).strip().lower().lstrip(".")
    if suffix not in READ_SUFFIXES:
        raise InvalidInputError(f"--ext {ext!r}: not an image format this package writes; use auto or one of "
                                f"{', '.join(s.lstrip('.') for s in READ_SUFFIXES)}")
    return suffix


def output_name(name: str, suffix: str = "", ext: str | None = None) -> str:
    """The output file name of input ``name``: ``photo.jpg`` with suffix ``x4`` and ext ``png`` →
    ``photo_x4.png`` (Real-ESRGAN's ``{name}_{suffix}.{ext}``). A video keeps its container."""
    path = Path(name)
    stem = f"{path.stem}_{suffix}" if suffix else path.stem
    ext = None if is_video(path) else check_ext(ext)
    return stem + (path.suffix if ext is None else ext)


def plan_folder(src: str | Path, dst: str | Path, *, recursive: bool = False, videos: bool = True,
                video: dict | None = None, suffix: str = "", ext: str | None = None) -> FolderPlan:
    """The checked plan of a folder run: every image (and, with ``videos``, every video) in ``src``
    (its whole tree with ``recursive``) → the same relative path under ``dst``, its name changed by
    ``suffix`` and ``ext`` (:func:`output_name`; two inputs that would write the one output are
    refused). ``video``: the ``upscale_video`` options, checked for each video output's container. Raises
    :class:`~msfin_fast.InvalidInputError` (or ImageWriteError) for what cannot work; removes this
    package's temporary files left in the output folders by writers that are gone, with a warning."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InvalidInputError(f"{src}: not a folder" if src.exists() else f"{src}: no such file or folder")
    suffixes = READ_SUFFIXES + (VIDEO_SUFFIXES if videos else ())
    files = list_files(src, suffixes, recursive=recursive)
    if not files:
        where = f"this folder{' tree' if recursive else ''}"
        if not videos:
            raise InvalidInputError(f"{src}: no images in {where} ({', '.join(READ_SUFFIXES)})")
        raise InvalidInputError(f"{src}: no images ({', '.join(READ_SUFFIXES)}) or videos "
                                f"({', '.join(VIDEO_SUFFIXES)}) in {where}")
    check_output_folder(src, dst, recursive)
    check_ext(ext)
    if suffix and ("/" in suffix or "\\" in suffix):
        raise InvalidInputError(f"--suffix {suffix!r}: a name suffix cannot hold a path separator")
    pairs = [(f, dst / f.relative_to(src).with_name(output_name(f.name, suffix, ext))) for f in files]
    seen: dict[Path, Path] = {}
    for f, out in pairs:
        if out in seen:
            raise InvalidInputError(f"{seen[out]} and {f} would both be written to {out}; give another --ext "
                                    "or move one of them")
        seen[out] = f
    video_outputs = {out.suffix.lower() for f, out in pairs if is_video(f)}
    checked = video_options(video, video_outputs) if video_outputs else None
    for f, out in pairs:
        check_writable(out, image=not is_video(f))
    remove_stale(out.parent for _, out in pairs)
    return FolderPlan(src, dst, recursive, pairs, checked)


def upscale_folder(upscaler, src: str | Path, dst: str | Path, *, recursive: bool = False,
                   skip_existing: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   video: dict | None = None, suffix: str = "", ext: str | None = None, on_start=None,
                   on_file=None, frame_progress=None, image_progress=None) -> FolderSummary:
    """Upscale every image and video in ``src`` (its tree with ``recursive``) into the same relative
    paths under ``dst``, with ``upscaler`` (an :class:`~msfin_fast.Upscaler`); returns a
    :class:`FolderSummary` whose ``results`` hold one :class:`FileResult` per file run.

    The outputs are the CLI's, byte for byte (``msfin-fast upscale -i src -o dst`` runs this).
    ``skip_existing``: skip outputs already made from the same input with the same settings (the
    output folder's manifest); the summary's ``resumed`` says why the rest are redone.
    ``max_pixels``: an image over this many pixels (read from its header) is that file's error.
    ``suffix``/``ext``: output names ``{name}_{suffix}.{ext}`` (:func:`output_name`; default: the
    input's name and format). ``video``: ``upscale_video`` options for the videos (codec, crf, bitrate, pix_fmt, preset,
    frames, batch_size, keep_partial). ``on_start(summary)`` is called once the work is known and
    before it starts, ``on_file(result)`` after each file, ``frame_progress(src)`` may return a
    video's ``progress`` callable (closed after, if it has ``close``), ``image_progress(src)`` an
    image's ``callback(done, total)`` for its tiles (:func:`msfin_fast.tiling.tile_progress`; closed
    after, if it has ``close``). Ctrl-C stops the run; the
    unfinished output is removed (a video with ``keep_partial`` is finished and kept), and the
    KeyboardInterrupt carries ``source`` and ``output`` (and a video's ``summary``).

    >>> from msfin_fast import Upscaler, upscale_folder          # doctest: +SKIP
    >>> upscale_folder(Upscaler("msfin-s-x4"), "photos", "photos_x4").line()  # doctest: +SKIP
    'upscaled 12 images ×4 with msfin-s-x4 on cpu (fp32): 2.95 → 47.19 Mpx in 9.61 s, 4.91 Mpx/s out'
    """
    return plan_folder(src, dst, recursive=recursive, video=video, suffix=suffix, ext=ext).run(
        upscaler, skip_existing=skip_existing, max_pixels=max_pixels, on_start=on_start, on_file=on_file,
        frame_progress=frame_progress, image_progress=image_progress)


@dataclass
class FileResult:
    """One file of a folder run: ``ok`` and ``error`` (its one-line message, "" when ok); the input's
    and output's pixels (w·h; a video's are one frame's) and the seconds it took; ``video`` holds a
    video's :class:`~msfin_fast.VideoSummary`."""

    src: Path
    dst: Path
    ok: bool
    error: str = ""
    in_pixels: int = 0
    out_pixels: int = 0
    seconds: float = 0.0
    video: object | None = None

    @property
    def is_video(self) -> bool:
        return is_video(self.src)


def run_file(upscaler, src: Path, out: Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             video: dict | None = None, frame_progress=None, image_progress=None, manifest=None,
             made: dict | None = None, input_stat=None) -> FileResult:
    """Upscale one image or video file (``video``: its checked :func:`video_options`) into ``out``;
    a failure is the result's ``error``. With a ``manifest``, the output is recorded with ``made``
    (and the input's ``input_stat``, taken before it is read) just before its rename."""
    src, out = Path(src), Path(out)
    started = time.perf_counter()
    try:
        if is_video(src):
            from .video import upscale_video

            bar = None if frame_progress is None else frame_progress(src)
            try:
                summary = upscale_video(src, out, upscaler, progress=bar, **video_options(video))
            finally:
                if bar is not None and hasattr(bar, "close"):
                    bar.close()
            if manifest is not None:
                manifest.record(src, out, made, input_stat=input_stat)
            (w, h), (W, H) = summary.size_in, summary.size_out
            return FileResult(src, out, True, "", w * h, W * H, time.perf_counter() - started, summary)

        def record(tmp):
            manifest.record(src, out, made, tmp, input_stat)

        from .tiling import tile_progress

        bar = None if image_progress is None else image_progress(src)
        try:
            with tile_progress(bar):
                (w, h), (W, H) = upscaler.upscale_file(src, out, max_pixels=max_pixels,
                                                       before_commit=None if manifest is None else record)
        finally:
            if bar is not None and hasattr(bar, "close"):
                bar.close()
        return FileResult(src, out, True, "", w * h, W * H, time.perf_counter() - started)
    except MSFINError as exc:
        return FileResult(src, out, False, str(exc), seconds=time.perf_counter() - started)
    except KeyboardInterrupt as exc:
        exc.source, exc.output = src, out
        raise


def remove_stale(folders) -> list[Path]:
    """Remove this package's temporary files in ``folders`` whose writers are gone, with a warning."""
    from .fileio import remove_stale_parts

    stale = [p for folder in sorted(set(folders)) for p in remove_stale_parts(folder)]
    if stale:
        warnings.warn(f"removed {len(stale)} temporary file(s) left by an interrupted earlier run "
                      f"(e.g. {stale[0]})", stacklevel=2)
    return stale


def images_line(images: int, scale: int, model: str, where: str, in_pixels: int, out_pixels: int,
                seconds: float, failed: int = 0, skipped: int = 0, redone: str = "") -> str:
    """The summary of a run of images, as the CLI prints it for a folder, a file and a Ray job:
    ``upscaled 12 images ×4 with msfin-x4 on cpu (fp32): 2.95 → 47.19 Mpx in 9.61 s, 4.91 Mpx/s out``
    and, when there are any, failures, skipped outputs and why outputs were redone."""
    text = (f"upscaled {images} image{'s' if images != 1 else ''} ×{scale:g} with {model} on {where}: "
            f"{in_pixels / 1e6:.2f} → {out_pixels / 1e6:.2f} Mpx in {seconds:.2f} s, "
            f"{out_pixels / max(seconds, 1e-9) / 1e6:.2f} Mpx/s out")
    if failed:
        text += f"; {failed} failed"
    if skipped:
        text += f"; {skipped} already done (skipped)"
    if redone:
        text += f"; {redone}"
    return text


@dataclass
class FolderSummary:
    """What a folder run did: ``results`` (one per file run, in order), the outputs skipped as
    already made (``resumed``: the :class:`~msfin_fast.resume.ResumePlan`, None without
    ``skip_existing``), and the wall seconds. ``describe`` is the upscaler's ``(model, where)``."""

    describe: tuple[str, str]
    scale: int
    todo: int = 0
    resumed: object | None = None
    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, result: FileResult) -> None:
        self.results.append(result)

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]

    @property
    def images(self) -> list[FileResult]:
        return [r for r in self.results if r.ok and not r.is_video]

    @property
    def videos(self) -> list[FileResult]:
        return [r for r in self.results if r.ok and r.is_video]

    @property
    def skipped(self) -> int:
        return 0 if self.resumed is None else self.resumed.skipped

    def line(self) -> str:
        """The images' summary (each video has its own: ``result.video.line()``)."""
        images = self.images
        model, where = self.describe
        return images_line(len(images), self.scale, model, where, sum(r.in_pixels for r in images),
                           sum(r.out_pixels for r in images), sum(r.seconds for r in images),
                           failed=len(self.failures))


__all__ = ["FileResult", "FolderPlan", "FolderSummary", "check_ext", "images_line", "output_name", "plan_folder",
           "remove_stale", "run_file", "upscale_folder", "video_options"]
