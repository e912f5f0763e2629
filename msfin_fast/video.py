"""Video files: decode → upscale → encode, with PyAV (FFmpeg in-process; ``pip install 'msfin_fast[video]'``).

Three stages joined by bounded queues, so that decoding and encoding overlap the model and memory
stays bounded whatever the clip's length:

  decode   (a thread)  demuxes, decodes the video stream with FFmpeg's own threads, converts each
                       frame to RGB with the stream's colour matrix and range; audio and subtitle
                       packets pass along untouched, in file order;
  compute  (a thread)  batches same-size frames through a :class:`~.run.BatchRunner`: on a GPU one
                       captured CUDA graph and pinned copies serve the whole clip; on a CPU the frames
                       run one at a time, exactly as ``Upscaler.upscale_rgb`` runs them;
  encode   (the caller's thread) converts back to the output pixel format and colour matrix, encodes,
                       and muxes the copied packets beside the video.

Every frame keeps its source timestamp, duration and time base, so variable frame rate survives and
no frame is dropped or repeated. Audio and subtitle streams are copied packet for packet. Colour tags
(primaries, transfer, matrix, range), the sample aspect ratio and the display matrix (a phone's
portrait rotation) are carried over. The encoder is opened with the output's settings and frame
size before any frame is decoded, so a size or option it refuses fails first, not last.

The file is written beside the target under a temporary name and renamed when complete. Ctrl-C (or
any error) removes it, unless ``keep_partial`` asks for a playable file of the frames done so far.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import ImageReadError, ImageWriteError, InvalidInputError, NonFiniteOutputError
from .run import non_finite_error

# Output container by suffix (FFmpeg muxer name), and the video codec each gets by default.
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
VIDEO_SUFFIXES = tuple(CONTAINERS)
DEFAULT_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}
CODEC_ALIASES = {"h264": "libx264", "x264": "libx264", "avc": "libx264", "h265": "libx265", "hevc": "libx265",
                 "x265": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}
# Encoders with a constant-quality (CRF) mode: (lowest, highest, default). The defaults look alike:
# x264 18 is "visually lossless"; x265 and VP9/AV1 reach that at higher numbers.
CRF_CODECS = {"libx264": (0, 51, 18), "libx265": (0, 51, 22), "libvpx-vp9": (0, 63, 24),
              "libsvtav1": (0, 63, 24)}
DEFAULT_PIX_FMT = "yuv420p"
# The speed presets of the encoders users name most, checked before FFmpeg sees them (x264 prints
# its own complaint on stderr); any other encoder's options are checked by opening it.
_X26X_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                 "placebo")
ENCODER_PRESETS = {"libx264": _X26X_PRESETS, "libx265": _X26X_PRESETS,
                   "libsvtav1": tuple(str(i) for i in range(-1, 14)), "libvpx-vp9": tuple(str(i) for i in range(-8, 9))}
# After the last selected frame, packets of the copied streams are still read this far (seconds):
# muxers interleave streams within a second or so, so their packets up to the cut have arrived.
_TAIL_SECONDS = 10.0
# The RGB ↔ YUV matrices swscale knows, by FFmpeg's AVColorSpace number; anything else (2,
# unspecified, among them) is converted with BT.601, swscale's default, and tagged so.
_SWS_MATRIX = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "SMPTE170M", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}
_BT601 = 6  # AVCOL_SPC_SMPTE170M
_RANGE_MPEG, _RANGE_JPEG = 1, 2


@contextlib.contextmanager
def _ffmpeg_messages():
    """FFmpeg's log lines of the block (level, source, text) instead of on stderr."""
    import av.logging

    previous = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture() as lines:
            yield lines
    finally:
        av.logging.set_level(previous)


def _ffmpeg_said(exc: BaseException, lines) -> str:
    said = "; ".join(text.strip() for _, _, text in lines if text.strip())
    return said or str(exc)


