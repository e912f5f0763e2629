"""CUDA graphs: a function captured once per key and replayed, kept in an LRU of keys.

The engine captures its launches per input shape (``cuda_graphs=True``); the serving upscaler
captures a whole request (uint8 in, uint8 and a finite flag per image out) per batch shape and
options. Both use :class:`CapturedGraph`, kept in a :class:`ShapeCache` (an LRU the engine also
keeps its arenas in).

A graph replays into the addresses it was captured on. Memory the captured function allocates
during the capture belongs to the graph's private pool and lives as long as the graph; memory it
only *uses* (an engine's arena and packed weights, made before the capture and cached by the
engine) would be freed when the engine drops it, and a replay would then write into memory that
is someone else's, or unmapped. So code whose tensors a capture bakes in calls :func:`hold` with
them, and the graph being captured keeps them alive with it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Callable

import torch

_capturing = threading.local()  # .held: the list the graph being captured on this thread fills


def hold(*objects: object) -> None:
    """Keep ``objects`` alive with the graph being captured on this thread, if one is (else nothing)."""
    held = getattr(_capturing, "held", None)
    if held is not None:
        held.extend(o for o in objects if not any(o is h for h in held))


@contextlib.contextmanager
def holding(held: list):
    """While the block runs, :func:`hold` on this thread appends to ``held``."""
    previous = getattr(_capturing, "held", None)
    _capturing.held = held
    try:
        yield held
    finally:
        _capturing.held = previous


class CapturedGraph:
    """``fn(*inputs)`` captured on static copies of ``examples``; ``replay`` copies new inputs in.

    Warm-up runs (which compile kernels and pick algorithms) go on a side stream before the
    capture, as CUDA graphs require. ``held`` is what the captured code declared through
    :func:`hold` (an engine's executor and arena), kept alive with the graph. ``fn`` must not
    synchronise with the host.

    The static inputs are made outside inference mode whatever mode the caller is in: the graph
    outlives the call, and a later replay outside inference mode copies into them in place.
    """

    def __init__(self, fn: Callable, examples: tuple[torch.Tensor, ...], *, warmup: int = 1,
                 stream: torch.cuda.Stream | None = None):
        with torch.inference_mode(False):
            self.inputs = tuple(e.clone() for e in examples)
        self.held: list = []
        self._warm_up(fn, warmup, stream)
        with holding(self.held):
            self.graph, self.outputs = self._record(fn, stream)

    def _warm_up(self, fn: Callable, warmup: int, stream: torch.cuda.Stream | None) -> None:
        device = self.inputs[0].device
        current = torch.cuda.current_stream(device)
        side = stream or torch.cuda.Stream(device=device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
        current.wait_stream(side)

    def _record(self, fn: Callable, stream: torch.cuda.Stream | None):
        """(the graph, the static outputs) of one capture of ``fn`` on the static inputs."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outputs = fn(*self.inputs)
        return graph, outputs

    def replay(self, *inputs: torch.Tensor):
        """Copy ``inputs`` into the static inputs, replay, return the static outputs (overwritten
        by the next replay: copy what must outlive it)."""
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs


class ShapeCache:
    """Per-input-shape state (arenas, captured CUDA graphs), least recently used dropped beyond
    ``capacity``: a service that sees many sizes keeps a bounded number of them alive."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()

    def get(self, key):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, entry) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def values(self):
        return self.entries.values()

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
