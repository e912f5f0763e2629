"""The stages between decoding and encoding: threads joined by bounded queues (:class:`Stage`), and
the compute stage that batches same-size frames through a :class:`~msfin_fast.run.BatchRunner`."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import NonFiniteOutputError
from ..run import non_finite_error
from .decode import Frame


class End:
    pass


@dataclass
class Failed:
    error: BaseException


class Stage:
    """Runs an iterator in a thread, handing its items over through a bounded queue. Iterating the
    stage gives the items (or raises what the iterator raised); ``stop`` ends both sides."""

    def __init__(self, name: str, items: Iterator, maxsize: int, stop: threading.Event):
        self.queue: queue.Queue = queue.Queue(maxsize)
        self.stop = stop
        self.thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
        self.thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(End())
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(Failed(exc))
        finally:
            items.close()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if isinstance(item, End):
                return
            if isinstance(item, Failed):
                raise item.error
            yield item


def timed(items, timings: dict, key: str):
    """``items``, adding the seconds spent producing them to ``timings[key]``."""
    items = iter(items)
    try:
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                timings[key] += time.perf_counter() - start
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def compute(items, runner, options, batch_size: int, timings: dict):
    """The compute stage: frames in batches of up to ``batch_size`` of one size; packets keep
    their place among them."""
    waiting: list = []
    frames: list[Frame] = []

    def run():
        if frames:
            start = time.perf_counter()
            outputs, finite = runner.run(np.stack([f.rgb for f in frames]), options)
            timings["compute"] += time.perf_counter() - start
            for frame, out, ok in zip(frames, outputs, finite):
                if not ok:
                    raise NonFiniteOutputError(f"frame {frame.index}: {non_finite_error(None, out.shape, runner.dtype)}")
                frame.sr = out
        yield from waiting
        waiting.clear()
        frames.clear()

    for item in items:
        if isinstance(item, Frame):
            if frames and item.rgb.shape != frames[0].rgb.shape:
                yield from run()
            frames.append(item)
        waiting.append(item)
        if len(frames) >= batch_size:
            yield from run()
    yield from run()