@functools.lru_cache(maxsize=64)
def _probe_muxer(out_format: str, codec: str, options: tuple, bit_rate: int | None, pix_fmt: str) -> str | None:
    """None when FFmpeg opens ``codec`` with these settings (64×64 frames) and writes the header of
    an ``out_format`` file holding it (to nowhere), else what FFmpeg said."""
    av = _av()
    with _ffmpeg_messages() as lines:
        out = av.open(os.devnull, "w", format=out_format)
        try:
            stream = out.add_stream(codec, rate=25, options=dict(options))
            stream.width, stream.height, stream.pix_fmt = 64, 64, pix_fmt
            if bit_rate is not None:
                stream.codec_context.bit_rate = bit_rate
            out.start_encoding()  # opens the encoder, writes the container's header
            return None
        except (av.FFmpegError, ValueError) as exc:
            return _ffmpeg_said(exc, lines)
        finally:
            with contextlib.suppress(Exception):
                out.close()


def check_frame_size(codec: str, options: dict, bit_rate: int | None, pix_fmt: str, width: int, height: int,
                     label: str) -> None:
    """Open the encoder at the output's frame size (no frame is encoded) and refuse, before any
    work, a size it does not take (H.264 above 16384 wide or 8192² in all, odd sizes for 4:2:0, …)."""
    from fractions import Fraction

    av = _av()
    with _ffmpeg_messages() as lines:
        try:
            cc = av.CodecContext.create(codec, "w")
            cc.width, cc.height, cc.pix_fmt = width, height, pix_fmt
            cc.time_base, cc.framerate = Fraction(1, 25), Fraction(25)
            if bit_rate is not None:
                cc.bit_rate = bit_rate
            cc.options = dict(options)
            cc.open()  # freed with the object
        except (av.FFmpegError, ValueError) as exc:
            raise InvalidInputError(
                f"{label}: {codec} cannot encode {width}×{height} frames ({_ffmpeg_said(exc, lines)}); "
                "choose another codec (--codec libx265, libsvtav1 or ffv1 take larger frames) or a part of "
                "the picture") from None


@functools.lru_cache(maxsize=None)
def _supported_codecs(out_format: str) -> frozenset[str]:
    """The codec and encoder names FFmpeg's muxer ``out_format`` can hold."""
    probe = _av().open(os.devnull, "w", format=out_format)
    try:
        return frozenset(probe.supported_codecs)
    finally:
        probe.close()


def _av():
    try:
        import av
    except ImportError:
        raise InvalidInputError("video needs PyAV: pip install 'msfin_fast[video]'") from None
    return av


def is_video(path: str | Path) -> bool:
    """Whether the CLI treats ``path`` as a video (by suffix: mp4, mkv, mov, webm)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def list_video_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Video files (by suffix) in ``folder``, as :func:`~.images.list_files` lists them."""
    from .images import list_files

    return list_files(folder, VIDEO_SUFFIXES, recursive)


# ---------------------------------------------------------------------------------------------
# Options


