"""Pictures and the model's tensors: one module for every conversion in and out.

A :class:`Picture` is an image as the model sees it (RGB samples, uint8 or uint16) plus what gives
it back its form (alpha, grey). Pillow images and numpy arrays become Pictures and back
(:func:`from_pil`, :func:`picture_from_array`, :func:`to_pil`, :func:`picture_to_array`); pixels
become the model's float input and its output becomes pixels (:func:`to_model_input`,
:func:`quantize`), the same way on every path (API, CLI, service, video, Ray), so that all of them
give the same bytes; :func:`upscaled` rebuilds the output picture (alpha upscaled bicubically, grey
kept). Files are :mod:`msfin_fast.images`' business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageReadError, InvalidInputError


@dataclass
class Picture:
    """An image as the model sees it: RGB samples, plus what is needed to give it back its form.

    rgb:   H×W×3 uint8, or uint16 for a 16-bit source.
    alpha: H×W of the same dtype, or None when the source had no transparency.
    grey:  the source was single-channel (it is replicated into ``rgb``; written back as grey).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    grey: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def depth(self) -> int:
        """Bits per sample: 8 or 16."""
        return 16 if self.rgb.dtype == np.uint16 else 8

    def as_8bit(self) -> "Picture":
        """The picture with 8-bit samples (16-bit ones rounded: v · 255 / 65535)."""
        if self.depth == 8:
            return self
        alpha = None if self.alpha is None else to_8bit(self.alpha)
        return Picture(to_8bit(self.rgb), alpha, self.grey)

def to_8bit(values: np.ndarray) -> np.ndarray:
    """uint16 samples → uint8, rounded to the nearest of the 256 levels."""
    return np.round(values.astype(np.float32) * np.float32(255 / 65535)).astype(np.uint8)

def from_pil(img: Image.Image) -> Picture:
    """Convert any Pillow image to a Picture (palette, CMYK, 16-bit grey and 1-bit handled)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit (or 32-bit) greyscale, which Pillow reads exactly: kept as 16-bit samples.
        if mode == "F":
            raise ImageReadError("unsupported image mode 'F' (floating-point samples); save it as 8- or 16-bit")
        values = np.asarray(img, dtype=np.int64)
        lo, hi = values.min(initial=0), values.max(initial=0)
        if lo < 0 or hi > 65535:
            # Refused rather than clipped: a clipped picture would be a different picture, silently.
            raise ImageReadError(
                f"unsupported 32-bit grey samples from {lo} to {hi}; only 0–65535 (16-bit) "
                "grey is read, and out-of-range values are refused rather than clipped"
            )
        return picture_from_array(values.astype(np.uint16))
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
    """uint8 or uint16 H×W (grey), H×W×1, H×W×2 (grey + alpha), H×W×3 (RGB) or H×W×4 (RGBA) → Picture."""
    if not isinstance(arr, np.ndarray) or arr.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(
            f"expected a uint8 or uint16 image array, got {getattr(arr, 'dtype', type(arr).__name__)}; "
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
        colour = grey_of(picture.rgb)[..., None]
    else:
        colour = picture.rgb
    parts = [colour] if picture.alpha is None else [colour, picture.alpha[..., None]]
    out = np.concatenate(parts, axis=2) if len(parts) > 1 else colour
    return out[..., 0] if channels == 0 else out

def grey_of(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 → H×W grey of the same dtype, with Pillow's "L" conversion (ITU-R 601-2 luma) for
    uint8, and the same weights, rounded, for uint16."""
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"))
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.round(luma), 0, 65535).astype(np.uint16)

def to_pil(picture: Picture) -> Image.Image:
    """A Pillow image in the form of the source: L / LA for grey, RGB / RGBA otherwise; a 16-bit
    grey picture without alpha gives I;16 (Pillow has no other 16-bit mode)."""
    rgb, alpha = picture.rgb, picture.alpha
    if picture.depth == 16 and picture.grey and alpha is None and rgb.ndim == 3:
        return Image.fromarray(grey_of(rgb))
    if picture.depth == 16:
        raise InvalidInputError(
            "Pillow has no 16-bit colour mode; write 16-bit colour with write_image (PNG or TIFF), "
            "take it as a uint16 array, or reduce it with Picture.as_8bit()"
        )
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidInputError(f"expected uint8 H×W×3 RGB, got {rgb.dtype} {rgb.shape}")
    img = Image.fromarray(rgb, mode="RGB")
    if picture.grey:
        img = img.convert("L")
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha, mode="L"))
    return img


