"""16-bit images: read and written exactly (PNG, TIFF; RGB, RGBA, grey, grey + alpha), run on the
0–255 scale in float, and 16-bit again out. The PNG files are synthesised byte by byte here (zlib and
struct, no image library), so the reader is checked against the format, not against itself."""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from helpers import require_module

cv2 = require_module("cv2")

from msfin_fast import ImageReadError, ServingUpscaler, Upscaler  # noqa: E402
from msfin_fast.cli import main  # noqa: E402
from msfin_fast.images import _ORIENT, decode_image, read_image, write_image  # noqa: E402
from msfin_fast.pictures import Picture  # noqa: E402

RNG = np.random.default_rng(16)
COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels → PNG colour type (grey, grey+alpha, RGB, RGBA)


def png16(values: np.ndarray, orientation: int | None = None) -> bytes:
    """A 16-bit PNG of H×W or H×W×C uint16 ``values``, written from the PNG specification, with an
    eXIf chunk holding ``orientation`` if given."""
    a = values if values.ndim == 3 else values[..., None]
    h, w, c = a.shape
    rows = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, COLOUR_TYPE[c], 0, 0, 0)
    exif = b""
    if orientation is not None:
        tags = Image.Exif()
        tags[0x0112] = orientation
        exif = chunk(b"eXIf", tags.tobytes().removeprefix(b"Exif\x00\x00"))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + exif + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def sample(h: int, w: int, c: int) -> np.ndarray:
    """Values that differ in both bytes and per channel (a swapped byte order or channel order shows)."""
    a = RNG.integers(0, 65536, (h, w, c), dtype=np.uint16)
    a[0, 0, :] = [0x0102, 0x0304, 0x0506, 0xFFFE][:c]
    return a


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_synthesised_16bit_png_reads_exactly(tmp_path, channels):
    values = sample(5, 7, channels)
    path = tmp_path / "in.png"
    path.write_bytes(png16(values))
    pic = read_image(path)
    assert pic.depth == 16 and pic.rgb.dtype == np.uint16 and pic.grey == (channels <= 2)
    colour = np.repeat(values[..., :1], 3, 2) if channels <= 2 else values[..., :3]
    assert np.array_equal(pic.rgb, colour)
    if channels in (2, 4):
        assert np.array_equal(pic.alpha, values[..., -1])
    else:
        assert pic.alpha is None


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_round_trip_through_files(tmp_path, suffix, channels):
    values = sample(6, 5, channels)
    pic = Picture(np.repeat(values[..., :1], 3, 2) if channels <= 2 else values[..., :3].copy(),
                  values[..., -1].copy() if channels in (2, 4) else None, channels <= 2)
    path = tmp_path / f"out{suffix}"
    write_image(path, pic)
    back = read_image(path)
    assert back.depth == 16 and np.array_equal(back.rgb, pic.rgb)
    assert (back.alpha is None) == (pic.alpha is None)
    if pic.alpha is not None:
        assert np.array_equal(back.alpha, pic.alpha)
    # An independent reader agrees on the pixels (OpenCV gives BGR).
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    first = raw if raw.ndim == 2 else raw[..., 2]
    assert np.array_equal(first, pic.rgb[..., 0])


def test_orientation_table_matches_pillow():
    """The 16-bit path turns pixels upright with numpy; each EXIF orientation must do what Pillow does."""
    arr = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        img = Image.fromarray(arr)
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        img.save(buffer, format="PNG", exif=exif)
        upright = np.asarray(ImageOps.exif_transpose(Image.open(buffer)))
        ours = _ORIENT.get(orientation, lambda a: a)(arr)
        assert np.array_equal(ours, upright), orientation


def test_16bit_exif_orientation_is_applied(tmp_path):
    values = sample(3, 5, 3)
    path = tmp_path / "rot.png"
    path.write_bytes(png16(values, orientation=6))  # rotate 90° clockwise on display
    assert np.array_equal(read_image(path).rgb, np.rot90(values, -1))


