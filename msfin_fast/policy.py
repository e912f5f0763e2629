"""How one forward runs: the run options, tiling and memory policy, self-ensemble, and the checks
around it (model input layout, non-finite output). The Upscaler, the serving upscaler and the
service all run images through here."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import MSFINConfig
from .ensemble import self_ensemble as run_self_ensemble
from .errors import DeviceError, InvalidInputError, NonFiniteOutputError
from .model import MSFIN
from .tiling import (
    DEFAULT_TILE_PAD,
    MIN_TILE,
    available_memory,
    bytes_per_output_pixel,
    choose_tile,
    exact_tiled_forward,
    fits,
    prepare_exact,
    tiled_forward,
)

TILE_MODES = ("plain", "exact")


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


@dataclass(frozen=True)
class RunOptions:
    """How one forward runs: whole image, plain or exact tiles, with or without self-ensemble.

    tile:          LR tile side, at least ``MIN_TILE`` (8); None runs the whole image (falling back
                   to tiles when it would not fit and ``auto_tile`` is on).
    tile_pad:      LR pixels of context around each plain tile.
    tile_mode:     "plain" (fast; CA pools per tile) or "exact" (the whole-image result, slower);
                   an automatic fall-back to tiles uses the same mode.
    self_ensemble: average the 8 flips/rotations (MSFIN+).
    auto_tile:     estimate memory first and retry tiled on a CUDA out-of-memory error.
    """

    tile: int | None = None
    tile_pad: int = DEFAULT_TILE_PAD
    tile_mode: str = "plain"
    self_ensemble: bool = False
    auto_tile: bool = True

    def __post_init__(self) -> None:
        if self.tile is not None and (not isinstance(self.tile, int) or isinstance(self.tile, bool)
                                      or self.tile < 1):
            raise InvalidInputError(f"tile must be a positive number of LR pixels or None, got {self.tile!r}")
        if self.tile is not None and self.tile < MIN_TILE:
            # Every tile costs a whole forward's worth of calls: tile=1 on a 16×16 image took 11 s
            # (99 s with self-ensemble) for what a whole-image run does in 0.05 s.
            raise InvalidInputError(f"tile={self.tile} is too small; tiles are at least {MIN_TILE} LR pixels")
        if not isinstance(self.tile_pad, int) or isinstance(self.tile_pad, bool) or self.tile_pad < 0:
            raise InvalidInputError(f"tile_pad must be a non-negative number of LR pixels, got {self.tile_pad!r}")
        if self.tile_mode not in TILE_MODES:
            raise InvalidInputError(f"tile_mode must be one of {', '.join(TILE_MODES)}, got {self.tile_mode!r}")


# What one model call costs beyond its pixels, in LR pixels of work: fitted on a CPU (MSFIN and
# MSFIN-S, 8² to 64² LR, plain and exact tiles of 8 to 32), where a call's fixed cost was 145–153.
CALL_COST = 150
# The context an exact tile recomputes around itself, in LR pixels (its layers' halos, about 1 LR
# pixel each); plain tiles recompute ``tile_pad``.
EXACT_HALO = 1


def _axis_work(length: int, tile: int, pad: int) -> tuple[int, int]:
    """(Σ padded tile lengths, number of tiles) along one axis."""
    total = count = 0
    for start in range(0, length, tile):
        end = min(start + tile, length)
        total += min(end + pad, length) - max(start - pad, 0)
        count += 1
    return total, count


def estimated_work(h: int, w: int, options: RunOptions, batch: int = 1) -> float:
    """The work of one run of an h×w LR image under ``options``, in LR pixels of whole-image work.

    A whole image costs h·w (plus one call). Tiles cost their padded area plus ``CALL_COST`` each;
    self-ensemble costs 8 runs. Services cap requests with it (``Limits.max_work``).
    """
    if options.tile is None:
        work = h * w + CALL_COST
    else:
        pad = options.tile_pad if options.tile_mode == "plain" else EXACT_HALO
        (sum_y, n_y), (sum_x, n_x) = _axis_work(h, options.tile, pad), _axis_work(w, options.tile, pad)
        work = sum_y * sum_x + n_y * n_x * CALL_COST
    return batch * work * (8 if options.self_ensemble else 1)


def unchecked(model: torch.nn.Module):
    """``model`` called without its input's NaN/Inf test (a host sync, which a CUDA-graph capture
    forbids): the package's own modules take ``check_finite=False``; other modules are called as they are."""
    if getattr(type(model).forward, "__kwdefaults__", None) and "check_finite" in type(model).forward.__kwdefaults__:
        return functools.partial(model, check_finite=False)
    return model


def model_config(model: torch.nn.Module) -> MSFINConfig | None:
    config = getattr(model, "config", None)
    return config if isinstance(config, MSFINConfig) else None


def _tiled(model: torch.nn.Module, x: torch.Tensor, tile: int, options: RunOptions) -> torch.Tensor:
    if options.tile_mode == "exact":
        # Whole maps on the host when the model is on a GPU: device memory stays at a few tiles.
        storage = "cpu" if x.device.type == "cuda" else None
        return exact_tiled_forward(model, x, tile, storage=storage)
    return tiled_forward(model, x, tile, options.tile_pad)


# The engine's arena holds its activations; PyTorch-run layers, the input and the output come on top.
ENGINE_HEADROOM = 1.5


