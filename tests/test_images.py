"""Reading every common image form, and atomic writes."""

import os

import numpy as np
import pytest
from PIL import Image

import msfin_fast.images as images
from msfin_fast import ImageReadError, ImageWriteError
from msfin_fast.images import read_image, write_image
from msfin_fast.pictures import Picture

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)


def _save(tmp_path, img, name):
    path = tmp_path / name
    img.save(path)
    return path


@pytest.mark.parametrize("suffix", ["png", "bmp", "webp", "tif"])
def test_rgb_lossless_round_trip(tmp_path, suffix):
    if suffix == "webp":
        path = tmp_path / "a.webp"
        Image.fromarray(RGB).save(path, lossless=True)
    else:
        path = _save(tmp_path, Image.fromarray(RGB), f"a.{suffix}")
    pic = read_image(path)
    assert pic.rgb.dtype == np.uint8 and np.array_equal(pic.rgb, RGB)
    assert pic.alpha is None and not pic.grey


def test_jpeg_reads_as_rgb(tmp_path):
    pic = read_image(_save(tmp_path, Image.fromarray(RGB), "a.jpg"))
    assert pic.rgb.shape == RGB.shape


def test_grey_is_replicated_and_flagged(tmp_path):
    grey = RGB[..., 0]
    pic = read_image(_save(tmp_path, Image.fromarray(grey, "L"), "g.png"))
    assert pic.grey and all(np.array_equal(pic.rgb[..., c], grey) for c in range(3))


def test_rgba_keeps_alpha(tmp_path):
    rgba = np.dstack([RGB, RGB[..., 1]])
    pic = read_image(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png"))
    assert np.array_equal(pic.rgb, RGB) and np.array_equal(pic.alpha, RGB[..., 1])


def test_grey_with_alpha(tmp_path):
    la = Image.fromarray(RGB[..., 0], "L")
    la.putalpha(Image.fromarray(RGB[..., 2], "L"))
    pic = read_image(_save(tmp_path, la, "la.png"))
    assert pic.grey and np.array_equal(pic.alpha, RGB[..., 2])


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.fromarray(RGB).convert("P")
    assert read_image(_save(tmp_path, p, "p.png")).alpha is None
    p.info["transparency"] = 0
    assert read_image(_save(tmp_path, p, "pt.png")).alpha is not None


def test_sixteen_bit_grey_is_kept_and_as_8bit_rounds(tmp_path):
    values = np.array([[0, 257, 384, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    pic = read_image(path)
    assert pic.grey and pic.depth == 16 and pic.rgb[0, :, 0].tolist() == [0, 257, 384, 65535]
    assert pic.as_8bit().rgb[0, :, 0].tolist() == [0, 1, 1, 255]  # 384 · 255 / 65535 = 1.49


def test_cmyk_and_one_bit(tmp_path):
    assert read_image(_save(tmp_path, Image.fromarray(RGB).convert("CMYK"), "c.jpg")).rgb.shape == RGB.shape
    assert read_image(_save(tmp_path, Image.fromarray(RGB).convert("1"), "b.png")).grey


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(RGB)  # 13 wide, 9 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert read_image(path).rgb.shape[:2] == (13, 9)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not an image"), "not an image file"),
        (lambda p: p.write_bytes(b""), "not an image file"),
        (lambda p: p.mkdir(), "is a folder"),
    ],
)
def test_unreadable_inputs(tmp_path, make, message):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ImageReadError, match=message):
        read_image(path)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "none.png")
    path = _save(tmp_path, Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "t.png")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cannot read image|not an image"):
        read_image(path)


def test_write_modes_follow_the_picture(tmp_path):
    write_image(tmp_path / "g.png", Picture(np.repeat(RGB[..., :1], 3, 2), None, grey=True))
    write_image(tmp_path / "a.png", Picture(RGB, RGB[..., 0]))
    assert Image.open(tmp_path / "g.png").mode == "L"
    assert Image.open(tmp_path / "a.png").mode == "RGBA"


