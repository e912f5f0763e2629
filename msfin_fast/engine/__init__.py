"""The fast engine: the reference network's graph executed as fused kernel launches.

``optimize(model)`` returns an :class:`Engine`, an ``nn.Module`` with the reference's call
signature (LR [N, 3, h, w] in 0–255 → SR [N, 3, 4h, 4w]). It is built from the model you pass:
``plan`` derives the launches from the model's traced graph, ``packing`` lays the weights out for
the kernels (again whenever the model's parameters change), ``runtime`` runs the launches over an
arena planned per input shape, optionally replaying a CUDA graph per shape.

Backends: ``"triton"`` (kernels/, on CUDA, or on the CPU under ``TRITON_INTERPRET=1``),
``"cuda"`` (the RRCAB passes by the CUDA C++ kernel of csrc/, everything else by Triton),
``"emulate"`` (the same plan with every kernel computed by PyTorch ops — slow, for checking),
``"reference"`` (the model itself). ``"auto"`` on a GPU measures the engine's variants per shape
class and runs the fastest (``choice.AutoEngine``); where the kernels cannot run it falls back to
the reference, saying so once.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import torch
from torch import nn

from ..errors import ConfigError, DeviceError, InvalidInputError
from ..model import MSFIN, RRCAB, check_input
from . import plan as P
from .backends import EmulatedOps
from .packing import pack_conv, pack_head, pack_rrcab, pack_tail
from .runtime import Runner, ShapeCache

BACKENDS = ("auto", "triton", "cuda", "emulate", "reference")
DTYPES = (torch.float32, torch.float16)
_warned: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cuda_unavailable_reason(model: MSFIN) -> str | None:
    """Why the CUDA C++ RRCAB kernel cannot run ``model`` (None when it can)."""
    from . import cuda_backend

    if model.head.weight.device.type != "cuda":
        return f"the CUDA C++ kernel needs a CUDA device (the model is on {model.head.weight.device})"
    if not cuda_backend.available():
        return cuda_backend.unavailable_reason()
    widths = {(m.body[0].in_channels, m.body[0].groups) for m in model.modules() if isinstance(m, RRCAB)}
    missing = widths - {tuple(c) for c in cuda_backend._C.supported_configs()}
    if missing:
        return f"the CUDA C++ kernel has no variant for (channels, groups) {sorted(missing)}"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the Triton kernels need a CUDA device (the model is on {device}; TRITON_INTERPRET=1 runs them slowly on the CPU)"


class Engine(nn.Module):
    """MSFIN through fused kernels; same inputs and outputs as the reference module it was built from.

    Not thread-safe: calls of one input shape share that shape's arena (ServingUpscaler gives an
    engine a single worker thread). Arenas (eager calls) and captured graphs (``cuda_graphs``) are
    kept per input shape, the ``max_arenas`` / ``max_graphs`` most recently used of each.
    """

    def __init__(self, model: MSFIN, dtype: torch.dtype = torch.float16, backend: str = "auto",
                 cuda_graphs: bool = False, max_graphs: int = 8, conv_kernels: bool = True,
                 fuse_rrcab: bool = False, max_arenas: int = 4):
        super().__init__()
        if not isinstance(model, MSFIN):
            raise ConfigError(f"optimize() takes an msfin_fast.MSFIN model, got {type(model).__name__}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        for name, value in (("max_graphs", max_graphs), ("max_arenas", max_arenas)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.__dict__["source"] = model  # not a submodule: the engine holds packed copies, not the weights
        self.dtype = dtype
        self.requested_backend = backend
        self.cuda_graphs = cuda_graphs
        self.conv_kernels = conv_kernels
        self.fuse_rrcab = fuse_rrcab
        self.check_finite = True
        self.graphs = ShapeCache(max_graphs)
        self.fallback_reason: str | None = None
        self._version: tuple | None = None
        self._arenas = ShapeCache(max_arenas)
        self._reference: MSFIN | None = None
        self._keys: dict[str, int] = {}
        self._choose_backend()
        self._refresh()  # pack now: under torch.compile the forward must not pack

    # Set-up ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.source.head.weight.device

    @property
    def backend(self) -> str:
        """What actually runs: ``triton``, ``cuda``, ``emulate`` or ``reference``."""
        return self._backend

    def _choose_backend(self) -> None:
        requested = self.requested_backend
        self._backend = requested
        reason = None
        if self.source.config.scale != 4:
            reason = f"the engine's head kernel is specialised for ×4 (model is ×{self.source.config.scale})"
        else:
            try:
                if requested == "cuda":  # one launch per pass at every width
                    self.plan = P.build_plan(self.source, conv_kernels=self.conv_kernels, fused_rrcab=True,
                                             fused_max_channels=1 << 30)
                else:
                    self.plan = P.build_plan(self.source, conv_kernels=self.conv_kernels,
                                             fused_rrcab=self.fuse_rrcab)
            except P.UnsupportedModel as exc:
                reason = str(exc)
        if reason is None and requested in ("auto", "triton", "cuda"):
            reason = triton_unavailable_reason(self.device)
            if reason is None and requested == "cuda":
                reason = cuda_unavailable_reason(self.source)
            if reason is None:
                self._backend = "triton" if requested == "auto" else requested
        if requested == "reference":
            reason = "backend='reference' was requested"
        if reason is not None and requested in ("triton", "cuda", "emulate"):
            raise DeviceError(f"backend={requested!r} cannot run: {reason}")
        if reason is not None:
            self._backend = "reference"
            self.fallback_reason = reason
            if requested == "auto":
                _say_once(f"msfin_fast.optimize: running the PyTorch reference instead of the kernels: {reason}")
        if self._backend == "triton":
            from .backends import TritonOps

            self.ops = TritonOps(fused_rrcab=self.fuse_rrcab)
        elif self._backend == "cuda":
            from .backends import CudaOps

            self.ops = CudaOps()
        elif self._backend == "emulate":
            self.ops = EmulatedOps()

    def _parameters_version(self) -> tuple:
        return (self.device,) + tuple(p._version for p in self.source.parameters())

    def refresh(self) -> None:
        """Re-pack now if the source model changed (eager calls do this themselves)."""
        self._refresh()

    def _refresh(self) -> None:
        """Pack the weights, again if the source model's parameters changed since the last call."""
        version = self._parameters_version()
        if version == self._version:
            return
        m = self.source
        if self._backend == "reference":
            self._reference = copy.deepcopy(m).to(self.dtype).eval()
            self._reference.check_finite = False
        else:
            with torch.no_grad():
                packed = {name: pack_rrcab(mod, self.dtype) for name, mod in m.named_children() if isinstance(mod, RRCAB)}
                if self._backend == "cuda":
                    from . import cuda_backend

                    for name, p in packed.items():
                        p.cuda = cuda_backend.pack_rrcab(p.module, self.dtype, self.device)
                        p.ca = p.ca._replace(cuda=p.cuda.ca)
                packed["head"] = pack_head(m.sub_mean, m.head, m.config.scale)
                packed["tail"] = pack_tail(m.tail2, m.add_mean, self.dtype)
                for launch in self.plan.launches:
                    if isinstance(launch, P.Conv):
                        conv = m.get_submodule(launch.module)
                        packed[launch.module] = pack_conv(conv, len(launch.inputs), self.dtype)
                layers = {
                    launch.module: copy.deepcopy(m.get_submodule(launch.module))
                    .to(dtype=self.dtype, memory_format=torch.channels_last).eval()
                    for launch in self.plan.launches if isinstance(launch, P.Layer)
                }
            self.runner = Runner(self.plan, self.ops, packed, layers, self._register(packed))
            self._arenas.clear()
            self.graphs.clear()
        self._version = version

    def _register(self, packed: dict) -> dict[str, int]:
        """Registry keys for the torch.library ops; re-packing replaces the entries under the same keys."""
        from . import ops

        entries = {name: (self.ops, p) for name, p in packed.items()}
        entries["head"] = (self.ops, packed["head"], self.dtype)
        entries["ops"] = self.ops
        for name, entry in entries.items():
            if name in self._keys:
                ops.replace(self._keys[name], entry)
            else:
                self._keys[name] = ops.register(self, entry)
        return dict(self._keys)

    # Forward ---------------------------------------------------------------------------------------

    @property
    def scale(self) -> int:
        return self.source.config.scale

    def arena_bytes(self, n: int, h: int, w: int) -> int:
        """Bytes of the activation arena for an input [n, 3, h, w] (PyTorch-run layers come on top)."""
        self._refresh()
        if self._backend == "reference":
            raise DeviceError("the reference backend has no arena")
        s = self.scale
        return self.runner.arena(n, s * h, s * w, self.dtype, torch.device("meta")).nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LR image [N, 3, h, w] in [0, 255] (any float dtype) → SR [N, 3, 4h, 4w] in the engine's dtype."""
        compiling = torch.compiler.is_compiling()
        check_input(x, check_finite=self.check_finite and not compiling)
        if x.device != self.device:
            raise DeviceError(f"input is on {x.device} but the engine's model is on {self.device}; move one of them")
        if not compiling:  # a compiled engine keeps the weights it was packed with (call refresh())
            self._refresh()
        if self._backend != "reference":
            n, _, h, w = x.shape
            widest = n * (self.scale * h) * (self.scale * w) * self.source.config.n_feats
            if widest >= 2**31:
                raise InvalidInputError(
                    f"input {tuple(x.shape)} makes a {widest}-element activation, beyond the kernels' 32-bit "
                    "indexing; split the batch or run tiles (Upscaler(..., tile=512))"
                )
        x = x.to(self.dtype).contiguous()
        with torch.no_grad():
            if self._backend == "reference":
                return self._reference(x)
            if compiling:
                return self.runner.run_functional(x)
            if self.cuda_graphs and x.is_cuda:
                return self._replay(x)
            n, _, h, w = x.shape
            arena = self._arena(x)
            out = torch.empty(n, 3, self.scale * h, self.scale * w, dtype=self.dtype, device=x.device)
            return self.runner.run(x, arena, out)

    def _arena(self, x: torch.Tensor):
        key = tuple(x.shape)
        arena = self._arenas.get(key)
        if arena is None:
            n, _, h, w = x.shape
            arena = self.runner.arena(n, self.scale * h, self.scale * w, self.dtype, x.device)
            self._arenas.put(key, arena)
        return arena

    def poison_buffers(self) -> None:
        """Fill every arena (and the fused kernel's scratch) and every captured graph's output with
        NaN. For tests: a kernel that reads a value nobody wrote during the next call then fails
        loudly instead of reusing what the previous call left behind."""
        captured = list(self.graphs.values())
        tensors = [static_out for _, _, static_out, _ in captured]
        for arena in [*self._arenas.values(), *(arena for *_, arena in captured)]:
            tensors += arena.tensors + ([arena.scratch] if arena.scratch is not None else [])
        for t in tensors:
            t.fill_(float("nan"))

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        entry = self.graphs.get(key)
        if entry is None:
            n, _, h, w = x.shape
            static_x = x.clone()
            arena = self.runner.arena(n, self.scale * h, self.scale * w, self.dtype, x.device)
            static_out = torch.empty(n, 3, self.scale * h, self.scale * w, dtype=self.dtype, device=x.device)
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up compiles the kernels outside the capture
                self.runner.run(static_x, arena, static_out)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.runner.run(static_x, arena, static_out)
            entry = (graph, static_x, static_out, arena)
            self.graphs.put(key, entry)
        graph, static_x, static_out, _ = entry
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()

    def extra_repr(self) -> str:
        return (f"backend={self._backend}, dtype={self.dtype}, cuda_graphs={self.cuda_graphs}, "
                f"conv_kernels={self.conv_kernels}, fuse_rrcab={self.fuse_rrcab}")