def check_rgb(rgb: np.ndarray) -> None:
    """Raise InvalidInputError unless ``rgb`` is a non-empty uint8 or uint16 H×W×3 array."""
    if not (isinstance(rgb, np.ndarray) and rgb.dtype in (np.uint8, np.uint16) and rgb.ndim == 3
            and rgb.shape[2] == 3 and rgb.size):
        raise InvalidInputError(
            "expected a non-empty uint8 or uint16 H×W×3 RGB array, got "
            f"{getattr(rgb, 'dtype', type(rgb).__name__)} {getattr(rgb, 'shape', '')}"
        )


# 16-bit samples run on the model's 0–255 scale: v · 255 / 65535, in float, and back.
_U16_TO_255 = 255.0 / 65535.0


def to_model_input(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 or uint16 [N, H, W, 3] → float [N, 3, H, W] on the 0–255 scale, with the same strides
    on every path (channels-last, the faster layout for the reference on a CPU). Convolution
    libraries pick their algorithm by layout, and a different algorithm may round a pixel the other
    way, so the API, the CLI and the service all go through here to give byte-identical images.
    16-bit values are scaled in fp32 before any cast (65535 is past fp16's largest value)."""
    n, h, w, c = pixels.shape
    x = torch.empty((n, c, h, w), dtype=dtype, device=pixels.device, memory_format=torch.channels_last)
    if pixels.dtype == torch.uint16:
        return x.copy_(pixels.permute(0, 3, 1, 2).float().mul_(_U16_TO_255))
    return x.copy_(pixels.permute(0, 3, 1, 2))


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """H×W uint8 or uint16 alpha → (s·H)×(s·W) of the same dtype, bicubic, computed on the CPU
    wherever the model runs (so every path gives the same bytes)."""
    a = torch.from_numpy(np.ascontiguousarray(alpha)).float()[None, None]
    a = F.interpolate(a, scale_factor=scale, mode="bicubic", align_corners=False)
    if alpha.dtype == np.uint16:
        return a[0, 0].clamp_(0, 65535).round_().to(torch.uint16).numpy()
    return to_uint8(a[0, 0])


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """Float pixels in 0–255 (any shape) → uint8 numpy, clamped and rounded."""
    return quantize(t).cpu().numpy()


def quantize(t: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Float pixels in 0–255 → uint8 (or uint16: 0–65535) on the same device, clamped and rounded."""
    if dtype == torch.uint16:
        return t.float().mul_(1.0 / _U16_TO_255).clamp_(0, 65535).round_().to(torch.uint16)
    return t.float().clamp_(0, 255).round_().to(torch.uint8)


def upscaled(picture: Picture, rgb: np.ndarray, scale: int) -> Picture:
    """The output picture of ``picture`` whose colour the model upscaled to ``rgb``: its alpha upscaled
    bicubically (:func:`upscale_alpha`), grey kept grey."""
    alpha = None if picture.alpha is None else upscale_alpha(picture.alpha, scale)
    return Picture(rgb, alpha, picture.grey)


def resized(picture: Picture, size: tuple[int, int]) -> Picture:
    """``picture`` resized to ``size`` (w, h) with Lanczos (Pillow's, a = 3), channel by channel in
    float so that 8- and 16-bit samples, colour and alpha take the one path; rounded back to the
    picture's dtype. What ``outscale`` does to the ×4 result, as Real-ESRGAN's ``--outscale``."""
    if picture.size == tuple(size):
        return picture

    def channel(values: np.ndarray) -> np.ndarray:
        img = Image.fromarray(values.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS)
        top = 65535 if values.dtype == np.uint16 else 255
        return np.clip(np.rint(np.asarray(img)), 0, top).astype(values.dtype)

    rgb = np.stack([channel(picture.rgb[..., c]) for c in range(3)], axis=-1)
    alpha = None if picture.alpha is None else channel(picture.alpha)
    return Picture(rgb, alpha, picture.grey)


def outscaled_size(size: tuple[int, int], outscale: float) -> tuple[int, int]:
    """The output size for ``outscale`` times the input's ``size`` (w, h), at least 1×1."""
    return tuple(max(1, int(round(v * outscale))) for v in size)