def parse_frames(text: str) -> tuple[int, int | None]:
    """``"A:B"`` → (A, B): frames A (from 0) up to, not including, B; ``"A:"`` to the end, ``":B"``
    from the start."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else 0
        stop = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise InvalidInputError(f"frames {text!r}: expected A:B (frame numbers from 0, B not included), "
                                "A: or :B") from None
    return check_frames((start, stop))


def check_frames(frames: tuple[int, int | None] | None) -> tuple[int, int | None]:
    if frames is None:
        return 0, None
    start, stop = frames
    if start < 0 or (stop is not None and stop <= start):
        raise InvalidInputError(f"frames {start}:{'' if stop is None else stop} selects nothing; "
                                "need 0 <= A < B")
    return start, stop


def _parse_bitrate(value) -> int:
    text = str(value).strip().lower()
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:], 1)
    try:
        bits = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        bits = -1
    if not bits >= 1000:
        raise InvalidInputError(f"bitrate {value!r}: expected bits per second such as 8M, 2500k or 800000 "
                                "(at least 1k)")
    return int(bits)


@dataclass(frozen=True)
class EncodeOptions:
    """How the upscaled video is encoded. ``codec=None`` picks by container (H.264 for mp4, mov and
    mkv; VP9 for webm). ``crf`` and ``bitrate`` are exclusive; with neither, a CRF codec gets its
    default (x264 18). ``preset`` is the encoder's speed preset (x264/x265 names such as ``slow``,
    SVT-AV1 0–13, VP9 ``cpu-used`` 0–8)."""

    codec: str | None = None
    crf: float | None = None
    bitrate: str | int | None = None
    pix_fmt: str = DEFAULT_PIX_FMT
    preset: str | None = None

    def resolve(self, suffix: str) -> tuple[str, dict[str, str], int | None]:
        """Check everything against the installed FFmpeg → (encoder name, encoder options, bit rate)."""
        av = _av()
        name = (self.codec or DEFAULT_CODECS[suffix]).lower()
        name = CODEC_ALIASES.get(name, name)
        try:
            codec = av.Codec(name, "w")
        except Exception:
            raise InvalidInputError(f"codec {name!r}: no such encoder in this FFmpeg; try libx264, libx265, "
                                    "libvpx-vp9, libsvtav1 or ffv1") from None
        if codec.type != "video":
            raise InvalidInputError(f"codec {name!r} encodes {codec.type}, not video")
        if name not in _supported_codecs(CONTAINERS[suffix]):
            raise InvalidInputError(f"a {suffix} file cannot hold {name} video; choose another codec or container")
        formats = [f.name for f in codec.video_formats or ()]
        if formats and self.pix_fmt not in formats:
            raise InvalidInputError(f"pixel format {self.pix_fmt!r} is not one {name} encodes: {', '.join(formats)}")
        if self.crf is not None and self.bitrate is not None:
            raise InvalidInputError("give a CRF or a bitrate, not both")
        options: dict[str, str] = {}
        bit_rate = None if self.bitrate is None else _parse_bitrate(self.bitrate)
        if name in CRF_CODECS:
            low, high, default = CRF_CODECS[name]
            crf = default if self.crf is None and bit_rate is None else self.crf
            if crf is not None:
                if not low <= crf <= high:
                    raise InvalidInputError(f"CRF {crf:g} is out of range for {name} ({low} to {high})")
                options["crf"] = f"{crf:g}"
                if name == "libvpx-vp9":
                    options["b"] = "0"  # VP9 is in constant-quality mode only with no bitrate target
        elif self.crf is not None:
            raise InvalidInputError(f"{name} has no CRF mode (CRF codecs: {', '.join(CRF_CODECS)}); "
                                    "give a bitrate instead")
        if self.preset is not None and name in ENCODER_PRESETS and str(self.preset) not in ENCODER_PRESETS[name]:
            what = "cpu-used" if name == "libvpx-vp9" else "preset"
            raise InvalidInputError(f"preset {self.preset!r} is not a {name} {what}: use one of "
                                    f"{', '.join(ENCODER_PRESETS[name])}")
        if name == "libvpx-vp9":
            options.update({"row-mt": "1", "deadline": "good", "cpu-used": str(self.preset or "4")})
        elif self.preset is not None:
            options["preset"] = str(self.preset)
        if name == "libx265":
            options["x265-params"] = "log-level=0"  # errors only: x265 prints its info lines itself, past FFmpeg's log
        said = _probe_muxer(CONTAINERS[suffix], name, tuple(sorted(options.items())), bit_rate, self.pix_fmt)
        if said is not None:
            raise InvalidInputError(f"a {suffix} file of {name} video with these settings "
                                    f"({', '.join(f'{k}={v}' for k, v in sorted(options.items())) or 'defaults'}, "
                                    f"{self.pix_fmt}) cannot be written: FFmpeg says {said}")
        return name, options, bit_rate


# ---------------------------------------------------------------------------------------------
# The result


@dataclass
class VideoSummary:
    """What one run did. ``frames`` were upscaled and written; ``copied_packets`` of audio and
    subtitles were copied; ``corrupt_packets`` could not be decoded and were skipped; ``fixed_timestamps``
    frames had a missing or backward timestamp and were placed after their predecessor."""

    src: Path
    dst: Path
    codec: str
    frames: int = 0
    size_in: tuple[int, int] = (0, 0)
    size_out: tuple[int, int] = (0, 0)
    seconds: float = 0.0
    copied_streams: int = 0
    copied_packets: int = 0
    corrupt_packets: int = 0
    fixed_timestamps: int = 0
    decoded: int = 0  # frames decoded, selected or not
    interrupted: bool = False
    kept_partial: bool = False
    rotation: int = 0  # the rotation of the display matrix carried over, in degrees as ``VideoFrame.rotation`` gives it
    # Seconds each stage spent working (not waiting on its queues): decode, compute, encode.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / max(self.seconds, 1e-9)

    def line(self) -> str:
        (w, h), (W, H) = self.size_in, self.size_out
        text = (f"upscaled {self.frames} frame{'s' if self.frames != 1 else ''} of {self.src.name} "
                f"{w}×{h} → {W}×{H} ({self.codec}) in {self.seconds:.2f} s, {self.fps:.2f} fps")
        if self.copied_streams:
            text += f"; {self.copied_streams} stream{'s' if self.copied_streams != 1 else ''} copied " \
                    f"({self.copied_packets} packets)"
        if self.corrupt_packets:
            text += f"; {self.corrupt_packets} corrupt packet{'s' if self.corrupt_packets != 1 else ''} skipped"
        if self.fixed_timestamps:
            text += f"; {self.fixed_timestamps} frame timestamp{'s' if self.fixed_timestamps != 1 else ''} repaired"
        if self.rotation:
            text += f"; display matrix kept (rotation {self.rotation}°)"
        if self.kept_partial:
            text += "; interrupted, partial file kept"
        return text


def _rotation(matrix: tuple[int, ...] | None) -> int:
    """The rotation of a display matrix in degrees counter-clockwise, as PyAV's ``frame.rotation``."""
    if matrix is None:
        return 0
    import math

    return -round(math.degrees(math.atan2(matrix[1], matrix[0]))) if matrix[0] or matrix[1] else 0


