"""Reading and writing image files as uint8 RGB arrays (+ optional alpha), with typed errors.

Writes are atomic: the image goes to a hidden temporary file beside the target, which is renamed
over the target only once it is complete, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError, ImageWriteError, InvalidInputError, MSFINError
from .fileio import atomic_write

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


@dataclass
class Picture:
    """An image as the model sees it: uint8 RGB, plus what is needed to give it back its form.

    rgb:   H×W×3 uint8.
    alpha: H×W uint8, or None when the source had no transparency.
    grey:  the source was single-channel (it is replicated into ``rgb``; written back as grey).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    grey: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


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


def from_pil(img: Image.Image) -> Picture:
    """Convert any Pillow image to a Picture (palette, CMYK, 16-bit grey and 1-bit handled)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit (or 32-bit) greyscale: the model works in 8 bits, so scale 0..65535 to 0..255.
        if mode == "F":
            raise ImageReadError("unsupported image mode 'F' (floating-point samples); save it as 8- or 16-bit")
        values = np.asarray(img, dtype=np.float64)
        lo, hi = values.min(initial=0), values.max(initial=0)
        if lo < 0 or hi > 65535:
            # Refused rather than clipped: a clipped picture would be a different picture, silently.
            raise ImageReadError(
                f"unsupported 32-bit grey samples from {lo:.0f} to {hi:.0f}; only 0–65535 (16-bit) "
                "grey is read, and out-of-range values are refused rather than clipped"
            )
        img = Image.fromarray(np.round(values * (255.0 / 65535.0)).astype(np.uint8), mode="L")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGB")

    return picture_from_array(np.asarray(img, dtype=np.uint8))


def picture_from_array(arr: np.ndarray) -> Picture:
    """uint8 H×W (grey), H×W×1, H×W×2 (grey + alpha), H×W×3 (RGB) or H×W×4 (RGBA) → Picture."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        raise InvalidInputError(
            f"expected a uint8 image array, got {getattr(arr, 'dtype', type(arr).__name__)}; "
            "for float data use a tensor [N, 3, h, w] with values in 0–255"
        )
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or not 1 <= arr.shape[2] <= 4:
        raise InvalidInputError(
            f"expected an image array H×W, H×W×1, H×W×2, H×W×3 or H×W×4, got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInputError(f"empty image: shape {arr.shape}")
    grey = arr.shape[2] <= 2
    colour = np.repeat(arr[..., :1], 3, axis=2) if grey else arr[..., :3].copy()
    alpha = arr[..., -1].copy() if arr.shape[2] in (2, 4) else None
    return Picture(colour, alpha, grey)


def picture_to_array(picture: Picture, channels: int) -> np.ndarray:
    """Inverse of picture_from_array: H×W when ``channels`` is 0, else H×W×channels."""
    if picture.grey:
        colour = np.asarray(to_pil(Picture(picture.rgb, None, True)))[..., None]
    else:
        colour = picture.rgb
    parts = [colour] if picture.alpha is None else [colour, picture.alpha[..., None]]
    out = np.concatenate(parts, axis=2) if len(parts) > 1 else colour
    return out[..., 0] if channels == 0 else out


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


def output_is_complete(src: str | Path, out: str | Path, scale: int) -> bool:
    """Whether ``out`` already holds a whole ×``scale`` output of ``src``: a readable image of
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
        w, h = source
        if result not in ((scale * w, scale * h), (scale * h, scale * w)):
            return False
        fmt = _output_format(out)[0]
        return _trailer_complete(out, fmt)
    except (OSError, ImageWriteError):
        return False


def read_image(path: str | Path) -> Picture:
    """Read an image file (:data:`READ_FORMATS`); the EXIF orientation is applied."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file")
    return decode_image(path, str(path))


def to_pil(picture: Picture) -> Image.Image:
    """A Pillow image in the form of the source: L / LA for grey, RGB / RGBA otherwise."""
    rgb, alpha = picture.rgb, picture.alpha
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidInputError(f"expected uint8 H×W×3 RGB, got {rgb.dtype} {rgb.shape}")
    img = Image.fromarray(rgb, mode="RGB")
    if picture.grey:
        img = img.convert("L")
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha, mode="L"))
    return img


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


def write_image(path: str | Path, picture: Picture) -> None:
    """Write atomically; the format follows the suffix (png, jpg, bmp, webp, tif)."""
    path = Path(path)
    fmt, options = _output_format(path)
    check_writable(path)
    img = to_pil(picture)
    if fmt in _NO_ALPHA_FORMATS and img.mode in ("RGBA", "LA"):
        warnings.warn(f"{path.name}: {fmt} has no transparency; the alpha channel is dropped")
        img = img.convert(img.mode[:-1])
    try:
        with atomic_write(path) as f:
            img.save(f, format=fmt, **options)
    except OSError as exc:
        raise ImageWriteError(f"{path}: cannot write ({exc.strerror or exc})") from None
