"""The output side: the copied streams, the colour conversion back to the output's pixel format and
matrix, and the output container opened with the encoder, its settings and the display matrix."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path


from ..errors import InvalidInputError
from .colour import BT601, RANGE_JPEG, RANGE_MPEG, SWS_MATRIX, full_range, sws_matrix, sws_range
from .options import CONTAINERS, import_av, supported_codecs


def rotation_of(matrix: tuple[int, ...] | None) -> int:
    """The rotation of a display matrix in degrees counter-clockwise, as PyAV's ``frame.rotation``."""
    if matrix is None:
        return 0
    import math

    return -round(math.degrees(math.atan2(matrix[1], matrix[0]))) if matrix[0] or matrix[1] else 0


def copied_streams(container, stream, out_format, dst: Path) -> dict:
    """Input index → stream for audio and subtitle streams; a stream the output container cannot
    hold is an error (before any work), other kinds are left out with a warning."""
    supported = supported_codecs(out_format)
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
        return frame.reformat(format=pix_fmt, dst_colorspace=sws_matrix(self.matrix),
                              dst_color_range=sws_range(self.range == RANGE_JPEG))


def _colour_out(stream, pix_fmt: str) -> _ColourOut:
    av = import_av()
    cc = stream.codec_context
    rgb = av.VideoFormat(pix_fmt).is_rgb
    source_rgb = cc.format is not None and cc.format.is_rgb
    # An untagged YUV source was read with BT.601 (FFmpeg's default); the output says so, because a
    # player would take an untagged 4× larger (HD) picture for BT.709.
    matrix = 0 if rgb else (cc.colorspace if int(cc.colorspace) in SWS_MATRIX else BT601)
    if source_rgb and not rgb:
        matrix = BT601
    rng = RANGE_JPEG if rgb or full_range(cc.color_range, cc.format) else RANGE_MPEG
    return _ColourOut(int(matrix), rng, int(cc.color_primaries), int(cc.color_trc), rgb)


def open_output(av, tmp: Path, suffix: str, stream, copies: dict, codec: str, codec_options: dict,
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
