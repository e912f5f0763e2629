"""One video job, :func:`upscale_video`: the checks, the three stages, the temporary file and its
rename, Ctrl-C and ``keep_partial``; :class:`VideoSummary` says what it did."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ImageReadError, ImageWriteError, InvalidInputError
from .decode import Copy, decode_frames, display_matrix, frame_count, open_input, video_stream
from .encode import copied_streams, open_output, rotation_of
from .options import (
    CONTAINERS,
    DEFAULT_PIX_FMT,
    VIDEO_SUFFIXES,
    EncodeOptions,
    check_frame_size,
    check_frames,
    import_av,
    parse_frames,
)
from .pipeline import Stage, compute, timed
from .summary import VideoSummary


def upscale_video(
    src: str | Path,
    dst: str | Path,
    upscaler=None,
    *,
    codec: str | None = None,
    crf: float | None = None,
    bitrate: str | int | None = None,
    pix_fmt: str = DEFAULT_PIX_FMT,
    preset: str | None = None,
    frames: tuple[int, int | None] | str | None = None,
    batch_size: int = 8,
    queue_size: int = 16,
    pipelined: bool = True,
    keep_partial: bool = False,
    progress: Callable[[int, int | None, bool], None] | None = None,
    on_frame: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> VideoSummary:
    """Upscale the video stream of ``src`` into ``dst`` (.mp4, .mkv, .mov or .webm), copying its
    audio and subtitle streams; returns a :class:`VideoSummary`.

    ``upscaler``: an :class:`~msfin_fast.Upscaler` (its device, dtype, backend, tiles and self-ensemble
    apply to every frame), a preset name, or None for ``"msfin-x4"`` with the defaults.
    ``codec``/``crf``/``bitrate``/``pix_fmt``/``preset``: see :class:`EncodeOptions` (default H.264,
    yuv420p, CRF 18). ``frames``: ``(A, B)`` or ``"A:B"``, frames A up to, not including, B.
    ``batch_size``: frames per model run (on a GPU, one CUDA graph serves all full batches).
    ``queue_size``: frames each queue holds, which bounds memory. ``pipelined=False`` runs the three
    stages one after another in this thread (for measuring what the overlap hides).
    ``progress(done, total, exact)`` is called after each frame is encoded; ``total`` is None when the
    file does not say, and ``exact`` False when it is estimated from the duration.
    ``on_frame(index, lr, sr)`` sees each decoded RGB frame and its upscaled RGB frame before encoding.

    Ctrl-C, like any error, removes the unfinished file; with ``keep_partial`` it is finished and
    kept (playable, the frames done so far), and the exception is raised after, with the summary as
    its ``summary`` attribute.
    """
    av = import_av()
    from ..fileio import commit, temporary_beside
    from ..images import check_writable
    from ..run import BatchRunner
    from ..upscaler import Upscaler

    src, dst = Path(src), Path(dst)
    suffix = dst.suffix.lower()
    if suffix not in CONTAINERS:
        raise InvalidInputError(f"{dst}: a video output must end in {', '.join(VIDEO_SUFFIXES)}")
    if not src.is_file():
        raise InvalidInputError(f"{src}: no such file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InvalidInputError(f"{dst}: would overwrite the input; choose another output name")
    check_writable(dst, image=False)
    if not (isinstance(batch_size, int) and batch_size >= 1 and isinstance(queue_size, int) and queue_size >= 1):
        raise InvalidInputError(f"batch_size and queue_size must be ints >= 1, got {batch_size!r}, {queue_size!r}")
    selection = parse_frames(frames) if isinstance(frames, str) else check_frames(frames)
    codec_name, codec_options, bit_rate = EncodeOptions(codec, crf, bitrate, pix_fmt, preset).resolve(suffix)

    container = open_input(av, src)
    try:
        stream = video_stream(container)
        stream.thread_type = "AUTO"  # FFmpeg's frame and slice threads
        copies = copied_streams(container, stream, CONTAINERS[suffix], dst)
        if upscaler is None or isinstance(upscaler, str):
            upscaler = Upscaler(upscaler or "msfin-x4")
        scale = upscaler.scale
        if getattr(upscaler, "outscale", None) is not None:
            warnings.warn(f"{src.name}: outscale applies to images; the video is upscaled ×{scale}", stacklevel=2)
        cc = stream.codec_context
        if not (cc.width and cc.height):
            raise ImageReadError(f"{src}: the video stream has no frame size")
        total, exact = frame_count(stream)
        if total is not None:
            start, stop = selection
            total = max(0, min(total, stop if stop is not None else total) - start)
        check_frame_size(codec_name, codec_options, bit_rate, pix_fmt, cc.width * scale, cc.height * scale, str(dst))
        matrix = display_matrix(src, stream.index)
        summary = VideoSummary(src, dst, codec_name, size_in=(cc.width, cc.height),
                               size_out=(cc.width * scale, cc.height * scale), copied_streams=len(copies),
                               rotation=rotation_of(matrix))
        try:
            tmp = temporary_beside(dst)
        except OSError as exc:
            raise ImageWriteError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        container.close()
        raise

    runner = BatchRunner(upscaler, graph_cache=2)
    stop_event = threading.Event()
    stages: list[Stage] = []
    out = None
    began = time.perf_counter()
    try:
        try:
            out, ostream, mapped, colour = open_output(av, tmp, suffix, stream, copies, codec_name,
                                                        codec_options, bit_rate, pix_fmt, scale, matrix)
        except av.FFmpegError as exc:
            raise ImageWriteError(f"{dst}: cannot write ({exc})") from None
        time_base = stream.time_base  # the decode stage closes the input when it is done
        timings = summary.timings = {"decode": 0.0, "compute": 0.0, "encode": 0.0}
        decoded = timed(decode_frames(container, stream, copies, selection, summary), timings, "decode")
        if pipelined:
            depth = max(queue_size, batch_size)
            stages.append(Stage("msfin-video-decode", decoded, depth, stop_event))
            computed = compute(iter(stages[0]), runner, upscaler.options, batch_size, timings)
            stages.append(Stage("msfin-video-compute", computed, depth, stop_event))
            items = iter(stages[1])
        else:
            items = compute(decoded, runner, upscaler.options, batch_size, timings)
        try:
            _encode(av, items, out, ostream, mapped, colour, time_base, pix_fmt, summary,
                    lambda: progress(summary.frames, total, exact) if progress is not None else None, on_frame)
        except av.FFmpegError as exc:
            raise ImageWriteError(f"{dst}: encoding or writing failed ({exc})") from None
        finally:
            if not pipelined:
                items.close()
                decoded.close()
        if summary.frames == 0:
            start, stop = selection
            if start or stop is not None:
                raise InvalidInputError(f"{src}: frames {start}:{'' if stop is None else stop} select no frame "
                                        f"(the clip has {summary.decoded} decodable)")
            raise ImageReadError(f"{src}: no decodable video frame"
                                 + (f" ({summary.corrupt_packets} corrupt packets)" if summary.corrupt_packets else ""))
        try:
            out.mux(ostream.encode(None))
            out.close()
        except av.FFmpegError as exc:
            raise ImageWriteError(f"{dst}: encoding or writing failed ({exc})") from None
        out = None
        try:
            commit(tmp, dst)
        except OSError as exc:
            raise ImageWriteError(f"{dst}: cannot write ({exc.strerror or exc})") from None
        summary.seconds = time.perf_counter() - began
        return summary
    except BaseException as exc:
        stop_event.set()
        for stage in stages:
            stage.thread.join(timeout=60)
        if not stages:
            container.close()
        summary.seconds = time.perf_counter() - began
        if isinstance(exc, KeyboardInterrupt):
            summary.interrupted = True
            if keep_partial and out is not None and summary.frames:
                with contextlib.suppress(Exception):
                    out.mux(ostream.encode(None))
                    out.close()
                    out = None
                    commit(tmp, dst)
                    summary.kept_partial = True
            exc.summary = summary
        if out is not None:
            with contextlib.suppress(Exception):
                out.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _encode(av, items, out, ostream, mapped, colour, time_base, pix_fmt: str, summary: VideoSummary,
            progressed, on_frame) -> None:
    """The encode stage, in the caller's thread: each upscaled frame converted back to the output's
    pixel format and colour, encoded with its source timestamp and muxed; each copied packet muxed
    into its mapped stream. ``progressed()`` after each frame."""
    timings = summary.timings
    for item in items:
        t0 = time.perf_counter()
        if isinstance(item, Copy):
            item.packet.stream = mapped[item.packet.stream_index]
            out.mux(item.packet)
            summary.copied_packets += 1
        else:
            if on_frame is not None:
                on_frame(item.index, item.rgb, item.sr)
            vf = colour.convert(av.VideoFrame.from_ndarray(item.sr, format="rgb24"), pix_fmt)
            vf.pts, vf.time_base = item.pts, time_base
            if item.duration:
                vf.duration = item.duration
            vf.color_primaries, vf.color_trc = colour.primaries, colour.trc
            out.mux(ostream.encode(vf))
            summary.frames += 1
            progressed()
        timings["encode"] += time.perf_counter() - t0
