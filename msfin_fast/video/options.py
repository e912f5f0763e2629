"""What a video output may be: containers, encoders and their settings, frame selection, checked
against the installed FFmpeg before any frame is decoded (:class:`EncodeOptions`)."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path


from ..errors import InvalidInputError


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
    av = import_av()
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

    av = import_av()
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
def supported_codecs(out_format: str) -> frozenset[str]:
    """The codec and encoder names FFmpeg's muxer ``out_format`` can hold."""
    probe = import_av().open(os.devnull, "w", format=out_format)
    try:
        return frozenset(probe.supported_codecs)
    finally:
        probe.close()


def import_av():
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
    from ..images import list_files

    return list_files(folder, VIDEO_SUFFIXES, recursive)


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
        av = import_av()
        name = (self.codec or DEFAULT_CODECS[suffix]).lower()
        name = CODEC_ALIASES.get(name, name)
        try:
            codec = av.Codec(name, "w")
        except Exception:
            raise InvalidInputError(f"codec {name!r}: no such encoder in this FFmpeg; try libx264, libx265, "
                                    "libvpx-vp9, libsvtav1 or ffv1") from None
        if codec.type != "video":
            raise InvalidInputError(f"codec {name!r} encodes {codec.type}, not video")
        if name not in supported_codecs(CONTAINERS[suffix]):
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