# ---------------------------------------------------------------------------------------------
# Items that travel through the stages


@dataclass
class _Frame:
    index: int
    rgb: np.ndarray
    pts: int
    duration: int
    sr: np.ndarray | None = None


@dataclass
class _Copy:
    packet: object  # av.Packet of a copied stream


class _End:
    pass


@dataclass
class _Failed:
    error: BaseException


class _Stage:
    """Runs an iterator in a thread, handing its items over through a bounded queue. Iterating the
    stage gives the items (or raises what the iterator raised); ``stop`` ends both sides."""

    def __init__(self, name: str, items: Iterator, maxsize: int, stop: threading.Event):
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.stop = stop
        self.thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
        self.thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_End())
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(_Failed(exc))
        finally:
            items.close()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item


# ---------------------------------------------------------------------------------------------
# Input


def _open_input(av, src: Path):
    try:
        container = av.open(str(src), "r")
    except av.FFmpegError as exc:
        raise ImageReadError(f"{src}: not a video FFmpeg can read ({exc})") from None
    if not container.streams.video:
        kinds = ", ".join(f"{s.type} {s.codec_context.name}" for s in container.streams) or "none"
        container.close()
        raise InvalidInputError(f"{src}: has no video stream (streams: {kinds})")
    return container


def _video_stream(container):
    """The stream to upscale: the first video stream that is not a cover picture."""
    for stream in container.streams.video:
        if not stream.disposition & type(stream.disposition).attached_pic:  # cover art, not a video
            return stream
    return container.streams.video[0]


