"""The engine's launches as one ``torch.library`` custom op, so ``torch.compile(engine)`` sees them.

Under ``torch.compile`` the engine runs its plan functionally (``Executor.run_functional``): every
kernel launch is a call of ``msfin_fast::launch(key, index, inputs)``, which runs launch ``index``
of the executor registered under ``key`` into freshly allocated outputs (the compiler plans the
memory). Its fake implementation allocates the same outputs from the plan's shapes without
running anything, so the whole forward is one graph.

The executor is passed by key, an int into a registry the engine fills: the key is a constant to
the compiler, the weights never become graph inputs, and re-packing replaces the registry entry
in place.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

_REGISTRY: dict[int, object] = {}
_keys = itertools.count(1)


def register(owner: object, executor: object) -> int:
    """Store ``executor`` until ``owner`` is garbage-collected; returns its key."""
    key = next(_keys)
    _REGISTRY[key] = executor
    weakref.finalize(owner, _REGISTRY.pop, key, None)
    return key


def replace(key: int, executor: object) -> None:
    _REGISTRY[key] = executor


def executor(key: int):
    return _REGISTRY[key]


@torch.library.custom_op("msfin_fast::launch", mutates_args=())
def launch(key: int, index: int, inputs: list[Tensor]) -> list[Tensor]:
    """Launch ``index`` of executor ``key`` on ``inputs`` (its plan's ``inputs()`` order); returns
    its ``outputs()`` in order."""
    return executor(key).launch(index, inputs)


@launch.register_fake
def _(key, index, inputs):
    launch_, made, _ = executor(key).allocate(index, inputs)
    return [made[v] for v in launch_.outputs()]