def expected16(model, rgb16: np.ndarray) -> np.ndarray:
    """The reference on v · 255 / 65535, rounded back to 16 bits: written out here, not imported."""
    x = torch.from_numpy(rgb16.astype(np.float32) * (255 / 65535)).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = model(x)[0].permute(1, 2, 0).double().numpy()
    return np.clip(np.round(y * (65535 / 255)), 0, 65535).astype(np.uint16)


def test_upscale_file_keeps_16_bits(tmp_path, pretrained, capsys):
    model = pretrained("msfin-s-x4")
    values = sample(9, 11, 4)
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    src.write_bytes(png16(values))
    assert main(["upscale", "-i", str(src), "-o", str(dst), "--model", "msfin-s-x4", "--device", "cpu",
                 "--backend", "reference", "-q"]) == 0
    out = read_image(dst)
    assert out.depth == 16 and out.rgb.shape == (36, 44, 3) and out.alpha.dtype == np.uint16
    want = expected16(model, values[..., :3])
    # 1 step in 65535 for a float32 product rounded on the other side of .5 (the CLI's layout differs).
    assert int(np.abs(out.rgb.astype(np.int64) - want).max()) <= 1
    # The extra bits are used: an 8-bit pipeline would give multiples of 257 only.
    assert np.count_nonzero(out.rgb % 257) > out.rgb.size // 2


def test_array_and_serving_paths_agree(pretrained):
    model = pretrained("msfin-s-x4")
    rgb16 = sample(8, 6, 3)
    direct = Upscaler(model, device="cpu").upscale(rgb16)
    assert direct.dtype == np.uint16 and int(np.abs(direct.astype(np.int64) - expected16(model, rgb16)).max()) <= 1
    rgb8 = RNG.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    with ServingUpscaler(model, device="cpu", batch_window=0.05) as up:
        futures = up.submit_many([rgb16, rgb8])  # one shape, two dtypes: two batches
        served16, served8 = (f.result(timeout=60) for f in futures)
    assert served16.dtype == np.uint16 and np.array_equal(served16, direct)
    assert served8.dtype == np.uint8 and np.array_equal(served8, Upscaler(model, device="cpu").upscale(rgb8))


def test_8bit_only_formats_warn_and_round(tmp_path):
    pic = Picture(sample(4, 4, 3), None, False)
    with pytest.warns(UserWarning, match="JPEG holds 8 bits"):
        write_image(tmp_path / "o.jpg", pic)
    assert read_image(tmp_path / "o.jpg").depth == 8


def test_without_opencv_16bit_colour_is_an_error_not_a_reduction(tmp_path, monkeypatch):
    path = tmp_path / "rgb16.png"
    path.write_bytes(png16(sample(3, 3, 3)))
    grey = tmp_path / "grey16.png"
    grey.write_bytes(png16(sample(3, 3, 1)))
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(ImageReadError, match=r"16-bit colour PNG needs OpenCV.*msfin_fast\[image16\]"):
        read_image(path)
    with pytest.raises(ImageReadError, match="16-bit colour"):
        decode_image(io.BytesIO(path.read_bytes()), "the body")
    assert read_image(grey).depth == 16  # Pillow reads 16-bit grey exactly


def test_service_codec_keeps_16_bits():
    """The service's upload decoder and PNG encoder: a 16-bit upload gets a 16-bit answer."""
    require_module("starlette")
    from msfin_fast.server import Limits, decode_upload, encode_png

    values = sample(4, 3, 4)
    picture = decode_upload(png16(values), Limits())
    assert picture.depth == 16 and np.array_equal(picture.alpha, values[..., 3])
    result = sample(16, 12, 3)
    answer = decode_image(io.BytesIO(encode_png(picture, result, 4)), "answer")
    assert answer.depth == 16 and np.array_equal(answer.rgb, result) and answer.alpha.shape == (16, 12)