def display_matrix(src: str | Path, index: int) -> tuple[int, ...] | None:
    """The display matrix (FFmpeg's 9 int32s: rotation and flips a player applies, e.g. a phone's
    portrait clip stored landscape) of video stream ``index`` of ``src``, from its first decoded frame;
    None when it has none (or no frame decodes)."""
    import struct

    av = _av()
    try:
        with av.open(str(src), "r") as container:
            stream = container.streams[index]
            stream.thread_type = "AUTO"
            for packets, frame in enumerate(container.decode(stream)):
                for data in frame.side_data:
                    if "DISPLAYMATRIX" in str(data.type):
                        matrix = struct.unpack("=9i", bytes(data)[:36])
                        return None if matrix == (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30) else matrix
                return None
    except (av.FFmpegError, ValueError, IndexError, struct.error):
        return None
    return None


def frame_count(stream) -> tuple[int | None, bool]:
    """(frames, exact): from the container's count when it has one (mp4, mov), else estimated from
    the duration and the average rate (mkv, webm), else (None, False)."""
    if stream.frames:
        return int(stream.frames), True
    rate = stream.average_rate or stream.guessed_rate
    duration = stream.duration * stream.time_base if stream.duration else None
    if duration is None and stream.container.duration:
        duration = Fraction(stream.container.duration, 1_000_000)
    if rate and duration:
        return int(round(duration * rate)), False
    return None, False


def _sws_matrix(colorspace: int) -> str:
    return _SWS_MATRIX.get(int(colorspace), "ITU601")


def _full_range(color_range: int, pix_fmt) -> bool:
    """Full-range (JPEG) YUV: tagged so, or a deprecated ``yuvj`` pixel format."""
    return color_range == _RANGE_JPEG or (pix_fmt is not None and pix_fmt.name.startswith("yuvj"))


def _sws_range(full: bool) -> str:
    return "JPEG" if full else "MPEG"


def _frame_to_rgb(frame) -> np.ndarray:
    if frame.format.is_rgb:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", src_colorspace=_sws_matrix(frame.colorspace),
                            src_color_range=_sws_range(_full_range(frame.color_range, frame.format)))


def _packet_time(packet) -> Fraction | None:
    ts = packet.pts if packet.pts is not None else packet.dts
    return None if ts is None else ts * packet.time_base


_MAX_READ_ERRORS = 64  # read errors in a row before the rest of a file is given up


def _packets(container, streams, summary: VideoSummary):
    """The file's packets; a read error is counted as a corrupt packet and reading goes on from
    where FFmpeg resynchronises (a damaged file is read to its end, not abandoned)."""
    av = _av()
    errors = 0
    while True:
        try:
            for packet in container.demux(streams):
                errors = 0
                yield packet
            return
        except av.FFmpegError:
            summary.corrupt_packets += 1
            errors += 1
            if errors >= _MAX_READ_ERRORS:
                return


def _demux_decode(container, stream, copies: dict, summary: VideoSummary, state: dict):
    """Yield ("copy", packet) and ("frame", frame) in file order.

    A corrupt packet is counted and skipped: one the demuxer flags or cannot read, one the decoder
    rejects, and one the decoder drops without a word (a threaded decoder reports no error; it just
    gives no frame). The last are found by timestamp: a packet whose time has not come out as a frame
    by the time a later frame has. Once ``state["stop"]`` (seconds) is set, video is no longer
    decoded, and reading ends when the file is ``_TAIL_SECONDS`` past it."""
    av = _av()
    sent: set[int] = set()  # pts of video packets given to the decoder and not yet seen as a frame

    def frames_of(packet):
        try:
            frames = packet.decode()  # an empty packet at the end flushes the decoder
        except av.FFmpegError:
            if packet.pts is None:  # else it is counted below, when its time passes without a frame
                summary.corrupt_packets += 1
            frames = []
        for frame in frames:
            if frame.pts is not None:
                sent.discard(frame.pts)
                lost = [p for p in sent if p < frame.pts]
                summary.corrupt_packets += len(lost)
                sent.difference_update(lost)
            yield frame

    for packet in _packets(container, [stream, *copies.values()], summary):
        stop = state["stop"]
        t = _packet_time(packet)
        if stop is not None and t is not None and t > stop + _TAIL_SECONDS:
            return
        if packet.stream.index != stream.index:
            if packet.size:
                yield "copy", packet
            continue
        if stop is not None:
            continue
        if packet.is_corrupt:
            summary.corrupt_packets += 1
            continue
        if packet.size and packet.pts is not None:
            sent.add(packet.pts)
        for frame in frames_of(packet):
            yield "frame", frame
    if state["stop"] is None:
        summary.corrupt_packets += len(sent)  # never came out, even when the decoder was flushed