def variants(model: MSFIN) -> dict[str, dict]:
    """The engine configurations ``backend="auto"`` chooses among on ``model``'s device."""
    out = {"triton": dict(backend="triton"), "triton-fused": dict(backend="triton", fuse_rrcab=True)}
    if cuda_unavailable_reason(model) is None:
        out["cuda"] = dict(backend="cuda")
    return out


def optimize(model: MSFIN, dtype: torch.dtype = torch.float16, backend: str = "auto",
             cuda_graphs: bool = False, max_graphs: int = 8, conv_kernels: bool = True,
             fuse_rrcab: bool = False, max_arenas: int = 4) -> nn.Module:
    """A faster drop-in for ``model`` (see :class:`Engine`); ``model`` stays usable and unchanged.

    ``conv_kernels=False`` runs the layers between RRCAB blocks through PyTorch (cuDNN) instead
    of kernels/conv.py, to compare the two. ``fuse_rrcab=True`` runs each RRCAB pass as one launch
    that keeps conv1's output in an L2-resident scratch (kernels/rrcab_fused.py) instead of two.
    """
    engine = Engine(model, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs, max_graphs=max_graphs,
                    conv_kernels=conv_kernels, fuse_rrcab=fuse_rrcab, max_arenas=max_arenas)
    if backend != "auto" or engine.backend != "triton" or not engine.device.type == "cuda":
        return engine
    from .choice import AutoEngine

    engines = {"triton-fused" if fuse_rrcab else "triton": engine}
    for name, kw in variants(model).items():
        if name not in engines:
            engines[name] = Engine(model, dtype=dtype, cuda_graphs=cuda_graphs, max_graphs=max_graphs,
                                   conv_kernels=conv_kernels, max_arenas=max_arenas, **kw)
    return AutoEngine(model, engines, dtype)
