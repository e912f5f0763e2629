"""What runs a plan's launches: one declared interface, one module per backend.

A backend is an object with

- ``name`` and ``unavailable_reason(model)``: why it cannot run ``model`` on the model's device
  (None when it can);
- ``dtypes``: the engine dtypes it runs (fp32 and fp16 where it does not say);
- ``fused_max_channels``: the widest RRCAB pass it runs as one launch (0: none), which the plan
  is built with;
- ``pack(model, plan, dtype)``: its own packed weights, a dict keyed by each launch's ``weights``;
- the launch operations the plan calls (:class:`KernelBackend`), or ``network`` for a backend that
  runs the whole module through PyTorch (:class:`ModuleBackend`).

``create(name)`` builds one by name; ``candidates(device)`` lists what ``backend="auto"`` measures
there. Each backend module imports what it alone needs: only ``triton`` imports ``kernels/``, only
``cuda`` imports the CUDA extension.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..source import Source


#: name → module of the backend class (imported on first use).
MODULES = {
    "triton": "triton",
    "cuda": "cuda",
    "emulate": "emulate",
    "native": "native",
    "cpu": "pytorch",
    "reference": "pytorch",
}
NAMES = tuple(MODULES)
#: Backends for checking kernels, never for images: ``optimize`` takes them, the doors do not.
CHECKING = ("emulate",)
#: What every door offers (the CLI's ``--backend``, Ray's options, ``msfin-fast info``): ``auto``
#: and every backend that is not only for checking.
CHOICES = ("auto",) + tuple(n for n in NAMES if n not in CHECKING)


@dataclass(frozen=True)
class BackendStatus:
    """One line of ``msfin-fast info``: a backend (or what it needs), whether it runs here, and why
    not or with what."""

    name: str
    available: bool
    detail: str


@dataclass(frozen=True)
class DenseCA:
    """A block's channel attention as dense fp32 matrices, the layout the CUDA and the C++ CPU kernels
    read: squeeze ``w1 [CR, C]``, ``b1 [CR]``, excite ``w2 [C, CR]``, ``b2 [C]``."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @property
    def channels(self) -> int:
        return self.w1.shape[1]

    @property
    def squeeze(self) -> int:
        return self.w1.shape[0]

    @classmethod
    def of(cls, ca: nn.Module, device=None) -> "DenseCA":
        """From a model's ChannelAttention (``conv_du.0`` squeeze, ``conv_du.2`` excite)."""
        down, up = ca.conv_du[0], ca.conv_du[2]
        c, cr = down.in_channels, down.out_channels

        def f32(x: torch.Tensor) -> torch.Tensor:
            return x.detach().to(device=device or x.device, dtype=torch.float32).contiguous()

        return cls(f32(down.weight.reshape(cr, c)), f32(down.bias), f32(up.weight.reshape(c, cr)), f32(up.bias))