def _overlaps(packet, lower: Fraction | None, upper: Fraction | None) -> bool:
    """Whether a copied packet's span [t, t + duration) meets the selection [lower, upper)."""
    t = _packet_time(packet)
    if t is None:
        return True
    end = t + (packet.duration or 0) * packet.time_base
    return (upper is None or t < upper) and (lower is None or (end > lower if end > t else t >= lower))


def _decode(container, stream, copies: dict, frames: tuple[int, int | None], summary: VideoSummary):
    """The decode stage: the selected frames as RGB, with timestamps, and the copied streams'
    packets that overlap the selection, in file order. A selection that starts after frame 0 is
    shifted to start at time 0, its copied packets with it.

    For a selection, a copied packet is held until the video shows it is inside: a selected frame
    at or after its time has been decoded (or the selection's end is known). Demuxers put audio
    ahead of the video it plays with, and the decoder adds its own delay, so the end of the
    selection is not known when the packets near it are read."""
    start, stop = frames
    whole = start == 0 and stop is None
    tb = stream.time_base
    state = {"stop": None}
    lower: Fraction | None = None      # the selection's start time (None: from the file's start)
    offset = 0                          # pts subtracted from the video timestamps
    held: list = []                     # copied packets not yet known to be inside or outside
    index, last_pts = -1, None

    def shift(packet):
        if lower is not None and lower != 0:
            delta = round(lower / packet.time_base)
            packet.pts = None if packet.pts is None else packet.pts - delta
            packet.dts = None if packet.dts is None else packet.dts - delta
        return _Copy(packet)

    def release(before: Fraction | None, upper: Fraction | None):
        """Yield the held packets that start before ``before`` (all for None) and overlap the
        selection; keep the later ones held."""
        nonlocal held
        keep = []
        for p in held:
            t = _packet_time(p)
            if before is not None and t is not None and t >= before:
                keep.append(p)
            elif _overlaps(p, lower, upper):
                yield shift(p)
        held = keep

    try:
        for kind, obj in _demux_decode(container, stream, copies, summary, state):
            if kind == "copy":
                if whole:
                    yield _Copy(obj)
                elif state["stop"] is not None:
                    if _overlaps(obj, lower, state["stop"]):
                        yield shift(obj)
                else:
                    held.append(obj)
                continue
            index += 1
            summary.decoded = index + 1
            pts = obj.pts
            if pts is None or (last_pts is not None and pts <= last_pts):
                pts = 0 if last_pts is None else last_pts + max(int(obj.duration or 0), 1)
                summary.fixed_timestamps += 1
            last_pts = pts
            t = pts * tb
            if index < start:
                # Before the selection: copied packets that end before this frame cannot reach it.
                held = [p for p in held if _overlaps(p, t, None)]
                continue
            if stop is not None and index >= stop:
                state["stop"] = t
                yield from release(None, t)
                continue
            if index == start and start:
                lower, offset = t, pts
            if not whole:
                yield from release(t, None)
            yield _Frame(index, _frame_to_rgb(obj), pts - offset, int(obj.duration or 0))
        if index >= start:
            yield from release(None, state["stop"])
    finally:
        container.close()


