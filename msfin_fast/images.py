"""Reading and writing image files as RGB arrays (+ optional alpha), with typed errors.

Pixels are uint8, or uint16 for 16-bit files. Pillow decodes everything it decodes exactly: 8-bit
files of every format and 16-bit greyscale. It reads 16-bit colour (RGB, RGBA, grey + alpha) as 8
bits, so those PNG and TIFF files are decoded, and 16-bit colour is encoded, with OpenCV's
unchanged mode (``pip install 'msfin_fast[image16]'``); without OpenCV such a file is an error that
says so, never a silently reduced picture.

Writes are atomic: the image goes to a hidden temporary file beside the target, which is renamed
over the target only once it is complete, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError, ImageWriteError, InvalidInputError, MSFINError
from .fileio import atomic_write
from .pictures import Picture, from_pil, grey_of, outscaled_size, picture_from_array, to_pil

# suffix → (Pillow format, save options)
WRITE_FORMATS: dict[str, tuple[str, dict]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".bmp": ("BMP", {}),
    ".webp": ("WEBP", {"quality": 95}),
    ".tif": ("TIFF", {}),
    ".tiff": ("TIFF", {}),
}
READ_SUFFIXES = tuple(WRITE_FORMATS)
# The decoders that are ever run, whatever a file's name or an upload's content says. Pillow would
# otherwise also try GIF, PPM, ICO, TGA, PCX and a dozen more on anything it is handed.
READ_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF")
_FORMAT_NAMES = "PNG, JPEG, BMP, WebP or TIFF"
_NO_ALPHA_FORMATS = {"JPEG"}



def list_files(folder: str | Path, suffixes: tuple[str, ...], recursive: bool = False) -> list[Path]:
    """Files whose suffix is one of ``suffixes`` directly inside ``folder`` (with ``recursive``, in its
    whole tree), sorted by path. A tree walk does not enter hidden folders (a leading dot: ``.git``,
    ``.cache``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a folder")
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, n) for n in names if Path(n).suffix.lower() in suffixes]
    return sorted(p for p in found if p.is_file())


def list_image_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files (by suffix) in ``folder``, as :func:`list_files` lists them."""
    return list_files(folder, READ_SUFFIXES, recursive)



def _rawmode(img: Image.Image) -> str:
    if not img.tile:
        return ""
    args = img.tile[0].args
    return args if isinstance(args, str) else str(args[0]) if args else ""


def _needs_16bit_decoder(img: Image.Image) -> bool:
    """A 16-bit colour PNG or TIFF, which Pillow would read as 8 bits (its 16-bit grey is exact)."""
    return img.format in ("PNG", "TIFF") and img.mode in ("RGB", "RGBA", "LA") and ";16" in _rawmode(img)


def _cv2(purpose: str, error: type[MSFINError] = ImageReadError):
    try:
        import cv2
    except ImportError:
        raise error(
            f"{purpose} needs OpenCV, which reads and writes 16-bit colour exactly (Pillow would reduce "
            "it to 8 bits): pip install 'msfin_fast[image16]'"
        ) from None
    return cv2


# EXIF orientation → numpy steps that make the pixels upright (as ImageOps.exif_transpose does).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation from the header (a PNG's eXIf chunk is read only when it comes before
    the pixels, which is where the specification puts it), without decoding any pixels."""
    if img.format == "PNG":
        raw = img.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112, 1)
    return img.getexif().get(0x0112, 1)


def _decode_16bit(source, img: Image.Image, label: str) -> Picture:
    """Decode the 16-bit colour file ``img`` (opened from ``source``) with OpenCV: RGB order, the
    EXIF orientation applied."""
    cv2 = _cv2(f"{label}: a 16-bit colour {img.format}")
    grey = _rawmode(img).startswith("LA")
    orientation = _orientation(img)
    if isinstance(source, (str, Path)):
        data = Path(source).read_bytes()
    else:
        source.seek(0)
        data = source.read()
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise ImageReadError(f"{label}: OpenCV cannot decode this 16-bit {img.format} file")
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) → RGB(A)
    picture = picture_from_array(np.ascontiguousarray(_ORIENT.get(orientation, lambda a: a)(arr)))
    picture.grey = picture.grey or grey  # OpenCV gives grey + alpha as BGRA
    return picture


