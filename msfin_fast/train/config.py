"""What a training run is: :class:`TrainConfig` (checked as it is made), the file names of a run
folder, the precision it trains in and the cosine learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS
from ..errors import ConfigError, DeviceError


MODEL_FILE = "model.pt"


BEST_MODEL_FILE = "model_best.pt"


STATE_FILE = "train_state.pt"


LOG_FILE = "log.csv"


LOG_COLUMNS = ("step", "loss", "lr", "val_psnr")


_PRECISIONS = ("fp32", "bf16", "fp16")  # the names training accepts (devices.DTYPES says what they mean)


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