def fold_tail(tail: nn.Conv2d, add_mean: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """tail2 with add_mean folded in, float64: ``w' = M·w`` [3, C, 3, 3], ``b' = M·b + b_mean`` [3]."""
    m = add_mean.weight.detach().double()[:, :, 0, 0]
    w = torch.einsum("oc,cikl->oikl", m, tail.weight.detach().double())
    return w, m @ tail.bias.detach().double() + add_mean.bias.detach().double()


@runtime_checkable
class Backend(Protocol):
    name: str
    fused_max_channels: int
    whole_network: bool  # True: the plan is one Network launch (ModuleBackend)

    def unavailable_reason(self, model: nn.Module) -> str | None: ...

    def pack(self, model: nn.Module, plan, dtype: torch.dtype) -> dict: ...


class KernelBackend(Backend, Protocol):
    """Runs the plan's launches one by one; the contracts are in kernels/*.py and csrc/README.md."""

    def scratch_numel(self, device: torch.device, channels: int, n: int, h: int, w: int) -> int:
        """Elements of per-launch scratch a fused pass of ``channels`` needs (0: none)."""

    def head(self, x: torch.Tensor, packed, out: torch.Tensor) -> None:
        """LR NCHW image → first features, NHWC (bilinear ×4, sub_mean, head conv)."""

    def rrcab_pass(self, src: Source, packed, x_out: torch.Tensor | None, a: torch.Tensor | None,
                   u_out: torch.Tensor, sums: torch.Tensor, fused: bool = False) -> None:
        """One step of an RRCAB block: x_out (the finished input, when asked), u_out, sums += Σ u.
        ``a`` is conv1's output, or with ``fused`` the launch's scratch."""

    def materialize(self, src: Source, out: torch.Tensor) -> None:
        """A deferred operand → a plain NHWC tensor."""

    def conv(self, inputs: list[torch.Tensor] | Source, packed, out: torch.Tensor, step) -> None:
        """A dense conv between blocks (``step``: the plan's Conv launch: ksize, stride, epilogue)."""

    def tail(self, src: Source, packed, out: torch.Tensor) -> None:
        """A deferred operand → the SR image, NCHW (tail conv with add_mean folded in)."""


class ModuleBackend(Backend, Protocol):
    """Runs the whole network as one PyTorch module (the plan is a single ``Network`` launch)."""

    def network(self, x: torch.Tensor, packed) -> torch.Tensor:
        """LR NCHW → SR NCHW."""


def pack_plan(model: nn.Module, plan, dtype: torch.dtype, packers) -> dict:
    """Every weight a plan's launches read, keyed by the launches' ``weights``, packed by
    ``packers``: an object with ``pack_head(sub_mean, head, scale)``, ``pack_tail(tail, add_mean,
    dtype)``, ``pack_block(block, dtype)`` and ``pack_conv(conv, n_inputs, dtype)`` (each kernel
    backend's layouts). Inline launches' PyTorch modules are the engine's, not packed here."""
    from ...model import RRCAB

    packed = {}
    for launch in plan.launches:
        key = launch.weights
        if key is None or key in packed or launch.inline:
            continue
        if key == "head":
            packed[key] = packers.pack_head(model.sub_mean, model.head, model.config.scale)
        elif key == "tail":
            packed[key] = packers.pack_tail(model.tail2, model.add_mean, dtype)
        elif isinstance(model.get_submodule(key), RRCAB):
            packed[key] = packers.pack_block(model.get_submodule(key), dtype)
        else:
            packed[key] = packers.pack_conv(model.get_submodule(key), len(launch.parts), dtype)
    return packed


def backend_class(name: str) -> type:
    """The class of the backend called ``name`` (see ``NAMES``), its module imported on first use."""
    module = importlib.import_module(f".{MODULES[name]}", __name__)
    return module.BACKENDS[name]


def create(name: str, **options) -> Backend:
    """The backend called ``name`` (see ``NAMES``); ``options``: ``fuse_rrcab`` for triton and emulate."""
    return backend_class(name)(**options)


def candidates(device: torch.device) -> dict[str, dict]:
    """What ``backend="auto"`` considers on ``device``: label → ``create`` arguments, in order of
    preference. On a GPU the kernel variants, which it measures (:func:`measures`); on a CPU the
    ``native`` C++ kernels, else (not built, or a model they have no variant for) the ``cpu``
    backend. The Triton interpreter is for checking kernels, never for speed."""
    if device.type == "cuda":
        return {"triton": dict(name="triton"), "triton-fused": dict(name="triton", fuse_rrcab=True),
                "cuda": dict(name="cuda")}
    return {"native": dict(name="native"), "cpu": dict(name="cpu")}


def measures(device: torch.device) -> bool:
    """Whether ``auto`` times its candidates on ``device`` (the first input of each shape class runs
    every one of them) or takes the first that can run. On a CPU that would cost seconds per shape,
    and the order is settled by measurement: the native kernels ran 1.5–4.6× faster than the cpu
    backend, and faster than ONNX Runtime, OpenVINO and torch.compile, at every size measured
    (benchmarks/NOTES.md, 2026-12-06)."""
    return device.type == "cuda"