def _timed(items, timings: dict, key: str):
    """``items``, adding the seconds spent producing them to ``timings[key]``."""
    items = iter(items)
    try:
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                timings[key] += time.perf_counter() - start
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _compute(items, runner, options, batch_size: int, timings: dict):
    """The compute stage: frames in batches of up to ``batch_size`` of one size; packets keep
    their place among them."""
    waiting: list = []
    frames: list[_Frame] = []

    def run():
        if frames:
            start = time.perf_counter()
            outputs, finite = runner.run(np.stack([f.rgb for f in frames]), options)
            timings["compute"] += time.perf_counter() - start
            for frame, out, ok in zip(frames, outputs, finite):
                if not ok:
                    raise NonFiniteOutputError(f"frame {frame.index}: {non_finite_error(None, out.shape, runner.dtype)}")
                frame.sr = out
        yield from waiting
        waiting.clear()
        frames.clear()

    for item in items:
        if isinstance(item, _Frame):
            if frames and item.rgb.shape != frames[0].rgb.shape:
                yield from run()
            frames.append(item)
        waiting.append(item)
        if len(frames) >= batch_size:
            yield from run()
    yield from run()


# ---------------------------------------------------------------------------------------------
# Output


def _copied_streams(container, stream, out_format, dst: Path) -> dict:
    """Input index → stream for audio and subtitle streams; a stream the output container cannot
    hold is an error (before any work), other kinds are left out with a warning."""
    supported = _supported_codecs(out_format)
    copies, left = {}, []
    for s in container.streams:
        if s.index == stream.index:
            continue
        name = s.codec_context.name if s.codec_context else "unknown"
        if s.type in ("audio", "subtitle"):
            if name not in supported:
                raise InvalidInputError(
                    f"{dst}: a {out_format} file cannot hold stream #{s.index} ({s.type}, {name}), which would "
                    f"be copied unchanged; choose an output container that takes it (.mkv takes most)")
            copies[s.index] = s
        else:
            left.append(f"#{s.index} ({s.type}, {name})")
    if left:
        warnings.warn(f"{container.name}: stream(s) {', '.join(left)} are not copied (only video, audio and "
                      "subtitles are)")
    return copies


@dataclass
class _ColourOut:
    """The output's colour conversion and tags."""

    matrix: int        # AVColorSpace
    range: int         # AVColorRange
    primaries: int
    trc: int
    rgb: bool          # the output pixel format is RGB: no matrix

    def convert(self, frame, pix_fmt: str):
        if self.rgb:
            return frame.reformat(format=pix_fmt)
        return frame.reformat(format=pix_fmt, dst_colorspace=_sws_matrix(self.matrix),
                              dst_color_range=_sws_range(self.range == _RANGE_JPEG))


def _colour_out(stream, pix_fmt: str) -> _ColourOut:
    av = _av()
    cc = stream.codec_context
    rgb = av.VideoFormat(pix_fmt).is_rgb
    source_rgb = cc.format is not None and cc.format.is_rgb
    # An untagged YUV source was read with BT.601 (FFmpeg's default); the output says so, because a
    # player would take an untagged 4× larger (HD) picture for BT.709.
    matrix = 0 if rgb else (cc.colorspace if int(cc.colorspace) in _SWS_MATRIX else _BT601)
    if source_rgb and not rgb:
        matrix = _BT601
    rng = _RANGE_JPEG if rgb or _full_range(cc.color_range, cc.format) else _RANGE_MPEG
    return _ColourOut(int(matrix), rng, int(cc.color_primaries), int(cc.color_trc), rgb)


