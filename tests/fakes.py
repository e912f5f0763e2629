"""Stand-ins shared by several test modules."""

from __future__ import annotations

import torch

from msfin_fast.engine.graphs import CapturedGraph


class EagerGraph(CapturedGraph):
    """A :class:`CapturedGraph` that runs on the CPU: the warm-up and the capture call ``fn``
    (under the real ``CapturedGraph.__init__``: static inputs, ``held``), a replay calls it again on
    the static inputs and copies the result into the static outputs, as a real replay overwrites them."""

    def _warm_up(self, fn, warmup, stream):
        for _ in range(warmup):
            fn(*self.inputs)

    def _record(self, fn, stream):
        outputs = fn(*self.inputs)
        inputs = self.inputs

        class Replay:
            @staticmethod
            def replay():
                with torch.inference_mode():  # a graph writes its outputs whatever mode they were made in
                    again = fn(*inputs)
                    for old, new in zip(_flat(outputs), _flat(again)):
                        old.copy_(new)

        return Replay(), outputs


def _flat(outputs):
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
