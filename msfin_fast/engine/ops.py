"""The engine's launches as ``torch.library`` custom ops, so ``torch.compile(engine)`` sees them.

Under ``torch.compile`` the engine runs its plan functionally: every launch is one of the ops
below, which allocate their outputs (the compiler plans memory), and have fake implementations
that give output shapes without running anything, so the whole forward is one graph.

The ops take activations as tensors and the packed weights by key: an int into a registry the
engine fills when it packs. The key is a constant to the compiler; the weights never become
graph inputs, and re-packing replaces the registry entry in place.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

from ..kernels.contract import FUSED_MAX_CHANNELS, Source

_REGISTRY: dict[int, object] = {}
_keys = itertools.count(1)


def register(owner: object, entry: object) -> int:
    """Store ``entry`` (backend ops, packed weights) until ``owner`` is garbage-collected."""
    key = next(_keys)
    _REGISTRY[key] = entry
    weakref.finalize(owner, _REGISTRY.pop, key, None)
    return key


def replace(key: int, entry: object) -> None:
    _REGISTRY[key] = entry


def _entry(key: int):
    return _REGISTRY[key]


def _source(t, u, sums, e1, e2, ca_key: int) -> Source:
    ca = _entry(ca_key)[1].ca if ca_key >= 0 else None
    return Source(t, u, sums, ca, e1, e2)


@torch.library.custom_op("msfin_fast::head", mutates_args=())
def head(x: Tensor, key: int) -> Tensor:
    ops, packed, dtype = _entry(key)
    n, _, h, w = x.shape
    out = torch.empty(n, packed.scale * h, packed.scale * w, packed.head.out_channels, dtype=dtype, device=x.device)
    ops.head(x, packed, out)
    return out


@head.register_fake
def _(x, key):
    _, packed, dtype = _entry(key)
    n, _, h, w = x.shape
    return x.new_empty(n, packed.scale * h, packed.scale * w, packed.head.out_channels, dtype=dtype)


@torch.library.custom_op("msfin_fast::rrcab_pass", mutates_args=())
def rrcab_pass(t: Tensor, u: Tensor | None, sums: Tensor | None, e1: Tensor | None, e2: Tensor | None,
               ca_key: int, key: int, write_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(finished input or an empty tensor, pre-CA output u, its channel sums)."""
    ops, packed = _entry(key)
    x_out = torch.empty_like(t) if write_x else None
    u_out = torch.empty_like(t)
    n, h, w, c = t.shape
    fused = getattr(ops, "fused_rrcab", False) and c <= FUSED_MAX_CHANNELS
    a = t.new_empty(ops.scratch_numel(t.device, c, n, h, w)) if fused else torch.empty_like(t)
    sums_out = torch.zeros(n, c, dtype=torch.float32, device=t.device)
    ops.rrcab_pass(_source(t, u, sums, e1, e2, ca_key), packed, x_out, a, u_out, sums_out, fused=fused)
    return (x_out if write_x else t.new_empty(0)), u_out, sums_out


@rrcab_pass.register_fake
def _(t, u, sums, e1, e2, ca_key, key, write_x):
    x = torch.empty_like(t) if write_x else t.new_empty(0)
    return x, torch.empty_like(t), t.new_empty(t.shape[0], t.shape[-1], dtype=torch.float32)


@torch.library.custom_op("msfin_fast::materialize", mutates_args=())
def materialize(t: Tensor, u: Tensor | None, sums: Tensor | None, e1: Tensor | None, e2: Tensor | None,
                ca_key: int, ops_key: int) -> Tensor:
    out = torch.empty_like(t)
    _entry(ops_key).materialize(_source(t, u, sums, e1, e2, ca_key), out)
    return out


@materialize.register_fake
def _(t, u, sums, e1, e2, ca_key, ops_key):
    return torch.empty_like(t)


@torch.library.custom_op("msfin_fast::tail", mutates_args=())
def tail(t: Tensor, u: Tensor | None, sums: Tensor | None, e1: Tensor | None, e2: Tensor | None,
         ca_key: int, key: int) -> Tensor:
    ops, packed = _entry(key)
    n, h, w, _ = t.shape
    out = torch.empty(n, 3, h, w, dtype=t.dtype, device=t.device)
    ops.tail(_source(t, u, sums, e1, e2, ca_key), packed, out)
    return out


@tail.register_fake
def _(t, u, sums, e1, e2, ca_key, key):
    n, h, w, _ = t.shape
    return t.new_empty(n, 3, h, w)


def _conv_out(inputs: list[Tensor], packed, stride: int, shuffle: bool) -> tuple[int, int, int, int]:
    n, h, w, _ = inputs[0].shape
    h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
    m = packed.module
    if isinstance(m, torch.nn.ConvTranspose2d):
        return n, 2 * h, 2 * w, m.out_channels
    return (n, 2 * h, 2 * w, m.out_channels // 4) if shuffle else (n, h, w, m.out_channels)


@torch.library.custom_op("msfin_fast::conv", mutates_args=())
def conv(inputs: list[Tensor], u: Tensor | None, sums: Tensor | None, e1: Tensor | None, e2: Tensor | None,
         ca_key: int, key: int, ksize: int, stride: int, leaky: bool, shuffle: bool) -> Tensor:
    """A conv between blocks; with ``u``/``e1`` its single input is deferred (see kernels/conv.py)."""
    from .plan import Conv

    ops, packed = _entry(key)
    out = inputs[0].new_empty(_conv_out(inputs, packed, stride, shuffle))
    deferred = u is not None or e1 is not None
    src = _source(inputs[0], u, sums, e1, e2, ca_key) if deferred else inputs
    ops.conv(src, packed, out, Conv("", [], None, ksize, stride, leaky, shuffle))
    return out


@conv.register_fake
def _(inputs, u, sums, e1, e2, ca_key, key, ksize, stride, leaky, shuffle):
    return inputs[0].new_empty(_conv_out(inputs, _entry(key)[1], stride, shuffle))
