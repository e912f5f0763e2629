"""The user-facing API: an Upscaler that takes PIL images, numpy arrays, tensors or files, and a
ServingUpscaler that batches concurrent uint8 requests for services."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .ensemble import self_ensemble as run_self_ensemble
from .errors import DeviceError, InvalidInputError, NonFiniteOutputError, QueueFullError
from .images import (
    Picture,
    from_pil,
    picture_from_array,
    picture_to_array,
    read_image,
    to_pil,
    write_image,
)
from .config import MSFINConfig
from .model import MSFIN, check_input
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
from .weights import check_values, load_pretrained

TILE_MODES = ("plain", "exact")

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


def to_model_input(u8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] with the same strides on every path (channels-last,
    the faster layout for the reference on a CPU). Convolution libraries pick their algorithm by
    layout, and a different algorithm may round a pixel the other way, so the API, the CLI and the
    service all go through here to give byte-identical images."""
    n, h, w, c = u8.shape
    x = torch.empty((n, c, h, w), dtype=dtype, device=u8.device, memory_format=torch.channels_last)
    return x.copy_(u8.permute(0, 3, 1, 2))


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """H×W uint8 alpha → (s·H)×(s·W) uint8, bicubic, computed on the CPU wherever the model runs
    (so every path gives the same bytes)."""
    a = torch.from_numpy(np.ascontiguousarray(alpha)).float()[None, None]
    a = F.interpolate(a, scale_factor=scale, mode="bicubic", align_corners=False)
    return _to_uint8(a[0, 0])


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """Float pixels in 0–255 (any shape) → uint8 numpy, clamped and rounded."""
    return _quantize(t).cpu().numpy()


def _quantize(t: torch.Tensor) -> torch.Tensor:
    """Float pixels in 0–255 → uint8 on the same device, clamped and rounded."""
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
    if getattr(model, "backend", None) in ("triton", "cuda", "emulate") and hasattr(model, "arena_bytes"):
        return model.arena_bytes
    return None


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


