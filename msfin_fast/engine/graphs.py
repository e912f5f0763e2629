"""CUDA graphs: a function captured once per key and replayed, kept in an LRU of keys.

The engine captures its launches per input shape (``cuda_graphs=True``); the serving upscaler
captures a whole request (uint8 in, uint8 and a finite flag per image out) per batch shape and
options. Both use :class:`CapturedGraph` and the engine's :class:`~.executor.ShapeCache`.
"""

from __future__ import annotations

from typing import Callable

import torch


class CapturedGraph:
    """``fn(*inputs)`` captured on static copies of ``examples``; ``replay`` copies new inputs in.

    Warm-up runs (which compile kernels and pick algorithms) go on a side stream before the
    capture, as CUDA graphs require. ``state`` keeps whatever the graph's memory belongs to (an
    arena) alive with it. ``fn`` must not synchronise with the host.
    """

    def __init__(self, fn: Callable, examples: tuple[torch.Tensor, ...], *, warmup: int = 1,
                 stream: torch.cuda.Stream | None = None, state: object = None):
        device = examples[0].device
        self.inputs = tuple(e.clone() for e in examples)
        self.state = state
        current = torch.cuda.current_stream(device)
        side = stream or torch.cuda.Stream(device=device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.outputs = fn(*self.inputs)

    def replay(self, *inputs: torch.Tensor):
        """Copy ``inputs`` into the static inputs, replay, return the static outputs (overwritten
        by the next replay: copy what must outlive it)."""
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs
