"""Training and fine-tuning MSFIN with the paper's recipe.

The recipe: LR images made from the HR ones by the same MATLAB-compatible bicubic as ``eval``
(``evaluate.hr_lr_pair``), random LR patches (48×48 by default) with the matching HR patch, random
flips and 90° rotations, batch 16, L1 loss on 0–255 pixels, Adam (β 0.9 / 0.999, ε 1e-8), and a
cosine-annealed learning rate from 1e-4 down to 6.25e-6 over the run. Any preset width and any
integer scale; mixed precision (bf16, or fp16 with loss scaling) on CUDA, fp32 on the CPU.

Why it is built this way:

- HR and LR images are decoded and resized once, then cached as ``.npy`` files keyed by the source
  file's path, size and mtime and the scale. Workers memory-map them and copy out patches, so no
  PNG is decoded and no bicubic is computed while the GPU waits.
- The patch stream is a pure function of ``(seed, step, i)``: sample ``i`` of step ``step`` comes
  from its own generator. The data loader therefore needs no state beyond the step number, any
  number of workers yields the same batches, and resuming at step ``n`` continues the exact stream.
- ``model.pt`` is a plain state_dict in the released key format (``load_pretrained(...,
  weights=path)`` and ``MSFIN.load_state_dict(strict=True)`` take it unchanged). ``train_state.pt``
  beside it holds everything else resuming needs, including its own copy of the weights, so the
  pair can never disagree about the step even if a run dies between the two writes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import math
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import PRESETS, get_config
from .console import Bar, on_signals
from .errors import ConfigError, DatasetError, DeviceError, ImageReadError, TrainingError
from .evaluate import hr_lr_pair, psnr, rgb2y
from .fileio import atomic_write
from .images import READ_SUFFIXES, list_image_files, read_image
from .model import MSFIN
from .devices import DTYPES, resolve_device
from .weights import check_state_dict, fetch, read_state_dict

MODEL_FILE = "model.pt"
BEST_MODEL_FILE = "model_best.pt"
STATE_FILE = "train_state.pt"
LOG_FILE = "log.csv"
LOG_COLUMNS = ("step", "loss", "lr", "val_psnr")

# Bump when the cached arrays would differ for the same source (e.g. a change to the resize).
_CACHE_VERSION = 1
_STATE_FORMAT = 1

_PRECISIONS = ("fp32", "bf16", "fp16")  # the names training accepts (devices.DTYPES says what they mean)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """One training run. Only ``data``, ``out`` and ``steps`` have no default.

    data:            folder of HR training images (png, jpg, bmp, webp, tif; not recursive).
    out:             folder for ``model.pt``, ``model_best.pt``, ``train_state.pt`` and ``log.csv``.
    steps:           optimiser steps in the whole run; the cosine schedule spans exactly this many.
    model:           preset whose architecture is trained (``msfin-x4`` or ``msfin-s-x4``).
    scale:           integer upscaling factor (the presets' width and depth, at this scale).
    patch:           LR patch side; the HR patch is ``patch · scale``.
    batch_size:      patches per step.
    lr, lr_min:      cosine annealing from ``lr`` at step 0 to ``lr_min`` at ``steps``.
    betas, eps:      Adam's.
    seed:            seeds the initial weights and the patch stream.
    from_pretrained: start from the preset's released ×4 weights (every key fits any scale).
    init_weights:    start from this checkpoint file instead (same architecture).
    val_data:        folder of HR images scored (Y PSNR, ``scale``-pixel shave) every ``val_every``.
    save_every:      steps between checkpoints (one is always written at the end).
    log_every:       steps per ``log.csv`` row (the mean loss of those steps); validations and
                     checkpoints also end a row.
    device:          ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    precision:       ``auto`` (bf16 on CUDA if supported, else fp16; fp32 on the CPU), ``fp32``,
                     ``bf16`` or ``fp16`` (with loss scaling). Mixed precision needs CUDA.
    num_workers:     data-loader processes (0 loads in the training process).
    cache_dir:       where the HR/LR ``.npy`` cache goes (default ``out/lr_cache``); share it
                     between runs on the same data.
    """

    data: Path
    out: Path
    steps: int
    model: str = "msfin-x4"
    scale: int = 4
    patch: int = 48
    batch_size: int = 16
    lr: float = 1e-4
    lr_min: float = 6.25e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    from_pretrained: bool = False
    init_weights: Path | None = None
    val_data: Path | None = None
    val_every: int = 1000
    save_every: int = 1000
    log_every: int = 100
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 4
    cache_dir: Path | None = None

    # Fields a resumed run may change: where things are and how the machine runs them, not what is
    # computed. Everything else is fixed by the run being resumed.
    RESUMABLE = ("data", "val_data", "cache_dir", "val_every", "save_every", "log_every",
                 "device", "precision", "num_workers")

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        for name in ("init_weights", "val_data", "cache_dir"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        self.betas = tuple(float(b) for b in self.betas)
        if self.model not in PRESETS:
            raise ConfigError(f"unknown model preset {self.model!r}; choose one of: {', '.join(PRESETS)}")
        for name in ("steps", "scale", "patch", "batch_size", "val_every", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (self.lr > 0 and 0 <= self.lr_min <= self.lr):
            raise ConfigError(f"need lr > 0 and 0 <= lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas) or not self.eps > 0:
            raise ConfigError(f"Adam needs two betas in [0, 1) and eps > 0, got {self.betas}, {self.eps}")
        if self.from_pretrained and self.init_weights is not None:
            raise ConfigError("from_pretrained and init_weights both pick the starting weights; give one")
        if self.precision not in ("auto", *_PRECISIONS):
            raise ConfigError(f"unknown precision {self.precision!r}; use auto, fp32, bf16 or fp16")

    @property
    def hr_patch(self) -> int:
        return self.patch * self.scale

    @property
    def lr_cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out / "lr_cache"

    def to_dict(self) -> dict:
        """Plain values only, so the resume file loads with ``weights_only=True``."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def cosine_lr(step: int, steps: int, lr: float, lr_min: float) -> float:
    """The learning rate at ``step`` of ``steps``: ``lr`` at 0, ``lr_min`` at ``steps``."""
    t = min(max(step, 0), steps) / steps
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))