def _open_output(av, tmp: Path, suffix: str, stream, copies: dict, codec: str, codec_options: dict,
                 bit_rate: int | None, pix_fmt: str, scale: int, matrix: tuple[int, ...] | None = None):
    out = av.open(str(tmp), "w", format=CONTAINERS[suffix])
    try:
        cc_in = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate
        ostream = out.add_stream(codec, rate=rate, options=codec_options)
        ostream.width, ostream.height = cc_in.width * scale, cc_in.height * scale
        ostream.pix_fmt = pix_fmt
        # The source's time base: every frame keeps its own timestamp (variable frame rate survives).
        ostream.time_base = stream.time_base
        ostream.codec_context.time_base = stream.time_base
        if bit_rate is not None:
            ostream.codec_context.bit_rate = bit_rate
        colour = _colour_out(stream, pix_fmt)
        occ = ostream.codec_context
        occ.colorspace, occ.color_range = colour.matrix, colour.range
        occ.color_primaries, occ.color_trc = colour.primaries, colour.trc
        if cc_in.sample_aspect_ratio:
            occ.sample_aspect_ratio = cc_in.sample_aspect_ratio
        if matrix is not None:
            # The same rotation and flips; its translation (16.16 pixels) scales with the picture.
            ostream.set_display_matrix([*matrix[:6], matrix[6] * scale, matrix[7] * scale, matrix[8]])
        for key, value in stream.metadata.items():
            if key.lower() in ("language", "title", "handler_name"):
                ostream.metadata[key] = value
        mapped = {}
        for index, s in copies.items():
            o = out.add_stream_from_template(s)
            for key, value in s.metadata.items():
                o.metadata[key] = value
            o.disposition = s.disposition
            mapped[index] = o
        for key, value in stream.container.metadata.items():
            if key.lower() not in ("encoder", "major_brand", "minor_version", "compatible_brands"):
                out.metadata[key] = value
        return out, ostream, mapped, colour
    except BaseException:
        out.close()
        raise


# ---------------------------------------------------------------------------------------------
# The job


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
    av = _av()
    from .fileio import commit, temporary_beside
    from .images import check_writable
    from .run import BatchRunner
    from .upscaler import Upscaler

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

    container = _open_input(av, src)
    try:
        stream = _video_stream(container)
        stream.thread_type = "AUTO"  # FFmpeg's frame and slice threads
        copies = _copied_streams(container, stream, CONTAINERS[suffix], dst)
        if upscaler is None or isinstance(upscaler, str):
            upscaler = Upscaler(upscaler or "msfin-x4")
        scale = upscaler.scale
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
                               rotation=_rotation(matrix))
        try:
            tmp = temporary_beside(dst)
        except OSError as exc:
            raise ImageWriteError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        container.close()
        raise

    runner = BatchRunner(upscaler, graph_cache=2)
    stop_event = threading.Event()
    stages: list[_Stage] = []
    out = None
    began = time.perf_counter()
    try:
        try:
            out, ostream, mapped, colour = _open_output(av, tmp, suffix, stream, copies, codec_name,
                                                        codec_options, bit_rate, pix_fmt, scale, matrix)
        except av.FFmpegError as exc:
            raise ImageWriteError(f"{dst}: cannot write ({exc})") from None
        time_base = stream.time_base  # the decode stage closes the input when it is done
        timings = summary.timings = {"decode": 0.0, "compute": 0.0, "encode": 0.0}
        decoded = _timed(_decode(container, stream, copies, selection, summary), timings, "decode")
        if pipelined:
            depth = max(queue_size, batch_size)
            stages.append(_Stage("msfin-video-decode", decoded, depth, stop_event))
            computed = _compute(iter(stages[0]), runner, upscaler.options, batch_size, timings)
            stages.append(_Stage("msfin-video-compute", computed, depth, stop_event))
            items = iter(stages[1])
        else:
            items = _compute(decoded, runner, upscaler.options, batch_size, timings)
        try:
            for item in items:
                t0 = time.perf_counter()
                if isinstance(item, _Copy):
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
                    if progress is not None:
                        progress(summary.frames, total, exact)
                timings["encode"] += time.perf_counter() - t0
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
