"""The training data: HR/LR pairs decoded and resized once into a ``.npy`` cache, and a patch
stream that is a pure function of ``(seed, step, i)`` (any number of workers, exact resumes)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import DatasetError, ImageReadError
from ..evaluate import hr_lr_pair
from ..fileio import atomic_write
from ..images import READ_SUFFIXES, list_image_files, read_image


# Bump when the cached arrays would differ for the same source (e.g. a change to the resize).
_CACHE_VERSION = 1


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