def decode_image(source, label: str, check_size=None) -> Picture:
    """Decode an image from a path or a binary file object with one of :data:`READ_FORMATS`.

    ``label`` names the source in errors. ``check_size(width, height)`` runs before the pixels are
    decoded (after the header only) and may raise to refuse the image. The EXIF orientation is
    applied so the pixels are upright.
    """
    try:
        with Image.open(source, formats=READ_FORMATS) as img:
            if check_size is not None:
                check_size(*img.size)
            if _needs_16bit_decoder(img):
                return _decode_16bit(source, img, label)
            img.load()
            img = ImageOps.exif_transpose(img)
            return from_pil(img)
    except MSFINError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{label}: not an image file, or not one of {_FORMAT_NAMES}") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{label}: refused, too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{label}: cannot read image ({exc})") from None


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the header of the image file at ``path`` (no pixels are decoded), or
    None when it is not a readable image of :data:`READ_FORMATS`."""
    try:
        with Image.open(path, formats=READ_FORMATS) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def _trailer_complete(path: Path, fmt: str | None) -> bool:
    """The file ends where its format says it ends: PNG's IEND chunk, JPEG's EOI marker, the
    length that WebP's RIFF and BMP's headers declare. A TIFF's directory may sit anywhere, so
    for TIFF the header is all that is checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if fmt == "PNG":
            f.seek(max(size - len(_PNG_END), 0))
            return f.read() == _PNG_END
        if fmt == "JPEG":
            f.seek(max(size - 2, 0))
            return f.read() == b"\xff\xd9"
        if fmt == "WEBP":
            head = f.read(8)
            return head[:4] == b"RIFF" and int.from_bytes(head[4:8], "little") + 8 == size
        if fmt == "BMP":
            head = f.read(6)
            return int.from_bytes(head[2:6], "little") == size
    return True


def output_is_complete(src: str | Path, out: str | Path, scale: float) -> bool:
    """Whether ``out`` already holds a whole ×``scale`` output of ``src`` (a fractional scale as
    ``outscale`` rounds it): a readable image of
    :data:`READ_FORMATS`, ``scale`` times the source's size (either way round, since EXIF
    orientation may swap the sides), that ends where its format says it ends. The header and the
    last bytes are read, no pixels. Batch jobs use it to resume (this package writes atomically,
    so a partial output of its own never sits at ``out``; this also catches other truncations)."""
    out = Path(out)
    try:
        if not out.is_file() or out.stat().st_size == 0:
            return False
        source, result = header_size(src), header_size(out)
        if source is None or result is None:
            return False
        w, h = outscaled_size(source, scale)
        if result not in ((w, h), (h, w)):
            return False
        fmt = _output_format(out)[0]
        return _trailer_complete(out, fmt)
    except (OSError, ImageWriteError):
        return False


# The largest image (LR pixels, w·h) the CLI and Ray jobs take by default: 25 Mpx (5000×5000, a
# 20000×20000 output) runs in minutes on a CPU. A 100-Mpx PNG can be a 100 KB file; the header
# says so before anything is decoded.
DEFAULT_MAX_PIXELS = 25_000_000


def pixel_limit(max_pixels: int | None, label: str, flag: str = "--max-pixels"):
    """A ``check_size`` for :func:`decode_image` that refuses images over ``max_pixels`` (None: no
    limit but Pillow's own)."""
    if max_pixels is None:
        return None

    def check(w: int, h: int) -> None:
        if w * h > max_pixels:
            raise InvalidInputError(f"{label}: {w}×{h} is {w * h:,} pixels, over the limit of {max_pixels:,} "
                                    f"per image (raise it with {flag})")
    return check


