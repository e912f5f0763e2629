"""``backend="auto"``: measure the candidate backends per shape class, keep the fastest.

The candidates are ``backends.candidates(device)``. Which one wins on a GPU (two Triton launches
per RRCAB pass, one fused launch, the CUDA C++ kernel) depends on the card and on the image size, so nothing is hard-coded: the first input of a shape
class on a device times every variant (a few CUDA-event-timed runs each) and the winner is used
from then on. Choices persist across processes in a small JSON file (``$MSFIN_CACHE_DIR`` or
``~/.cache/msfin_fast/backend_choices.json``), keyed by device name, software versions, dtype, the
network's shape and the shape class, so each combination is measured once per machine.
``AutoEngine.choices`` and ``msfin-fast info`` show what was picked and the times behind it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..fileio import atomic_write
from ..model import MSFIN, check_input


def shape_class(n: int, H: int, W: int) -> str:
    """Buckets of output size and batch: the variants' relative speed changes between them."""
    pixels = H * W
    size = "small" if pixels <= 256 * 256 else "720p" if pixels <= 1280 * 720 else "large"
    return f"{size}, batch {'1' if n == 1 else '>1'}"


def cache_path() -> Path:
    base = os.environ.get("MSFIN_CACHE_DIR") or Path.home() / ".cache" / "msfin_fast"
    return Path(base) / "backend_choices.json"


def load_choices(path: Path | None = None) -> dict:
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def choices_status():
    """``msfin-fast info``'s line on what ``auto`` has measured on this machine (and where it keeps it)."""
    from .backends import BackendStatus

    choices = load_choices()
    if not choices:
        return BackendStatus("auto choices", False, f"none measured yet ({cache_path()}); backend='auto' "
                             "measures on first use per GPU and shape class")
    said = "; ".join(f"{k.split(' | ')[-2]} on {k.split(' | ')[0]} → {v.get('backend')}" for k, v in choices.items())
    return BackendStatus("auto choices", True, f"{len(choices)} measured in {cache_path()}: {said}")


def save_choice(key: str, entry: dict, path: Path | None = None) -> None:
    path = path or cache_path()
    data = load_choices(path)
    data[key] = entry
    try:
        with atomic_write(path) as f:
            f.write(json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


def cuda_timer(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
    """Median milliseconds of ``fn`` by CUDA events, after warm-up (which also compiles kernels)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_timer(fn: Callable[[], object], warmup: int = 1, iters: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class AutoEngine(nn.Module):
    """Several engines over one model; each call runs the one measured fastest for its shape class."""

    def __init__(self, model: MSFIN, engines: dict[str, nn.Module], dtype: torch.dtype,
                 timer: Callable | None = None, persist: bool = True):
        super().__init__()
        self.__dict__["source"] = model
        self.engines = nn.ModuleDict(engines)
        self.dtype = dtype
        self.timer = timer or (cuda_timer if model.head.weight.is_cuda else wall_timer)
        self.persist = persist
        self.choices: dict[str, dict] = {}  # shape class → {"backend": name, "ms": {name: median}}

    @property
    def backend(self) -> str:
        return "auto"

    @property
    def scale(self) -> int:
        return self.source.config.scale

    def _key(self, cls: str) -> str:
        device = self.source.head.weight.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        cfg = self.source.config
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        return (f"{name} | torch {torch.__version__} | triton {triton_version} | {self.dtype} | "
                f"n{cfg.n_feats} g{cfg.groups} k{cfg.num_steps} | {cls} | {','.join(sorted(self.engines))}")

    def choose(self, x: torch.Tensor) -> str:
        """The variant for ``x``'s shape class, measuring on ``x`` the first time."""
        n, _, h, w = x.shape
        cls = shape_class(n, self.scale * h, self.scale * w)
        if cls in self.choices:
            return self.choices[cls]["backend"]
        key = self._key(cls)
        entry = load_choices().get(key) if self.persist else None
        if not entry or entry.get("backend") not in self.engines:
            with torch.no_grad():
                ms = {name: self.timer(lambda e=engine: e(x, check_finite=False))
                      for name, engine in self.engines.items()}
            entry = {"backend": min(ms, key=ms.get), "ms": ms, "measured_on": list(x.shape)}
            if self.persist:
                save_choice(key, entry)
        self.choices[cls] = entry
        return entry["backend"]

    def forward(self, x: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """As :meth:`Engine.forward`; the input is checked once here, not again by the chosen engine."""
        check_input(x, check_finite=check_finite and not torch.compiler.is_compiling())
        return self.engines[self.choose(x)](x, check_finite=False)

    def extra_repr(self) -> str:
        return f"choices={ {cls: e['backend'] for cls, e in self.choices.items()} }"