def resolve_precision(spec: str, device: torch.device) -> str:
    """'auto' → bf16 (or fp16 without bf16 support) on CUDA, fp32 on the CPU."""
    if spec == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if spec != "fp32" and device.type != "cuda":
        raise DeviceError(f"mixed precision ({spec}) needs a CUDA GPU; train with precision fp32 on the CPU")
    return spec


# ---------------------------------------------------------------------------------------------
# Data: HR/LR cache, patches, batches


@dataclass(frozen=True)
class CachedPair:
    """One source image, modcropped to a multiple of the scale, and its bicubic LR, on disk."""

    source: Path
    hr: Path
    lr: Path
    hr_size: tuple[int, int]  # (height, width) after modcrop


def _cache_stem(path: Path, scale: int) -> str:
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|x{scale}|v{_CACHE_VERSION}"
    return f"{path.stem[:60]}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def _cache_one(path: Path, scale: int, cache_dir: Path, min_hr: int) -> CachedPair | str:
    """The cached pair for ``path``, or a one-line reason why it cannot be used."""
    try:
        stem = _cache_stem(path, scale)
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"
    hr_path, lr_path = cache_dir / f"{stem}.hr.npy", cache_dir / f"{stem}.lr.npy"
    if hr_path.is_file() and lr_path.is_file():
        try:
            size = np.load(hr_path, mmap_mode="r").shape[:2]
        except (OSError, ValueError):
            size = None  # a damaged cache entry is rebuilt below
    else:
        size = None
    if size is None:
        try:
            rgb = read_image(path).as_8bit().rgb  # training crops are 8-bit; 16-bit sources are rounded
        except ImageReadError as exc:
            return str(exc)
        h, w = rgb.shape[:2]
        if min(h - h % scale, w - w % scale) < min_hr:
            return _too_small(path, (h, w), min_hr, scale)
        hr, lr = hr_lr_pair(rgb, scale)
        try:
            _save_npy(hr_path, hr)
            _save_npy(lr_path, lr)
        except OSError as exc:
            raise DatasetError(f"cannot write the LR cache in {cache_dir} ({exc.strerror or exc}); "
                               "choose another cache folder") from None
        size = hr.shape[:2]
    if min(size) < min_hr:
        return _too_small(path, size, min_hr, scale)
    return CachedPair(path, hr_path, lr_path, (int(size[0]), int(size[1])))


def _too_small(path: Path, size: tuple[int, int], min_hr: int, scale: int) -> str:
    h, w = size
    cropped = f" ({w - w % scale}×{h - h % scale} after cropping to a multiple of {scale})" if h % scale or w % scale else ""
    return f"{path}: {w}×{h} pixels{cropped} is smaller than the {min_hr}×{min_hr} HR it needs at ×{scale}"