def read_image(path: str | Path, max_pixels: int | None = None) -> Picture:
    """Read an image file (:data:`READ_FORMATS`); the EXIF orientation is applied. An image over
    ``max_pixels`` (w·h, read from the header) is refused before it is decoded."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    return decode_image(path, str(path), pixel_limit(max_pixels, str(path)))



def _output_format(path: Path) -> tuple[str, dict]:
    try:
        return WRITE_FORMATS[path.suffix.lower()]
    except KeyError:
        raise ImageWriteError(
            f"{path}: unsupported output type {path.suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(WRITE_FORMATS)}"
        ) from None


def check_output_folder(src: str | Path, dst: str | Path, recursive: bool = False) -> None:
    """Refuse an output folder that a folder job cannot use: a file, the input folder itself, or
    (when the input's whole tree is read) a folder inside the input."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not dst.is_dir():
        raise InvalidInputError(f"{dst}: the input is a folder, so the output must be a folder")
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise InvalidInputError(f"{dst}: output folder is the input folder; choose another")
    if recursive and s in d.parents:
        raise InvalidInputError(f"{dst}: is inside the input folder, whose whole tree is read; choose another")


def check_writable(path: str | Path, image: bool = True) -> None:
    """Fail early, before any computation, if ``path`` clearly cannot be written (as an image file,
    unless ``image`` is False)."""
    path = Path(path)
    if image:
        _output_format(path)
    if path.is_dir():
        raise ImageWriteError(f"{path}: is a folder; give a file name for the output")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ImageWriteError(f"{path}: cannot write, {ancestor} is not a folder")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ImageWriteError(f"{path}: cannot write into {ancestor} (permission denied)")
            break


_16BIT_FORMATS = ("PNG", "TIFF")


def encode_image(picture: Picture, fmt: str, label: str, **options) -> bytes:
    """The picture as a file of Pillow format ``fmt`` (PNG, JPEG, BMP, WEBP, TIFF), in bytes.

    A 16-bit picture stays 16-bit in PNG and TIFF (grey through Pillow, colour through OpenCV;
    16-bit grey with alpha is written as RGBA, since neither library writes 16-bit grey + alpha);
    other formats hold 8 bits, so it is rounded to 8 bits there, with a warning naming ``label``.
    """
    if picture.depth == 16 and fmt not in _16BIT_FORMATS:
        warnings.warn(f"{label}: {fmt} holds 8 bits per sample; the 16-bit result is rounded to 8 bits "
                      "(write PNG or TIFF to keep 16)")
        picture = picture.as_8bit()
    if picture.depth == 16 and not (picture.grey and picture.alpha is None):
        cv2 = _cv2(f"{label}: writing 16-bit colour", ImageWriteError)
        colour = np.repeat(grey_of(picture.rgb)[..., None], 3, 2) if picture.grey else picture.rgb[..., ::-1]
        parts = [colour] + ([] if picture.alpha is None else [picture.alpha[..., None]])
        params = [cv2.IMWRITE_PNG_COMPRESSION, min(int(options.get("compress_level", 6)), 9)] if fmt == "PNG" else []
        ok, data = cv2.imencode(".png" if fmt == "PNG" else ".tif", np.ascontiguousarray(np.concatenate(parts, 2)), params)
        if not ok:
            raise ImageWriteError(f"{label}: OpenCV could not encode the 16-bit {fmt}")
        return data.tobytes()
    img = to_pil(picture)
    if fmt in _NO_ALPHA_FORMATS and img.mode in ("RGBA", "LA"):
        warnings.warn(f"{label}: {fmt} has no transparency; the alpha channel is dropped")
        img = img.convert(img.mode[:-1])
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_image(path: str | Path, picture: Picture, before_commit=None) -> None:
    """Write atomically; the format follows the suffix (png, jpg, bmp, webp, tif). 16-bit pictures
    stay 16-bit in PNG and TIFF (:func:`encode_image`). ``before_commit(tmp)``: see
    :func:`~msfin_fast.fileio.atomic_write`."""
    path = Path(path)
    fmt, options = _output_format(path)
    check_writable(path)
    try:
        data = encode_image(picture, fmt, path.name, **options)
        with atomic_write(path, before_commit) as f:
            f.write(data)
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror or exc})") from None
