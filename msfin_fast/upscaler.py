"""The user-facing API: an Upscaler that takes PIL images, numpy arrays, tensors or files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DeviceError, InvalidInputError
from .images import (
    Picture,
    from_pil,
    picture_from_array,
    picture_to_array,
    read_image,
    to_pil,
    write_image,
)
from .model import MSFIN
from .weights import load_pretrained

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """'auto'/None → CUDA when present, else CPU; 'cpu', 'cuda', 'cuda:N' are checked."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise DeviceError(f"device type {device.type!r} is not supported; use cpu or cuda")
    return device


def resolve_dtype(spec: str | torch.dtype) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        if spec not in _DTYPES.values():
            raise DeviceError(f"dtype {spec} is not supported; use float32, float16 or bfloat16")
        return spec
    try:
        return _DTYPES[str(spec).lower()]
    except KeyError:
        raise DeviceError(f"unknown precision {spec!r}; use fp32, fp16 or bf16") from None


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """Float pixels in 0–255 (any shape) → uint8 numpy, clamped and rounded."""
    return t.float().clamp_(0, 255).round_().to(torch.uint8).cpu().numpy()


class Upscaler:
    """Super-resolve images with a pretrained MSFIN.

    >>> up = Upscaler("msfin-x4", device="auto")       # doctest: +SKIP
    >>> big = up.upscale(Image.open("photo.png"))        # PIL in, PIL out  # doctest: +SKIP

    ``upscale`` keeps the kind of its input: PIL → PIL, numpy uint8 (H×W, H×W×1, H×W×2, H×W×3 or
    H×W×4) → numpy uint8, float tensor [N, 3, h, w] in 0–255 → float tensor (unclamped).
    Greyscale stays greyscale; an alpha channel is upscaled bicubically beside the colour.
    """

    def __init__(
        self,
        model: str | MSFIN = "msfin-x4",
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = torch.float32,
        weights: str | Path | None = None,
        allow_download: bool = True,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if self.dtype == torch.float16 and self.device.type == "cpu":
            warnings.warn("float16 on the CPU is slow and no more accurate; prefer float32 there")
        if isinstance(model, MSFIN):
            self.name = "custom"
            self.model = model.to(device=self.device, dtype=self.dtype).eval()
        else:
            self.name = model
            self.model = load_pretrained(
                model, self.device, self.dtype, weights=weights, allow_download=allow_download
            )

    @property
    def scale(self) -> int:
        return self.model.scale

    @torch.inference_mode()
    def upscale_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, h, w] float in 0–255 → [N, 3, s·h, s·w] float, unclamped, on the input's device."""
        if not isinstance(x, torch.Tensor):
            raise InvalidInputError(f"expected a torch.Tensor [N, 3, h, w], got {type(x).__name__}")
        source_device = x.device
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self.model(x.to(self.device)).to(source_device)

    @torch.inference_mode()
    def upscale_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 RGB → (s·H)×(s·W)×3 uint8."""
        _check_uint8_image(rgb)
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device)
        x = x.permute(2, 0, 1)[None].to(self.dtype)
        return _to_uint8(self.model(x)[0].permute(1, 2, 0))

    @torch.inference_mode()
    def upscale_picture(self, picture: Picture) -> Picture:
        rgb = self.upscale_rgb(picture.rgb)
        alpha = None
        if picture.alpha is not None:
            a = torch.from_numpy(picture.alpha).to(self.device, torch.float32)[None, None]
            a = F.interpolate(a, scale_factor=self.scale, mode="bicubic", align_corners=False)
            alpha = _to_uint8(a[0, 0])
        return Picture(rgb, alpha, picture.grey)

    def upscale(self, image):
        if isinstance(image, Image.Image):
            return to_pil(self.upscale_picture(from_pil(image)))
        if isinstance(image, np.ndarray):
            channels = 0 if image.ndim == 2 else image.shape[-1]
            return picture_to_array(self.upscale_picture(picture_from_array(image)), channels)
        if isinstance(image, torch.Tensor):
            return self.upscale_tensor(image)
        raise InvalidInputError(
            f"cannot upscale a {type(image).__name__}; pass a PIL image, a uint8 numpy array "
            "or a float tensor [N, 3, h, w]"
        )

    def upscale_file(self, src: str | Path, dst: str | Path) -> tuple[tuple[int, int], tuple[int, int]]:
        """Read ``src``, upscale, write ``dst`` atomically; returns (input size, output size) as (w, h)."""
        picture = read_image(src)
        result = self.upscale_picture(picture)
        write_image(dst, result)
        return picture.size, result.size


def _check_uint8_image(rgb: np.ndarray) -> None:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3 and rgb.size):
        raise InvalidInputError(
            "expected a non-empty uint8 H×W×3 RGB array, got "
            f"{getattr(rgb, 'dtype', type(rgb).__name__)} {getattr(rgb, 'shape', '')}"
        )