def prepare_pairs(
    folder: str | Path,
    scale: int,
    cache_dir: str | Path,
    *,
    min_hr: int,
    workers: int = 1,
    on_file: Callable[[Path], None] | None = None,
) -> list[CachedPair]:
    """Check every image of ``folder`` and cache its HR/LR pair; DatasetError lists the bad ones.

    Every image is vetted before training starts, so a bad file fails the run in seconds instead
    of hours in: unreadable files, non-images with an image suffix, and images whose side (after
    cropping to a multiple of ``scale``) is below ``min_hr`` are all reported, by path.
    """
    folder, cache_dir = Path(folder), Path(cache_dir)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder of HR images")
    files = list_image_files(folder)
    if not files:
        raise DatasetError(f"{folder}: no images ({', '.join(READ_SUFFIXES)}) in this folder")

    def one(path: Path) -> CachedPair | str:
        result = _cache_one(path, scale, cache_dir, min_hr)
        if on_file is not None:
            on_file(path)
        return result

    # Decoding and the float64 resize release the GIL for most of their time, so threads help.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, files))
    problems = [r for r in results if isinstance(r, str)]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise DatasetError(
            f"{len(problems)} of {len(files)} images in {folder} cannot be used: {shown}. "
            "Remove or replace them (or lower the patch size)"
        )
    return [r for r in results if isinstance(r, CachedPair)]


