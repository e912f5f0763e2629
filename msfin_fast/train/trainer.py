"""The training loop: :class:`Trainer` (one step, validation, checkpoints, Ctrl-C saves and stops),
:func:`open_run` and :func:`train`."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..config import get_config
from ..console import Bar, on_signals
from ..devices import DTYPES, resolve_device
from ..errors import ConfigError, TrainingError
from ..evaluate import psnr, rgb2y
from ..model import MSFIN
from ..weights import check_state_dict, fetch, read_state_dict
from .checkpoint import STATE_FORMAT, CsvLog, atomic_torch_save, read_train_state, rng_state, set_rng_state
from .config import BEST_MODEL_FILE, LOG_FILE, MODEL_FILE, STATE_FILE, TrainConfig, cosine_lr, resolve_precision
from .data import CachedPair, PatchDataset, StepBatches, prepare_pairs


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
        set_rng_state(state["rng"])

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
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step_count,
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "log_window": (float(self._window_sum), self._window_count),
            "best_psnr": self.best_psnr,
        }
        atomic_torch_save(weights, out / MODEL_FILE)
        atomic_torch_save(state, out / STATE_FILE)
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
        log = CsvLog(cfg.out / LOG_FILE, self.step_count)
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
                        atomic_torch_save(self.weights(), cfg.out / BEST_MODEL_FILE)
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