def test_jpeg_output_drops_alpha_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="alpha channel is dropped"):
        write_image(tmp_path / "a.jpg", Picture(RGB, RGB[..., 0]))
    assert Image.open(tmp_path / "a.jpg").mode == "RGB"


def test_written_files_get_normal_permissions(tmp_path):
    write_image(tmp_path / "a.png", Picture(RGB))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "name, message",
    [("out.xyz", "unsupported output type"), ("out", "unsupported output type")],
)
def test_unsupported_output_types(tmp_path, name, message):
    with pytest.raises(ImageWriteError, match=message):
        write_image(tmp_path / name, Picture(RGB))


def test_output_under_a_file_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImageWriteError, match="is not a folder"):
        write_image(tmp_path / "file" / "out.png", Picture(RGB))


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageWriteError, match="No space left"):
        write_image(target, Picture(RGB))
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_list_image_files_filters_and_sorts(tmp_path):
    for name in ("b.PNG", "a.jpg", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in images.list_image_files(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]


@pytest.mark.parametrize("fmt", ["GIF", "PPM", "ICO", "TGA", "PCX"])
def test_only_the_documented_formats_are_decoded(tmp_path, fmt):
    """Pillow would decode these too; no decoder beyond PNG, JPEG, BMP, WebP and TIFF is ever run,
    whatever the file's suffix says."""
    path = tmp_path / "x.png"
    Image.fromarray(RGB).save(path, format=fmt)
    with pytest.raises(ImageReadError, match="not one of PNG, JPEG, BMP, WebP or TIFF"):
        read_image(path)


def test_thirty_two_bit_grey_out_of_range_is_refused_not_wrapped(tmp_path):
    """Negative 32-bit samples used to wrap to white through uint8."""
    path = tmp_path / "i32.tif"
    Image.fromarray(np.array([[-5, 0, 300]], dtype=np.int32)).save(path)
    with pytest.raises(ImageReadError, match=r"32-bit grey samples from -5 to 300; .*refused rather than clipped"):
        read_image(path)
    Image.fromarray(np.array([[70000, 0]], dtype=np.int32)).save(path)
    with pytest.raises(ImageReadError, match="from 0 to 70000"):
        read_image(path)
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(path)
    assert read_image(path).rgb[0, :, 0].tolist() == [0, 65535]  # in range: kept as 16-bit


def test_float_images_are_refused(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32)).save(path)
    with pytest.raises(ImageReadError, match="floating-point samples"):
        read_image(path)


def test_list_image_files_walks_the_tree_when_asked(tmp_path):
    for name in ("a.png", "sub/b.jpg", "sub/deeper/c.tif", "sub/notes.txt", ".hidden/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in images.list_image_files(tmp_path, recursive=True)] == [
        "a.png", "sub/b.jpg", "sub/deeper/c.tif"]
    assert [p.name for p in images.list_image_files(tmp_path)] == ["a.png"]


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp", "bmp", "tif"])
def test_output_is_complete_reads_the_header_and_the_end(tmp_path, suffix):
    src = _save(tmp_path, Image.fromarray(RGB), "src.png")
    out = tmp_path / f"out.{suffix}"
    big = np.repeat(np.repeat(RGB, 4, 0), 4, 1)
    write_image(out, Picture(big))
    assert images.output_is_complete(src, out, 4)
    assert not images.output_is_complete(src, out, 2)  # the wrong size
    assert not images.output_is_complete(src, tmp_path / "missing.png", 4)
    whole = out.read_bytes()
    out.write_bytes(whole[: len(whole) - 7])  # cut short
    assert images.output_is_complete(src, out, 4) == (suffix == "tif")  # TIFF: the header is all it checks
    out.write_bytes(b"")
    assert not images.output_is_complete(src, out, 4)
    rotated = tmp_path / f"rot.{suffix}"
    write_image(rotated, Picture(np.ascontiguousarray(big.transpose(1, 0, 2))))  # EXIF may swap the sides
    assert images.output_is_complete(src, rotated, 4)
    assert not images.output_is_complete(tmp_path / "not-an-image.png", out, 4)