def random_patch(
    lr: np.ndarray, hr: np.ndarray, scale: int, patch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """An aligned random LR patch and its HR patch, under one of the 8 flips/90° rotations."""
    h, w = lr.shape[:2]
    y, x = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
    lr_p = lr[y:y + patch, x:x + patch]
    hr_p = hr[y * scale:(y + patch) * scale, x * scale:(x + patch) * scale]
    t = int(rng.integers(8))
    if t & 1:
        lr_p, hr_p = lr_p[:, ::-1], hr_p[:, ::-1]
    if t & 2:
        lr_p, hr_p = lr_p[::-1], hr_p[::-1]
    if t & 4:  # with the flips, a transpose gives the 90° rotations
        lr_p, hr_p = lr_p.transpose(1, 0, 2), hr_p.transpose(1, 0, 2)
    return np.ascontiguousarray(lr_p), np.ascontiguousarray(hr_p)


class PatchDataset(Dataset):
    """Index ``(step, i)`` → uint8 CHW tensors (LR patch, HR patch), a pure function of the seed.

    Sample ``i`` of step ``step`` picks its image, position and orientation from a generator seeded
    with ``(seed, step, i)``, so the stream does not depend on the worker that makes it.
    """

    def __init__(self, pairs: Sequence[CachedPair], scale: int, patch: int, seed: int):
        self.pairs, self.scale, self.patch, self.seed = list(pairs), scale, patch, seed
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # memory maps are reopened in each worker

    def __len__(self) -> int:
        return len(self.pairs)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self._arrays:
            pair = self.pairs[index]
            self._arrays[index] = (np.load(pair.lr, mmap_mode="r"), np.load(pair.hr, mmap_mode="r"))
        return self._arrays[index]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        step, i = key
        rng = np.random.default_rng([self.seed, step, i])
        lr, hr = self.arrays(int(rng.integers(len(self.pairs))))
        lr_p, hr_p = random_patch(lr, hr, self.scale, self.patch, rng)
        return torch.from_numpy(lr_p).permute(2, 0, 1), torch.from_numpy(hr_p).permute(2, 0, 1)


class StepBatches(Sampler):
    """The batches of steps ``start … stop-1``: ``[(step, 0), …, (step, batch_size-1)]`` each."""

    def __init__(self, start: int, stop: int, batch_size: int):
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield [(step, i) for i in range(self.batch_size)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_train_state(out: str | Path) -> dict:
    """The resume state of the run in folder ``out`` (weights-only loading)."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"{path}: no training state to resume from; start a run without resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on garbage; all mean "not loadable"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(f"{path}: cannot be loaded (corrupt or truncated?): {first[:160]}") from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise TrainingError(f"{path}: not a training state written by this version of msfin_fast")
    return state


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainSummary:
    """Where ``run()`` stopped, and the last logged numbers."""

    step: int
    steps: int
    seconds: float
    loss: float | None  # mean L1 (0–255 pixels) of the last logged steps
    val_psnr: float | None
    best_psnr: float | None
    model_path: Path
    interrupted: bool = False


class _Progress(Bar):
    """Training steps: a bar with steps/s, learning rate, loss, validation PSNR and the ETA on a
    terminal (redrawn at most 10 times a second); a plain line per logged step otherwise."""

    def __init__(self, total: int, start: int, enabled: bool, stream=None):
        super().__init__(total, enabled=enabled, stream=stream, start=start)
        self.last_val: float | None = None

    def update(self, step: int, loss: float | None, lr: float, val: float | None, logged: bool) -> None:
        if not self.enabled:
            return
        if self.tty and val is None:
            val = self.last_val
        self.last_val = val
        text = f"{step}/{self.total} {self.rate(step):.2f} steps/s  lr {lr:.3g}"
        if loss is not None:
            text += f"  loss {loss:.4f}"
        if val is not None:
            text += f"  val {val:.3f} dB"
        if self.tty:
            if logged or step == self.total or self.due(0.1):
                self.draw(f"{self.bar(step)} {text}  eta {self.eta(step):.0f} s ", final=step == self.total)
        elif logged:
            self.draw(f"[{text}]", keep=True)


class Trainer:
    """One training run: ``step()`` trains one batch, ``save()`` checkpoints, ``run()`` does it all.

    >>> cfg = TrainConfig(data="DIV2K_train_HR", out="runs/x2", steps=300_000, scale=2)  # doctest: +SKIP
    >>> Trainer(cfg).run()                                                                 # doctest: +SKIP
    >>> Trainer.resume("runs/x2").run()        # after an interruption, continues exactly # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, *, progress: bool = False, _state: dict | None = None):
        if _state is None and (config.out / STATE_FILE).exists():
            raise TrainingError(
                f"{config.out} already holds a training run; resume it or choose another output folder"
            )
        try:
            config.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"{config.out}: cannot create the output folder ({exc.strerror or exc})") from None
        self.config = config
        self.progress = progress
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.model_config = get_config(config.model).replace(scale=config.scale)
        # The data first: a bad image should fail the run before anything slow happens.
        self.train_pairs = self._prepare(config.data, config.hr_patch, "training")
        self.val_pairs = (
            self._prepare(config.val_data, 2 * config.scale + 1, "validation")
            if config.val_data is not None else []
        )
        self.dataset = PatchDataset(self.train_pairs, config.scale, config.patch, config.seed)

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.model = MSFIN(self.model_config)
        if _state is None:
            self._load_initial_weights()
        self.model.to(self.device).train()

        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, betas=config.betas, eps=config.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: cosine_lr(step, config.steps, config.lr, config.lr_min) / config.lr,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.step_count = 0
        self.best_psnr: float | None = None
        self._window_sum = torch.zeros((), device=self.device)
        self._window_count = 0
        self._batches: Iterator | None = None
        self._stop = threading.Event()
        self.stop_signal: int | None = None  # the signal that asked the last run to stop

        if _state is not None:
            self._load_state(_state)
        # Fixed patch size: let cuDNN pick its fastest convs, for as long as this trainer is open
        # (the process may go on to run inference on images of every size). Set last, so that a
        # constructor that fails leaves the setting alone; close() puts it back.
        self._cudnn_benchmark_before: bool | None = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def resume(cls, out: str | Path, *, progress: bool = False, **changes) -> "Trainer":
        """Continue the run saved in ``out`` exactly where its last checkpoint stopped.

        ``changes`` may move the data or cache, or change the device, precision, workers and
        intervals (``TrainConfig.RESUMABLE``); anything else must match the saved run.
        """
        state = read_train_state(out)
        values = dict(state["config"])
        for name, value in changes.items():
            if value is None:
                continue
            if name not in values:
                raise ConfigError(f"unknown training option {name!r}")
            saved = values[name]
            if name not in TrainConfig.RESUMABLE:
                normal = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
                if normal != saved:
                    raise TrainingError(
                        f"{name} was {saved!r} in the run in {out} and cannot change when resuming "
                        f"(got {value!r}); start a new run in another folder to change it"
                    )
            values[name] = value
        values["out"] = str(out)
        config = TrainConfig.from_dict(values)
        if state["step"] >= config.steps:
            raise TrainingError(f"the run in {out} already finished ({state['step']}/{config.steps} steps); "
                                f"its weights are {Path(out) / MODEL_FILE}")
        return cls(config, progress=progress, _state=state)

    def _load_initial_weights(self) -> None:
        config = self.config
        if config.from_pretrained:
            path = fetch(config.model)
        elif config.init_weights is not None:
            path = config.init_weights
        else:
            return
        state = read_state_dict(path)
        check_state_dict(self.model, state, config.model, str(path))
        self.model.load_state_dict(state, strict=True)

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # empty when saved without fp16
            self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
        self.best_psnr = state["best_psnr"]
        window_sum, self._window_count = state["log_window"]
        self._window_sum = torch.tensor(window_sum, device=self.device)
        _set_rng_state(state["rng"])

    def _prepare(self, folder: Path, min_hr: int, what: str) -> list[CachedPair]:
        stream = sys.stderr
        show = self.progress and hasattr(stream, "isatty") and stream.isatty()
        done = [0]
        lock = threading.Lock()

        def tick(_: Path) -> None:
            with lock:
                done[0] += 1
                if show:
                    stream.write(f"\rpreparing {what} images: {done[0]} checked")
                    stream.flush()

        start = time.perf_counter()
        pairs = prepare_pairs(folder, self.config.scale, self.config.lr_cache, min_hr=min_hr,
                              workers=max(1, self.config.num_workers), on_file=tick)
        if self.progress:
            prefix = "\r" if show else ""
            line = (f"{what}: {len(pairs)} images from {folder} ready in "
                    f"{time.perf_counter() - start:.1f} s (cache {self.config.lr_cache})")
            stream.write(f"{prefix}{line:<40}\n")
            stream.flush()
        return pairs

    # -- training ----------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            workers = self.config.num_workers
            loader = DataLoader(
                self.dataset,
                batch_sampler=StepBatches(self.step_count, self.config.steps, self.config.batch_size),
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=4 if workers else None,
            )
            self._batches = iter(loader)
        return next(self._batches)

    def step(self) -> torch.Tensor:
        """Train on one batch; returns its L1 loss (0–255 pixels) as a 0-d tensor on the device.

        The loss is not copied to the host here, so the GPU is never made to wait for the CPU.
        """
        if self.step_count >= self.config.steps:
            raise TrainingError(f"training already finished ({self.step_count}/{self.config.steps} steps)")
        lr_u8, hr_u8 = self._next_batch()
        lr = lr_u8.to(self.device, non_blocking=True).float()
        hr = hr_u8.to(self.device, non_blocking=True).float()
        amp = self.precision != "fp32"
        with torch.autocast(self.device.type, dtype=DTYPES[self.precision], enabled=amp):
            sr = self.model(lr, check_finite=False)  # uint8 images: no per-step host sync
        loss = F.l1_loss(sr.float(), hr)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step_count += 1
        loss = loss.detach()
        self._window_sum += loss
        self._window_count += 1
        return loss

    def _flush_window(self) -> float | None:
        if self._window_count == 0:
            return None
        mean = float(self._window_sum) / self._window_count
        self._window_sum.zero_()
        self._window_count = 0
        if not math.isfinite(mean):
            hint = " or precision fp32" if self.precision != "fp32" else ""
            raise TrainingError(
                f"the loss became {mean} by step {self.step_count}: training diverged; start a new run "
                f"from the last saved model.pt (init_weights) with a lower lr{hint}"
            )
        return mean

    @torch.no_grad()
    def validate(self) -> float:
        """Mean Y PSNR (dB, ``scale``-pixel shave, fp32, output rounded to uint8) on ``val_data``."""
        if not self.val_pairs:
            raise TrainingError("no validation folder was given (val_data)")
        self.model.eval()
        scores = []
        try:
            for pair in self.val_pairs:
                lr = torch.from_numpy(np.load(pair.lr)).permute(2, 0, 1)[None].to(self.device).float()
                sr = self.model(lr, check_finite=False)[0].clamp_(0, 255).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                scores.append(psnr(rgb2y(sr), rgb2y(np.load(pair.hr)), shave=self.config.scale))
        finally:
            self.model.train()
        return float(np.mean(scores))

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state_dict on the CPU, in the released key format."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save(self) -> Path:
        """Write ``model.pt`` and ``train_state.pt`` atomically; returns the model's path."""
        out = self.config.out
        weights = self.weights()
        state = {
            "format": _STATE_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step_count,
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "log_window": (float(self._window_sum), self._window_count),
            "best_psnr": self.best_psnr,
        }
        _atomic_torch_save(weights, out / MODEL_FILE)
        _atomic_torch_save(state, out / STATE_FILE)
        return out / MODEL_FILE

    def request_stop(self) -> None:
        """Ask ``run()`` to checkpoint and return after the step in progress (also on Ctrl-C)."""
        self._stop.set()

    def close(self) -> None:
        """Shut the data-loader workers down and give cuDNN back the benchmark setting it had."""
        self._batches = None
        if self._cudnn_benchmark_before is not None:
            torch.backends.cudnn.benchmark = self._cudnn_benchmark_before
            self._cudnn_benchmark_before = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> TrainSummary:
        """Train to ``config.steps``, validating, logging and checkpointing on the way.

        The first Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and returns
        (``interrupted`` is set, ``stop_signal`` says which); a second one stops at once.
        """
        cfg = self.config
        log = _CsvLog(cfg.out / LOG_FILE, self.step_count)
        bar = _Progress(cfg.steps, self.step_count, self.progress)
        start = time.perf_counter()
        loss = val = None
        with self._sigint_requests_stop():
            while self.step_count < cfg.steps and not self._stop.is_set():
                lr = self.lr
                self.step()
                n = self.step_count
                last = n == cfg.steps
                validate = bool(self.val_pairs) and (n % cfg.val_every == 0 or last)
                save = n % cfg.save_every == 0 or last
                # A checkpoint always follows a log row, whose loss check keeps NaN weights off disk.
                logged = n % cfg.log_every == 0 or validate or save
                if logged:
                    loss = self._flush_window()
                if validate:
                    val = self.validate()
                    if self.best_psnr is None or val > self.best_psnr:
                        self.best_psnr = val
                        _atomic_torch_save(self.weights(), cfg.out / BEST_MODEL_FILE)
                if logged:
                    log.append(n, loss, lr, val if validate else None)
                if save:
                    self.save()
                bar.update(n, loss, lr, val if validate else None, logged)
            interrupted = self.step_count < cfg.steps
            if interrupted:
                if self._window_count and not math.isfinite(float(self._window_sum)):
                    self._flush_window()  # raises: NaN weights are not saved
                self.save()
                bar.close()
        self.close()
        return TrainSummary(self.step_count, cfg.steps, time.perf_counter() - start, loss, val,
                            self.best_psnr, cfg.out / MODEL_FILE, interrupted)

    @contextlib.contextmanager
    def _sigint_requests_stop(self):
        def handler(signum, frame):
            if self._stop.is_set():
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.request_stop()

        try:
            with on_signals(handler, (signal.SIGINT, signal.SIGTERM)):
                yield
        finally:
            self._stop.clear()


class _CsvLog:
    """``log.csv`` (step, loss, lr, val_psnr); rows past the resumed step are dropped first."""

    def __init__(self, path: Path, step: int):
        self.path = path
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
            if rows and tuple(rows[0]) == LOG_COLUMNS and len(kept) == len(rows) - 1:
                return
            self._write([list(LOG_COLUMNS), *kept])
        else:
            self._write([list(LOG_COLUMNS)])

    def _write(self, rows: list[list]) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        with atomic_write(self.path) as f:
            f.write(text.getvalue().encode())

    def append(self, step: int, loss: float | None, lr: float, val_psnr: float | None) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(
                [step, "" if loss is None else f"{loss:.6f}", f"{lr:.6e}",
                 "" if val_psnr is None else f"{val_psnr:.4f}"]
            )


def open_run(out: str | Path, *, resume: bool = False, progress: bool = False, **options) -> Trainer:
    """A Trainer for a new run in ``out`` or, with ``resume``, for the run saved there.

    ``options`` are TrainConfig fields; None means "not given". A new run needs ``data`` and
    ``steps`` and refuses a folder that already holds a run (so nothing is overwritten by accident).
    """
    options = {k: v for k, v in options.items() if v is not None}
    if resume:
        return Trainer.resume(out, progress=progress, **options)
    missing = [name for name in ("data", "steps") if name not in options]
    if missing:
        raise ConfigError(f"a new training run needs {' and '.join(missing)}")
    return Trainer(TrainConfig(out=Path(out), **options), progress=progress)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = False) -> TrainSummary:
    """Run (or with ``resume``, continue) the training described by ``config``; see ``Trainer``.

    When resuming, the fields in ``TrainConfig.RESUMABLE`` are taken from ``config`` and every
    other one must match the saved run.
    """
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "out"}
    with open_run(config.out, resume=resume, progress=progress, **options) as trainer:
        return trainer.run()


__all__ = [
    "TrainConfig", "Trainer", "TrainSummary", "train", "open_run", "cosine_lr", "prepare_pairs", "random_patch",
    "PatchDataset", "StepBatches", "CachedPair", "read_train_state",
]
