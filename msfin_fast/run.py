"""Running the model on images: one layer under every door.

:class:`RunOptions` (whole image, plain or exact tiles, self-ensemble), the work a run costs
(:func:`estimated_work`, which services cap), whether a whole run fits in memory (:func:`fits_whole`:
the engine's own arena where it plans one, else the reference's estimate), the fall-back to tiles
and the retry on a GPU's out-of-memory error, self-ensemble, and the checks around a forward (exact
tiles need the reference; a non-finite output is an error). :func:`run_forward` runs one batch
tensor; :class:`BatchRunner` runs batches of pixel arrays (pinned copies and CUDA graphs on a GPU)
for the serving worker and the video pipeline. The Upscaler, serving, video and Ray all run here."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .config import MSFINConfig
from .engine.cuda_graphs import CapturedGraph, ShapeCache
from .ensemble import self_ensemble as run_self_ensemble
from .errors import DeviceError, InvalidInputError, NonFiniteOutputError
from .model import MSFIN
from .pictures import quantize, to_model_input
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


def fits_whole(model: torch.nn.Module, n: int, h: int, w: int, dtype: torch.dtype, budget: int | None) -> bool:
    """Whether a whole run of ``n`` h×w LR images fits in ``budget`` bytes (None: unknown, taken as
    fitting): the engine's arena (with headroom) where it plans one, else the reference's estimate
    for an MSFIN; a module of neither kind is taken as fitting (its out-of-memory error is caught)."""
    if budget is None:
        return True
    arena = _engine_arena(model)
    if arena is not None:
        return arena(n, h, w) * ENGINE_HEADROOM <= budget
    config = model_config(model)
    return config is None or fits(config, dtype, (n, 3, h, w), budget)


def _whole_or_tiled(model: torch.nn.Module, x: torch.Tensor, options: RunOptions) -> torch.Tensor:
    if options.tile is not None:
        return _tiled(model, x, options.tile, options)
    config = model_config(model)
    if not options.auto_tile:
        return model(x)
    budget = available_memory(x.device)
    n, h, w = _lr_shape(x)
    if not fits_whole(model, n, h, w, x.dtype, budget):
        arena = _engine_arena(model)
        if arena is not None:
            # The engine plans its activations per shape, so its own arena size is the estimate.
            tile = max(h, w)
            while tile > MIN_TILE and arena(n, tile + 2 * options.tile_pad, tile + 2 * options.tile_pad) * ENGINE_HEADROOM > budget:
                tile //= 2
            tile = max(tile, MIN_TILE)
            need = f"would need a {arena(n, h, w) / 2**30:.1f} GiB arena, more than {budget / 2**30:.1f} GiB free"
        else:
            tile = choose_tile(config, x.dtype, n, budget, options.tile_pad)
            need = f"would not fit in {budget / 2**30:.1f} GiB"
        warnings.warn(f"a whole {h}×{w} run (batch {n}) {need} on {x.device}; running {options.tile_mode} "
                      f"tiles of {tile} px")
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


def check_exact_tiles(tile_mode: str, backend: str, model: torch.nn.Module | None = None) -> None:
    """Exact tiles walk the reference MSFIN's graph: refuse them on any other backend (checked
    before a model is built) or with a module that is not an MSFIN."""
    if tile_mode != "exact":
        return
    if backend != "reference":
        raise InvalidInputError(f"exact tiles walk the reference MSFIN's graph, which the {backend} backend "
                                "does not run; use backend='reference' (--backend reference)")
    if model is not None and not isinstance(model, MSFIN):
        raise InvalidInputError(f"exact tiles walk the reference MSFIN's graph; {type(model).__name__} is not "
                                "one. Use tile_mode='plain'")


def ensembled(forward, x: torch.Tensor, options: RunOptions) -> torch.Tensor:
    """``forward(x)``, averaged over the 8 flips and rotations when ``options`` ask for self-ensemble."""
    return run_self_ensemble(forward, x) if options.self_ensemble else forward(x)


def run_forward(model: torch.nn.Module, x: torch.Tensor, options: RunOptions) -> torch.Tensor:
    """``model(x)`` with the tiling and self-ensemble that ``options`` ask for ([N,3,h,w] 0–255)."""
    return ensembled(lambda batch: _whole_or_tiled(model, batch, options), x, options)


class BatchRunner:
    """Runs batches of same-shape uint8 (or uint16) H×W×3 images through an :class:`Upscaler`'s
    model, giving (s·H)×(s·W)×3 images of the same dtype and a finite flag per image. Used by one thread at a time (the
    serving worker, the video pipeline's compute stage).

    On CUDA the copies go through pinned host memory on a dedicated stream, and whole-image runs
    replay captured CUDA graphs, one per (batch shape, options), kept in an LRU of ``graph_cache``
    entries (0: no graphs); ``on_graph(hit)`` hears of each replay (True) and capture (False). On
    the CPU images run one at a time, through the same steps as ``Upscaler.upscale_rgb``.
    """

    def __init__(self, upscaler, graph_cache: int = 8, on_graph=None):
        self.model, self.device, self.dtype = upscaler.model, upscaler.device, upscaler.dtype
        self.scale = upscaler.scale
        self._cuda = self.device.type == "cuda"
        self._graph_cache = graph_cache if self._cuda else 0
        self.graphs = ShapeCache(max(graph_cache, 1))  # (batch shape, options) → CapturedGraph
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._on_graph = on_graph or (lambda hit: None)

    @torch.inference_mode()
    def _infer(self, pixels: torch.Tensor, options: RunOptions,
               whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8/uint16 NHWC on the device → (NHWC of that dtype, a bool per image: finite) on the
        device. ``whole``: the graphed path, no tiles and no host sync (integer input is finite)."""
        x = to_model_input(pixels, self.dtype)
        if whole:
            y = ensembled(unchecked(self.model), x, options)
        else:
            y = run_forward(self.model, x, options)
        finite = torch.isfinite(y).flatten(1).all(1)
        return quantize(y, pixels.dtype).permute(0, 2, 3, 1).contiguous(), finite

    def run(self, images: np.ndarray, options: RunOptions) -> tuple[np.ndarray, np.ndarray]:
        if not self._cuda:
            # Image by image: oneDNN's grouped convolutions round differently at different batch
            # sizes, so a batch would not give the bytes the API gives; on a CPU one image at a time
            # is also faster (4 × 64² MSFIN-S: 0.68 s against 1.03 s as one batch).
            outs, flags = [], []
            for i in range(len(images)):
                out, finite = self._infer(torch.from_numpy(images[i:i + 1]), options)
                outs.append(out.numpy()[0])
                flags.append(bool(finite[0]))
            return np.stack(outs), np.array(flags)
        dtype = torch.from_numpy(images[:0]).dtype
        host_in = torch.empty(images.shape, dtype=dtype, pin_memory=True)
        host_in.numpy()[...] = images
        n, h, w, c = images.shape
        host_out = torch.empty((n, h * self.scale, w * self.scale, c), dtype=dtype, pin_memory=True)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            entry = self._graph_for(images.shape, dtype, options)
            if entry is not None:
                static_out, static_finite = entry.replay(host_in)
                host_out.copy_(static_out, non_blocking=True)
                finite = static_finite.clone()
            else:
                y, finite = self._infer(host_in.to(self.device, non_blocking=True), options)
                host_out.copy_(y, non_blocking=True)
            self._stream.synchronize()
        return host_out.numpy(), finite.cpu().numpy()

    def _graph_for(self, shape: tuple[int, ...], dtype: torch.dtype, options: RunOptions) -> CapturedGraph | None:
        """The cached graph for this batch, capturing it on a miss; None when it cannot be graphed."""
        if not self._graph_cache or options.tile is not None:
            return None
        key = (shape, dtype, options)
        entry = self.graphs.get(key)
        if entry is not None:
            self._on_graph(True)
            return entry
        batch = shape[0] * (8 if options.self_ensemble else 1)
        if options.auto_tile and not fits_whole(self.model, batch, shape[1], shape[2], self.dtype,
                                                available_memory(self.device)):
            return None
        try:
            entry = self._capture(shape, dtype, options)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        self.graphs.put(key, entry)
        self._on_graph(False)
        return entry

    def _capture(self, shape: tuple[int, ...], dtype: torch.dtype, options: RunOptions) -> CapturedGraph:
        static_in = torch.zeros(shape, dtype=dtype, device=self.device)
        # Two warm-ups (kernel selection, lazy init) outside the capture, on the serving stream.
        return CapturedGraph(lambda x: self._infer(x, options, whole=True), (static_in,), warmup=2,
                             stream=self._stream)