class Upscaler:
    """Super-resolve images with a pretrained MSFIN.

    >>> up = Upscaler("msfin-x4", device="auto")       # doctest: +SKIP
    >>> big = up.upscale(Image.open("photo.png"))        # PIL in, PIL out  # doctest: +SKIP

    ``upscale`` keeps the kind of its input: PIL → PIL, numpy uint8 (H×W, H×W×1, H×W×2, H×W×3 or
    H×W×4) → numpy uint8, float tensor [N, 3, h, w] in 0–255 → float tensor (unclamped).
    Greyscale stays greyscale; an alpha channel is upscaled bicubically beside the colour.

    ``tile``/``tile_pad``/``tile_mode``/``self_ensemble``/``auto_tile`` are the fields of
    :class:`RunOptions`. ``model`` may be a preset name, a reference ``MSFIN`` or any module with
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
        backend: str = "reference",
    ):
        self.options = RunOptions(tile, tile_pad, tile_mode, self_ensemble, auto_tile)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
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
            if tile_mode == "exact":
                raise InvalidInputError("exact tiles walk the reference MSFIN's graph; use backend='reference'")
            from .engine import optimize

            self.model = optimize(self.model, dtype=self.dtype, backend=backend)
        self.backend = getattr(self.model, "backend", "reference")
        if tile_mode == "exact" and not isinstance(self.model, MSFIN):
            raise InvalidInputError(
                f"exact tiles walk the reference MSFIN's graph; {type(self.model).__name__} is not one. "
                "Use tile_mode='plain'"
            )
        prepare(self.model, self.dtype, self.options)

    @property
    def scale(self) -> int:
        return getattr(self.model, "scale", 4)

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
        """H×W×3 uint8 RGB → (s·H)×(s·W)×3 uint8."""
        _check_uint8_image(rgb)
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(rgb))[None].to(self.device), self.dtype)
        return _to_uint8(self._forward(x)[0].permute(1, 2, 0))

    @torch.inference_mode()
    def upscale_picture(self, picture: Picture) -> Picture:
        rgb = self.upscale_rgb(picture.rgb)
        alpha = None if picture.alpha is None else upscale_alpha(picture.alpha, self.scale)
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


# ---------------------------------------------------------------------------------------------
# Serving


@dataclass
class _Request:
    rgb: np.ndarray
    options: RunOptions
    future: Future
    arrived: float

    @property
    def key(self) -> tuple:
        return self.rgb.shape, self.options


class _GraphEntry:
    """One captured CUDA graph: uint8 NHWC in → uint8 NHWC out and a finite flag per image."""

    def __init__(self, graph, static_in: torch.Tensor, static_out: torch.Tensor, static_finite: torch.Tensor):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
        self.static_finite = static_finite


@dataclass
class ServingStats:
    """Counters a service reports: images done, batches by size, failures, requests cancelled
    before they ran, CUDA-graph cache use."""

    images: int = 0
    failed: int = 0
    cancelled: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    graph_hits: int = 0
    graph_captures: int = 0


class ServingUpscaler:
    """A thread-safe, batching upscaler for services: uint8 H×W×3 RGB in, uint8 (s·H)×(s·W)×3 out.

    One worker thread owns the model. ``submit`` queues a request and returns a Future; requests of
    the same shape and options that arrive within ``batch_window`` seconds of the oldest one run as
    one batch (up to ``max_batch``). Pixels cross to the device as uint8 and are converted to float
    there, so the host never holds a float copy. More than ``max_queue`` waiting requests raise
    :class:`QueueFullError` rather than growing memory without bound.

    On CUDA the copies go through pinned host memory on a dedicated stream, and whole-image runs
    are replayed from captured CUDA graphs, one per (batch size, shape, options), kept in an LRU of
    ``graph_cache`` entries (0 turns graphs off). On the CPU there are no graphs.
    """

    def __init__(
        self,
        model: str | torch.nn.Module = "msfin-x4",
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = torch.float32,
        weights: str | Path | None = None,
        allow_download: bool = True,
        max_batch: int = 8,
        batch_window: float = 0.002,
        max_queue: int = 64,
        graph_cache: int = 8,
        tile_pad: int = DEFAULT_TILE_PAD,
        auto_tile: bool = True,
        backend: str = "reference",
    ):
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise InvalidInputError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not (isinstance(max_queue, int) and max_queue >= 1):
            raise InvalidInputError(f"max_queue must be an int >= 1, got {max_queue!r}")
        if not (isinstance(graph_cache, int) and graph_cache >= 0):
            raise InvalidInputError(f"graph_cache must be an int >= 0, got {graph_cache!r}")
        if not batch_window >= 0:
            raise InvalidInputError(f"batch_window must be >= 0 seconds, got {batch_window!r}")
        self._upscaler = Upscaler(model, device=device, dtype=dtype, weights=weights,
                                  allow_download=allow_download, backend=backend)
        self.model, self.device, self.dtype = self._upscaler.model, self._upscaler.device, self._upscaler.dtype
        self.name, self.scale = self._upscaler.name, self._upscaler.scale
        if isinstance(self.model, MSFIN):
            prepare_exact(self.model)  # requests may ask for exact tiles: nothing is walked while serving
        self.max_batch, self.batch_window, self.max_queue = max_batch, float(batch_window), max_queue
        self.default_options = RunOptions(tile_pad=tile_pad, auto_tile=auto_tile)
        self.stats = ServingStats()
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._cuda = self.device.type == "cuda"
        self._graph_cache = graph_cache if self._cuda else 0
        self._graphs: collections.OrderedDict[tuple, _GraphEntry] = collections.OrderedDict()
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._worker = threading.Thread(target=self._serve, name="msfin-serving", daemon=True)
        self._worker.start()

    # -- client side --------------------------------------------------------------------------

    def options(self, *, tile: int | None = None, tile_mode: str = "plain",
                self_ensemble: bool = False) -> RunOptions:
        """Per-request options on top of the service's tile padding and auto-tiling."""
        return RunOptions(tile, self.default_options.tile_pad, tile_mode, self_ensemble,
                          self.default_options.auto_tile)

    def submit(self, rgb: np.ndarray, options: RunOptions | None = None) -> Future:
        """Queue one H×W×3 uint8 image; the Future gives the (s·H)×(s·W)×3 uint8 result."""
        _check_uint8_image(rgb)
        options = options or self.default_options
        if options.tile_mode == "exact" and not isinstance(self.model, MSFIN):
            raise InvalidInputError("exact tiles need the reference MSFIN model")
        request = _Request(np.ascontiguousarray(rgb), options, Future(), time.monotonic())
        with self._cond:
            if self._closed:
                raise QueueFullError("the upscaler is closed; create a new one")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._pending)} requests are already waiting (max_queue={self.max_queue}); "
                    "retry later"
                )
            self._pending.append(request)
            self._cond.notify_all()
        request.future.add_done_callback(lambda f: f.cancelled() and self._forget(request))
        return request.future

    def _forget(self, request: _Request) -> None:
        """A request cancelled while it waits leaves the queue at once (counted once: here, or by the
        worker when it had already taken it)."""
        with self._cond:
            kept = collections.deque(r for r in self._pending if r is not request)
            if len(kept) < len(self._pending):
                self._pending = kept
                self.stats.cancelled += 1

    def upscale(self, rgb: np.ndarray, options: RunOptions | None = None,
                timeout: float | None = None) -> np.ndarray:
        """Blocking ``submit``."""
        return self.submit(rgb, options).result(timeout)

    def snapshot(self) -> ServingStats:
        """A consistent copy of the counters (safe to read while requests run)."""
        with self._cond:
            return dataclasses.replace(self.stats, batch_sizes=collections.Counter(self.stats.batch_sizes))

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> "ServingUpscaler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- worker side --------------------------------------------------------------------------

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._pending[0]
            deadline = head.arrived + self.batch_window
            while True:
                same = [r for r in self._pending if r.key == head.key][: self.max_batch]
                remaining = deadline - time.monotonic()
                if len(same) >= self.max_batch or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            taken = {id(r) for r in same}
            self._pending = collections.deque(r for r in self._pending if id(r) not in taken)
            return same

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if len(live) < len(batch):
                with self._cond:
                    self.stats.cancelled += len(batch) - len(live)
            if not live:
                continue
            try:
                outputs, finite = self._run_batch(np.stack([r.rgb for r in live]), live[0].options)
            except BaseException as exc:  # every caller hears about the failure; the worker lives on
                with self._cond:
                    self.stats.failed += len(live)
                for r in live:
                    r.future.set_exception(exc)
                continue
            with self._cond:
                self.stats.images += int(finite.sum())
                self.stats.failed += int((~finite).sum())
                self.stats.batch_sizes[len(live)] += 1
            for r, out, ok in zip(live, outputs, finite):
                if ok:
                    r.future.set_result(out)
                else:
                    r.future.set_exception(non_finite_error(None, out.shape, self.dtype))

    @torch.inference_mode()
    def _infer(self, x_u8: torch.Tensor, options: RunOptions,
               whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NHWC on the device → (uint8 NHWC, a bool per image: finite) on the device."""
        x = to_model_input(x_u8, self.dtype)
        if whole:
            y = run_self_ensemble(self.model, x) if options.self_ensemble else self.model(x)
        else:
            y = run_forward(self.model, x, options)
        finite = torch.isfinite(y).flatten(1).all(1)
        return _quantize(y).permute(0, 2, 3, 1).contiguous(), finite

    def _run_batch(self, images: np.ndarray, options: RunOptions) -> tuple[np.ndarray, np.ndarray]:
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
        host_in = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
        host_in.numpy()[...] = images
        n, h, w, c = images.shape
        host_out = torch.empty((n, h * self.scale, w * self.scale, c), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            entry = self._graph_for(images.shape, options)
            if entry is not None:
                entry.static_in.copy_(host_in, non_blocking=True)
                entry.graph.replay()
                host_out.copy_(entry.static_out, non_blocking=True)
                finite = entry.static_finite.clone()
            else:
                y, finite = self._infer(host_in.to(self.device, non_blocking=True), options)
                host_out.copy_(y, non_blocking=True)
            self._stream.synchronize()
        return host_out.numpy(), finite.cpu().numpy()

    def _graph_for(self, shape: tuple[int, ...], options: RunOptions) -> _GraphEntry | None:
        """The cached graph for this batch, capturing it on a miss; None when it cannot be graphed."""
        if not self._graph_cache or options.tile is not None:
            return None
        key = (shape, options)
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            with self._cond:
                self.stats.graph_hits += 1
            return entry
        config = model_config(self.model)
        batch = shape[0] * (8 if options.self_ensemble else 1)
        if options.auto_tile and config is not None and not fits(
                config, self.dtype, (batch, 3, shape[1], shape[2]), available_memory(self.device)):
            return None
        try:
            entry = self._capture(shape, options)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        self._graphs[key] = entry
        with self._cond:
            self.stats.graph_captures += 1
        while len(self._graphs) > self._graph_cache:
            self._graphs.popitem(last=False)
        return entry

    def _capture(self, shape: tuple[int, ...], options: RunOptions) -> _GraphEntry:
        static_in = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        for _ in range(2):  # warm up (kernel selection, lazy init) outside the capture
            self._infer(static_in, options, whole=True)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # The reference checks for NaN with a host sync, which a capture forbids; uint8 input is finite.
        check = getattr(self.model, "check_finite", None)
        if check is not None:
            self.model.check_finite = False
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                static_out, static_finite = self._infer(static_in, options, whole=True)
        finally:
            if check is not None:
                self.model.check_finite = check
        return _GraphEntry(graph, static_in, static_out, static_finite)
