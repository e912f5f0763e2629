"""The user-facing API: an Upscaler that takes PIL images, numpy arrays, tensors or files.

It composes the two halves of the package: ``load_pretrained`` (weights) and, for any backend but
the reference, ``optimize`` (the engine)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .devices import dtype_name, resolve_device, resolve_dtype
from .errors import InvalidInputError
from .images import read_image, write_image
from .model import MSFIN, check_input
from .pictures import (
    Picture,
    check_rgb,
    from_pil,
    picture_from_array,
    picture_to_array,
    outscaled_size,
    quantize,
    resized,
    to_model_input,
    to_pil,
    upscaled,
)
from .run import RunOptions, check_exact_tiles, check_output, prepare, run_forward
from .tiling import DEFAULT_TILE_PAD
from .weights import check_values, load_pretrained


class Upscaler:
    """Super-resolve images with a pretrained MSFIN.

    >>> up = Upscaler("msfin-x4", device="auto")       # doctest: +SKIP
    >>> big = up.upscale(Image.open("photo.png"))        # PIL in, PIL out  # doctest: +SKIP

    ``upscale`` keeps the kind of its input: PIL → PIL, numpy uint8 or uint16 (H×W, H×W×1, H×W×2,
    H×W×3 or H×W×4) → numpy of the same dtype (16-bit runs on the 0–255 scale in float and is
    rounded back to 16 bits), float tensor [N, 3, h, w] in 0–255 → float tensor (unclamped).
    Greyscale stays greyscale; an alpha channel is upscaled bicubically beside the colour.

    ``tile``/``tile_pad``/``tile_mode``/``self_ensemble``/``auto_tile`` are the fields of
    :class:`RunOptions`. ``outscale``: the size of a picture's output (PIL, numpy, files) as a
    multiple of its input, any number > 0 (the network's ×4 result resized with Lanczos, as
    Real-ESRGAN's ``--outscale``); None (the default) keeps the network's scale. Tensors always get
    the network's scale. ``model`` may be a preset name, a reference ``MSFIN`` or any module with
    its call signature (float [N,3,h,w] in 0–255 → [N,3,s·h,s·w]; without a ``scale`` attribute it
    is taken as ×4; exact tiles need the reference MSFIN).
    """

    def __init__(
        self,
        model: str | torch.nn.Module = "msfin-x4",
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = torch.float32,
        weights: str | Path | None = None,
        allow_download: bool = True,
        tile: int | None = None,
        tile_pad: int = DEFAULT_TILE_PAD,
        tile_mode: str = "plain",
        self_ensemble: bool = False,
        auto_tile: bool = True,
        backend: str | None = None,
        outscale: float | None = None,
    ):
        self.outscale = check_outscale(outscale)
        self.options = RunOptions(tile, tile_pad, tile_mode, self_ensemble, auto_tile)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if backend is None:  # every door's default: the engine on a CPU, the reference on a GPU and for exact tiles
            from .engine import default_backend

            backend = default_backend(self.device, tile_mode, model)
        self.weights, self.requested_backend = weights, backend
        check_exact_tiles(tile_mode, backend)  # before any weights load
        if self.dtype == torch.float16 and self.device.type == "cpu" and backend == "reference":
            warnings.warn("float16 on the CPU is slow and no more accurate; prefer float32 there")
        # The engine is built from the fp32 model and runs in self.dtype; the reference runs in it.
        load_dtype = self.dtype if backend == "reference" else torch.float32
        if isinstance(model, torch.nn.Module):
            self.name = "custom"
            check_values(model.named_parameters(), f"the given {type(model).__name__}")
            self.model = model.to(device=self.device, dtype=load_dtype).eval()
        else:
            self.name = model
            self.model = load_pretrained(
                model, self.device, load_dtype, weights=weights, allow_download=allow_download
            )
        if backend != "reference":
            if not isinstance(self.model, MSFIN):
                raise InvalidInputError(f"backend={backend!r} builds the engine from an MSFIN model, "
                                        f"not {type(self.model).__name__}")
            from .engine import optimize

            # bf16 holds 0–255 only to 0.5–1 grey levels: the image comes back fp32, rounded once
            out = torch.float32 if self.dtype == torch.bfloat16 else None
            self.model = optimize(self.model, dtype=self.dtype, backend=backend, output_dtype=out)
        self.backend = getattr(self.model, "backend", "reference")
        check_exact_tiles(tile_mode, self.backend, self.model)
        prepare(self.model, self.dtype, self.options)

    @property
    def scale(self) -> int:
        return getattr(self.model, "scale", 4)

    @functools.cached_property
    def recipe(self) -> dict:
        """What decides this upscaler's pixels, as a folder run's manifest records it
        (:func:`msfin_fast.resume.recipe`): model, weights hash, dtype, backend as asked, run options."""
        from .resume import recipe

        weights = self.weights
        if self.name == "custom":
            weights = self.model  # hashed from its parameters
        # outscale only when given: manifests written before the option still match
        extra = {} if self.outscale is None else {"outscale": self.outscale}
        return recipe(self.name, weights, dtype=dtype_name(self.dtype), backend=self.requested_backend,
                      options=self.options, **extra)

    @property
    def output_scale(self) -> float:
        """How many times larger a picture's output is: ``outscale``, else the network's scale."""
        return self.scale if self.outscale is None else self.outscale

    def describe(self) -> tuple[str, str]:
        """(model, where) as the summaries say them: ``("msfin-x4+", "cpu (fp32)")``."""
        return (f"{self.name}{'+' if self.options.self_ensemble else ''}",
                f"{self.device} ({dtype_name(self.dtype)})")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = run_forward(self.model, x, self.options)
        check_output(y, x)
        return y

    @torch.inference_mode()
    def upscale_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, h, w] float in 0–255 → [N, 3, s·h, s·w] float, unclamped, on the input's device.

        Raises InvalidInputError for anything else (checked before any work) and
        NonFiniteOutputError when the output would hold NaN or Inf.
        """
        check_input(x)
        source_device = x.device
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self._forward(x.to(self.device)).to(source_device)

    @torch.inference_mode()
    def upscale_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """H×W×3 uint8 RGB → (s·H)×(s·W)×3 uint8; uint16 → uint16 (run on the 0–255 scale in float)."""
        check_rgb(rgb)
        pixels = torch.from_numpy(np.ascontiguousarray(rgb))
        x = to_model_input(pixels[None].to(self.device), self.dtype)
        return quantize(self._forward(x)[0].permute(1, 2, 0), pixels.dtype).cpu().numpy()

    @torch.inference_mode()
    def upscale_picture(self, picture: Picture) -> Picture:
        result = upscaled(picture, self.upscale_rgb(picture.rgb), self.scale)
        if self.outscale is not None:
            result = resized(result, outscaled_size(picture.size, self.outscale))
        return result

    def upscale(self, image):
        if isinstance(image, Image.Image):
            return to_pil(self.upscale_picture(from_pil(image)))
        if isinstance(image, np.ndarray):
            channels = 0 if image.ndim == 2 else image.shape[-1]
            return picture_to_array(self.upscale_picture(picture_from_array(image)), channels)
        if isinstance(image, torch.Tensor):
            return self.upscale_tensor(image)
        raise InvalidInputError(
            f"cannot upscale a {type(image).__name__}; pass a PIL image, a uint8 or uint16 numpy array "
            "or a float tensor [N, 3, h, w]"
        )

    def upscale_file(self, src: str | Path, dst: str | Path, *, max_pixels: int | None = None,
                     before_commit=None) -> tuple[tuple[int, int], tuple[int, int]]:
        """Read ``src``, upscale, write ``dst`` atomically; returns (input size, output size) as (w, h).

        ``max_pixels``: refuse an input over this many pixels (w·h, from its header) before decoding
        it. ``before_commit(tmp)`` runs on the finished temporary file before it is renamed to ``dst``.
        """
        picture = read_image(src, max_pixels)
        result = self.upscale_picture(picture)
        write_image(dst, result, before_commit)
        return picture.size, result.size


def check_outscale(outscale) -> float | None:
    """``outscale`` as a float, or None; InvalidInputError for anything not a finite number > 0."""
    if outscale is None:
        return None
    try:
        value = float(outscale)
    except (TypeError, ValueError):
        raise InvalidInputError(f"outscale must be a number, got {outscale!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise InvalidInputError(f"outscale must be a number above 0, got {outscale!r}")
    return value

