"""Colour between FFmpeg's frames and RGB: the swscale matrix for a stream's colour space (BT.601 where
it is unknown or swscale has none) and its range (limited, "MPEG", or full, "JPEG")."""

from __future__ import annotations

# The RGB ↔ YUV matrices swscale knows, by FFmpeg's AVColorSpace number; anything else (2,
# unspecified, among them) is converted with BT.601, swscale's default, and tagged so.
SWS_MATRIX = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "SMPTE170M", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}
BT601 = 6  # AVCOL_SPC_SMPTE170M
RANGE_MPEG, RANGE_JPEG = 1, 2  # FFmpeg's AVColorRange: limited (studio) and full range


def sws_matrix(colorspace: int) -> str:
    return SWS_MATRIX.get(int(colorspace), "ITU601")


def full_range(color_range: int, pix_fmt) -> bool:
    """Full-range (JPEG) YUV: tagged so, or a deprecated ``yuvj`` pixel format."""
    return color_range == RANGE_JPEG or (pix_fmt is not None and pix_fmt.name.startswith("yuvj"))


def sws_range(full: bool) -> str:
    return "JPEG" if full else "MPEG"
