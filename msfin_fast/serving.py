"""Serving: a thread-safe, batching upscaler for services (uint8 in, uint8 out)."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InvalidInputError, QueueFullError
from .model import MSFIN
from .pictures import check_rgb
from .run import BatchRunner, RunOptions, check_exact_tiles, non_finite_error
from .tiling import prepare_exact
from .upscaler import Upscaler

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
        return self.rgb.shape, self.rgb.dtype, self.options


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

    Batches run through a :class:`BatchRunner`: on CUDA, pinned copies on a dedicated stream and
    CUDA graphs replayed per (batch size, shape, options), ``graph_cache`` of them kept (0 turns
    graphs off); on the CPU, no graphs.
    """

    def __init__(self, upscaler: Upscaler | str | torch.nn.Module = "msfin-x4", *, max_batch: int = 8,
                 batch_window: float = 0.002, max_queue: int = 64, graph_cache: int = 8, **upscaler_options):
        """``upscaler``: the :class:`Upscaler` to serve (its model, device, dtype, backend and options;
        its options are a request's defaults), or its model (a preset name or a module) with the
        Upscaler's keyword arguments in ``upscaler_options`` (``device``, ``dtype``, ``weights``,
        ``backend``, ``tile_pad``, …)."""
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise InvalidInputError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not (isinstance(max_queue, int) and max_queue >= 1):
            raise InvalidInputError(f"max_queue must be an int >= 1, got {max_queue!r}")
        if not (isinstance(graph_cache, int) and graph_cache >= 0):
            raise InvalidInputError(f"graph_cache must be an int >= 0, got {graph_cache!r}")
        if not batch_window >= 0:
            raise InvalidInputError(f"batch_window must be >= 0 seconds, got {batch_window!r}")
        if isinstance(upscaler, Upscaler):
            if upscaler_options:
                raise InvalidInputError(f"{', '.join(sorted(upscaler_options))}: give these to the Upscaler, "
                                        "which is built already")
        else:
            upscaler = Upscaler(upscaler, **upscaler_options)
        if upscaler.outscale is not None:  # its answers are the network's ×s RGB: refuse, never ignore
            raise InvalidInputError(f"outscale={upscaler.outscale:g}: a ServingUpscaler answers at the network's "
                                    f"×{upscaler.scale}; resize its results, or build the Upscaler without outscale")
        self.upscaler = upscaler
        self.model, self.device, self.dtype = upscaler.model, upscaler.device, upscaler.dtype
        self.name, self.scale, self.backend = upscaler.name, upscaler.scale, upscaler.backend
        if isinstance(self.model, MSFIN):
            prepare_exact(self.model)  # requests may ask for exact tiles: nothing is walked while serving
        self.max_batch, self.batch_window, self.max_queue = max_batch, float(batch_window), max_queue
        self.default_options = upscaler.options
        self.stats = ServingStats()
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._runner = BatchRunner(upscaler, graph_cache, on_graph=self._count_graph)
        self._worker = threading.Thread(target=self._serve, name="msfin-serving", daemon=True)
        self._worker.start()

    # -- client side --------------------------------------------------------------------------

    def options(self, *, tile: int | None = None, tile_mode: str = "plain",
                self_ensemble: bool = False) -> RunOptions:
        """Per-request options on top of the service's tile padding and auto-tiling."""
        return RunOptions(tile, self.default_options.tile_pad, tile_mode, self_ensemble,
                          self.default_options.auto_tile)

    def submit(self, rgb: np.ndarray, options: RunOptions | None = None) -> Future:
        """Queue one H×W×3 uint8 (or uint16) image; the Future gives the (s·H)×(s·W)×3 result of the
        same dtype."""
        return self.submit_many([rgb], options)[0]

    def submit_many(self, images: list[np.ndarray], options: RunOptions | None = None) -> list[Future]:
        """Queue several H×W×3 uint8 (or uint16) images at once: the worker sees them all together, so
        those of one shape and dtype run as batches of up to ``max_batch`` (``submit`` one at a time may be taken
        before the next arrives when ``batch_window`` is 0). All or none are queued."""
        for rgb in images:
            check_rgb(rgb)
        options = options or self.default_options
        check_exact_tiles(options.tile_mode, self.backend, self.model)
        now = time.monotonic()
        requests = [_Request(np.ascontiguousarray(rgb), options, Future(), now) for rgb in images]
        with self._cond:
            if self._closed:
                raise QueueFullError("the upscaler is closed; create a new one")
            if len(self._pending) + len(requests) > self.max_queue:
                if len(requests) == 1:
                    raise QueueFullError(f"{len(self._pending)} requests are already waiting "
                                         f"(max_queue={self.max_queue}); retry later")
                raise QueueFullError(
                    f"{len(self._pending)} requests are waiting and {len(requests)} more would pass "
                    f"max_queue={self.max_queue}; retry later"
                )
            self._pending.extend(requests)
            self._cond.notify_all()
        for request in requests:
            request.future.add_done_callback(lambda f, r=request: f.cancelled() and self._forget(r))
        return [r.future for r in requests]

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
    def alive(self) -> bool:
        """Open, and its worker thread running."""
        return not self._closed and self._worker.is_alive()

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
                outputs, finite = self._runner.run(np.stack([r.rgb for r in live]), live[0].options)
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

    def _count_graph(self, hit: bool) -> None:
        with self._cond:
            if hit:
                self.stats.graph_hits += 1
            else:
                self.stats.graph_captures += 1