def _lr_shape(x: torch.Tensor) -> tuple[int, int, int]:
    return x.shape[0], x.shape[-2], x.shape[-1]


def _engine_arena(model: torch.nn.Module):
    """``arena_bytes(n, h, w)`` of a fast engine that plans one, else None."""
    return model.arena_bytes if getattr(model, "has_arena", False) else None


def _whole_or_tiled(model: torch.nn.Module, x: torch.Tensor, options: RunOptions) -> torch.Tensor:
    if options.tile is not None:
        return _tiled(model, x, options.tile, options)
    config = model_config(model)
    if not options.auto_tile:
        return model(x)
    budget = available_memory(x.device)
    arena = _engine_arena(model)
    if arena is not None and budget is not None and arena(*_lr_shape(x)) * ENGINE_HEADROOM > budget:
        # The engine plans its activations per shape, so its own arena size is the estimate.
        n, h, w = _lr_shape(x)
        tile = max(h, w)
        while tile > MIN_TILE and arena(n, tile + 2 * options.tile_pad, tile + 2 * options.tile_pad) * ENGINE_HEADROOM > budget:
            tile //= 2
        tile = max(tile, MIN_TILE)
        warnings.warn(
            f"a whole {h}×{w} run (batch {n}) would need a {arena(n, h, w) / 2**30:.1f} GiB arena, more than "
            f"{budget / 2**30:.1f} GiB free on {x.device}; running {options.tile_mode} tiles of {tile} px"
        )
        return _tiled(model, x, tile, options)
    if arena is None and config is not None and budget is not None and not fits(config, x.dtype, tuple(x.shape), budget):
        tile = choose_tile(config, x.dtype, x.shape[0], budget, options.tile_pad)
        warnings.warn(
            f"a whole {x.shape[-2]}×{x.shape[-1]} run (batch {x.shape[0]}) would not fit in "
            f"{budget / 2**30:.1f} GiB on {x.device}; running {options.tile_mode} tiles of {tile} px"
        )
        return _tiled(model, x, tile, options)
    try:
        return model(x)
    except torch.cuda.OutOfMemoryError:
        if config is None and options.tile_mode == "exact":
            raise
    # Out of memory on the GPU: free what the failed run cached, then retry with smaller tiles.
    if x.device.type == "cuda":
        torch.cuda.empty_cache()
    budget = available_memory(x.device) or 0
    tile = (choose_tile(config, x.dtype, x.shape[0], budget, options.tile_pad) if config is not None
            else max(x.shape[-2], x.shape[-1]) // 2)
    while True:
        tile = max(min(tile, max(x.shape[-2], x.shape[-1]) // 2), MIN_TILE)
        warnings.warn(f"out of memory on {x.device} for a whole {x.shape[-2]}×{x.shape[-1]} run; "
                      f"retrying with {options.tile_mode} tiles of {tile} px")
        try:
            return _tiled(model, x, tile, options)
        except torch.cuda.OutOfMemoryError:
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            if tile <= MIN_TILE:
                raise DeviceError(
                    f"out of memory on {x.device} even with {tile}-pixel tiles; free GPU memory, "
                    "use --fp16, or run on --device cpu"
                ) from None
            tile //= 2


def non_finite_error(bad: int | None, shape: tuple, dtype: torch.dtype, lo: float = 0.0, hi: float = 255.0):
    """The NonFiniteOutputError for ``bad`` (None: uncounted) NaN/Inf values in an output of ``shape``."""
    if lo < -1 or hi > 256:
        why = f"the input's values run from {lo:g} to {hi:g}; the model takes pixels in 0–255"
    elif dtype in (torch.float16, torch.bfloat16):
        why = "an activation overflowed in reduced precision; run this image in fp32"
    else:
        why = "the weights or the model are broken (a finite 0–255 input gave NaN/Inf in fp32)"
    return NonFiniteOutputError(
        f"the model produced {bad or 'some'} NaN/Inf value(s) in a {tuple(shape)} output; {why}. "
        "No image was made from it"
    )


def check_output(y: torch.Tensor, x: torch.Tensor) -> None:
    """Raise NonFiniteOutputError when ``y`` (the model's output for ``x``) holds NaN or Inf."""
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else y.dtype
        raise non_finite_error(bad, tuple(y.shape), dtype, float(x.min()), float(x.max()))


def prepare(model: torch.nn.Module, dtype: torch.dtype, options: RunOptions) -> None:
    """Compute up front what a run of ``model`` looks up (the memory estimate, the exact-tile graph),
    so that concurrent first calls find it ready."""
    config = model_config(model)
    if config is not None and _engine_arena(model) is None:
        bytes_per_output_pixel(config, dtype)
    if isinstance(model, MSFIN) and options.tile_mode == "exact":
        prepare_exact(model)


def run_forward(model: torch.nn.Module, x: torch.Tensor, options: RunOptions) -> torch.Tensor:
    """``model(x)`` with the tiling and self-ensemble that ``options`` ask for ([N,3,h,w] 0–255)."""
    def forward(batch: torch.Tensor) -> torch.Tensor:
        return _whole_or_tiled(model, batch, options)

    if options.self_ensemble:
        return run_self_ensemble(forward, x)
    return forward(x)
