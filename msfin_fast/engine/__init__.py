"""The fast engine: the reference network's graph executed as launches of one backend.

``optimize(model)`` returns an :class:`Engine` (or, where ``auto`` has several candidates, an
:class:`~.auto.AutoEngine` that measures them), an ``nn.Module`` with the reference's call
signature (LR [N, 3, h, w] in 0–255 → SR [N, 3, 4h, 4w]). It is built from the model you pass:
``plan`` derives the launches from the model's traced graph, the backend packs the weights in its
own layouts (again whenever the model's parameters change), ``executor`` runs the launches over an
arena planned per input shape, optionally replaying a CUDA graph per shape.

Backends (``backends/``, one module each): ``"triton"`` (kernels/, on CUDA, or on the CPU under
``TRITON_INTERPRET=1``), ``"cuda"`` (RRCAB passes by the CUDA C++ kernel of csrc/, the rest by
Triton), ``"emulate"`` (the Triton plan computed by PyTorch ops — slow, for checking), ``"native"``
(the C++ CPU kernels of csrc/cpu/, fp32), ``"cpu"`` (the whole network in PyTorch fp32
``channels_last``), ``"reference"`` (the model itself). ``"auto"`` takes
``backends.candidates(device)``: on a GPU it measures the kernel variants per shape class and runs
the fastest; on a CPU it is ``native``, else ``cpu`` (saying once why the native kernels cannot
run when they are not built). Where no candidate can run it falls back to the reference, saying so once.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import nn

from ..devices import ENGINE_DTYPES
from ..errors import ConfigError, DeviceError, InvalidInputError
from ..model import MSFIN, check_input
from . import backends as B
from . import custom_op
from . import plan as P
from .executor import Arena, Executor
from .cuda_graphs import CapturedGraph, ShapeCache

BACKENDS = ("auto",) + B.NAMES
DTYPES = ENGINE_DTYPES
_warned: set[str] = set()

# Bumped whenever any module registers a parameter or a submodule (``m.weight = Parameter(...)``,
# ``m.head = Conv2d(...)``, ``load_state_dict(assign=True)``): an engine then lists its source's
# parameters again. Between such events it only reads the ``_version`` counters of the list it
# has (in-place updates: ``load_state_dict``, optimizer steps), ~70 us per call instead of the
# ~0.8 ms of walking the module tree on every call.
_registrations = 0


def _registered(*_args) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_module_registration_hook(_registered)


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _plan_for(backend, model: MSFIN, conv_kernels: bool) -> P.Plan:
    if backend.whole_network:
        return P.whole_network_plan()
    return P.build_plan(model, conv_kernels=conv_kernels, fused_max_channels=backend.fused_max_channels)


def dtype_problem(backend, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run an engine of ``dtype`` (None: it can). Backends list what they
    take in ``dtypes``; bfloat16 has a path on the CPU only (native, cpu, reference)."""
    allowed = getattr(backend, "dtypes", (torch.float32, torch.float16))
    if dtype in allowed:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return f"the {backend.name} backend computes in {names}, not {str(dtype).replace('torch.', '')}"


def resolve(model: MSFIN, requested: str, fuse_rrcab: bool = False, conv_kernels: bool = True,
            dtype: torch.dtype = torch.float32):
    """(backend, plan, why the request fell back to the reference or None) for ``requested``.

    A named backend that cannot run ``model`` in ``dtype`` here is a DeviceError; ``auto`` takes
    the first candidate that can, else the reference.
    """
    names = [requested] if requested != "auto" else [kw["name"] for kw in B.candidates(model.head.weight.device).values()]
    first_reason = None
    for name in names:
        backend = B.create(name, fuse_rrcab=fuse_rrcab)
        try:
            reason = dtype_problem(backend, dtype) or backend.unavailable_reason(model)
            plan = _plan_for(backend, model, conv_kernels) if reason is None else None
        except P.UnsupportedModel as exc:
            reason = str(exc)
        if reason is None:
            if first_reason is not None and "not built" in first_reason:
                _say_once(f"msfin_fast.optimize: running the {name} backend: {first_reason}")
            return backend, plan, None
        if requested != "auto":
            raise DeviceError(f"backend={requested!r} cannot run: {reason}")
        first_reason = first_reason or reason
    return B.create("reference"), P.whole_network_plan(), first_reason


class Engine(nn.Module):
    """MSFIN through one backend; same inputs and outputs as the reference module it was built from.

    Safe to call from several threads: calls of one input shape share that shape's arena (and
    graph), so eager calls take turns (a lock per engine; the kernels already use every core the
    process allows). Arenas (eager calls) and captured graphs (``cuda_graphs``) are kept per input
    shape, the ``max_arenas`` / ``max_graphs`` most recently used of each.

    The SR image comes back in ``dtype``, or in ``output_dtype`` when given: a bfloat16 engine's
    image cast to bf16 is rounded to steps of 0.5 from 64 and 1 from 128 grey levels, so whoever
    rounds it to 8 bits again (the Upscaler) asks for float32.
    """

    def __init__(self, model: MSFIN, dtype: torch.dtype = torch.float16, backend: str = "auto",
                 cuda_graphs: bool = False, max_graphs: int = 8, conv_kernels: bool = True,
                 fuse_rrcab: bool = False, max_arenas: int = 4, output_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(model, MSFIN):
            raise ConfigError(f"optimize() takes an msfin_fast.MSFIN model, got {type(model).__name__}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        if output_dtype is not None and output_dtype not in DTYPES:
            raise ConfigError(f"output_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {output_dtype}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        for name, value in (("max_graphs", max_graphs), ("max_arenas", max_arenas)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.__dict__["source"] = model  # not a submodule: the engine holds packed copies, not the weights
        self.__dict__["_lock"] = threading.RLock()  # eager calls share arenas and graphs
        self.dtype = dtype
        self.output_dtype = output_dtype or dtype
        self.requested_backend = backend
        self.cuda_graphs = cuda_graphs
        self.conv_kernels = conv_kernels
        self.fuse_rrcab = fuse_rrcab
        self.graphs = ShapeCache(max_graphs)
        self._arenas = ShapeCache(max_arenas)
        self._version: tuple | None = None
        self.backend_object, self.plan, self.fallback_reason = resolve(model, backend, fuse_rrcab, conv_kernels, dtype)
        if self.fallback_reason is not None:
            _say_once(f"msfin_fast.optimize: running the PyTorch reference instead of the kernels: "
                      f"{self.fallback_reason}")
        elif backend == "reference":
            self.fallback_reason = "backend='reference' was requested"
        # What activations are stored in: the engine's dtype, unless the backend has one of its own
        # (the native CPU kernels are fp32; the output is then cast to ``dtype``), and what the
        # buffers read only as addends are stored in (the native kernels' bf16 mode).
        self.storage_dtype = getattr(self.backend_object, "storage_dtype", lambda d: d)(dtype)
        self.addend_dtype = getattr(self.backend_object, "addend_dtype", lambda d: self.storage_dtype)(dtype)
        self._key: int | None = None
        self._refresh()  # pack now: under torch.compile the forward must not pack

    # Set-up ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.source.head.weight.device

    @property
    def backend(self) -> str:
        """What actually runs: ``triton``, ``cuda``, ``emulate``, ``cpu`` or ``reference``."""
        return self.backend_object.name

    @property
    def scale(self) -> int:
        return self.source.config.scale

    @property
    def has_arena(self) -> bool:
        """Whether activations live in a planned arena (``arena_bytes`` sizes it); the whole-network
        backends allocate through PyTorch like the reference."""
        return not self.backend_object.whole_network

    @property
    def config(self):
        return self.source.config

    def _parameters_version(self) -> tuple:
        listed = self.__dict__.get("_params")
        if listed is None or listed[0] != _registrations:
            listed = (_registrations, list(self.source.parameters()))
            self.__dict__["_params"] = listed
        return (self.device,) + tuple((id(p), p._version) for p in listed[1])

    def refresh(self) -> None:
        """Re-pack now if the source model changed (eager calls do this themselves)."""
        self._refresh()

    def _refresh(self) -> None:
        """Pack the weights, again if the source model's parameters changed since the last call."""
        version = self._parameters_version()
        if version == self._version:
            return
        m = self.source
        with torch.inference_mode(False), torch.no_grad():  # the packed weights outlive this call
            packed = self.backend_object.pack(m, self.plan, self.storage_dtype)
            for launch in self.plan.launches:
                module = launch.torch_weights(m, self.storage_dtype)
                if module is not None:
                    packed[launch.weights] = module
        self.executor = Executor(self.plan, self.backend_object, packed, self.storage_dtype, self.scale, self.addend_dtype)
        if self._key is None:
            self._key = custom_op.register(self, self.executor)
        else:
            custom_op.replace(self._key, self.executor)
        self._arenas.clear()
        self.graphs.clear()
        self._version = version

    # Forward ---------------------------------------------------------------------------------------

    def arena_bytes(self, n: int, h: int, w: int) -> int:
        """Bytes of the activation arena for an input [n, 3, h, w] (PyTorch-run layers come on top)."""
        self._refresh()
        if self.backend_object.whole_network:
            raise DeviceError(f"the {self.backend} backend runs the model as one module and has no arena")
        s = self.scale
        return self.executor.arena(n, s * h, s * w, torch.device("meta")).nbytes

    def forward(self, x: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
        """LR image [N, 3, h, w] in [0, 255] (any float dtype) → SR [N, 3, 4h, 4w] in ``output_dtype``.

        ``check_finite=False`` skips the input's NaN/Inf test (a host sync; callers that validated
        the input, or capture a CUDA graph, pass it). Under ``torch.compile`` the test is left out
        (it would break the graph); the caller checks the output.
        """
        compiling = torch.compiler.is_compiling()
        check_input(x, check_finite=check_finite and not compiling)
        if x.device != self.device:
            raise DeviceError(f"input is on {x.device} but the engine's model is on {self.device}; move one of them")
        n, _, h, w = x.shape
        widest = n * (self.scale * h) * (self.scale * w) * self.source.config.n_feats
        if widest >= 2**31 and not self.backend_object.whole_network:
            raise InvalidInputError(
                f"input {tuple(x.shape)} makes a {widest}-element activation, beyond the kernels' 32-bit "
                "indexing; split the batch or run tiles (Upscaler(..., tile=512))"
            )
        if not self.backend_object.whole_network:  # a whole-network backend takes the input in its own dtype
            x = x.to(self.storage_dtype).contiguous()
        if compiling:
            with torch.no_grad():
                return self.executor.run_functional(x, self._key).to(self.output_dtype)
        with self._lock, torch.no_grad():
            self._refresh()  # a compiled engine keeps the weights it was packed with (call refresh())
            if self.cuda_graphs and x.is_cuda:
                return self._replay(x)
            arena = self._arena(x)
            out = torch.empty(n, 3, self.scale * h, self.scale * w, dtype=self.storage_dtype, device=x.device)
            return self.executor.run(x, arena, out).to(self.output_dtype)

    def _arena(self, x: torch.Tensor):
        key = tuple(x.shape)
        arena = self._arenas.get(key)
        if arena is None:
            n, _, h, w = x.shape
            arena = self.executor.arena(n, self.scale * h, self.scale * w, x.device)
            self._arenas.put(key, arena)
        return arena

    def poison_buffers(self) -> None:
        """Fill every arena (and the fused passes' scratch) and every captured graph's output with
        NaN. For tests: a kernel that reads a value nobody wrote during the next call then fails
        loudly instead of reusing what the previous call left behind."""
        captured = list(self.graphs.values())
        tensors = [g.outputs for g in captured]
        held = [a for g in captured for a in g.held if isinstance(a, Arena)]
        for arena in [*self._arenas.values(), *held]:
            tensors += arena.tensors + ([arena.scratch] if arena.scratch is not None else [])
            # buffers stored narrower than their slot: NaN in their own dtype too (an fp32 NaN
            # read as two bf16 halves is a NaN and a zero)
            tensors += [v for b, v in arena.values.items() if isinstance(b, P.Buf) and v.dtype != self.storage_dtype]
        for t in tensors:
            t.fill_(float("nan"))

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        entry = self.graphs.get(key)
        if entry is None:
            n, _, h, w = x.shape
            arena = self.executor.arena(n, self.scale * h, self.scale * w, x.device)
            with torch.inference_mode(False):  # the graph's output outlives this call, as its arena does
                out = torch.empty(n, 3, self.scale * h, self.scale * w, dtype=self.storage_dtype, device=x.device)
            entry = CapturedGraph(lambda static_x: self.executor.run(static_x, arena, out), (x,))
            self.graphs.put(key, entry)
        return entry.replay(x).to(self.output_dtype, copy=True)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_params", None)  # listed again after loading (the registration count restarts)
        return state

    def __setstate__(self, state):
        state.setdefault("output_dtype", state.get("dtype"))  # pickled before output_dtype existed
        super().__setstate__(state)
        self.__dict__["_lock"] = threading.RLock()

    def extra_repr(self) -> str:
        out = f", output_dtype={self.output_dtype}" if self.output_dtype != self.dtype else ""
        return (f"backend={self.backend}, dtype={self.dtype}{out}, cuda_graphs={self.cuda_graphs}, "
                f"conv_kernels={self.conv_kernels}, fuse_rrcab={self.fuse_rrcab}")


def default_backend(device: torch.device | str, tile_mode: str = "plain", model=None) -> str:
    """The backend every door (the CLI, ``Upscaler``, ``ServingUpscaler``, Ray jobs and services) runs
    when none is named: ``auto`` on a CPU (the native C++ kernels, else the cpu backend), ``reference``
    on a GPU (the engine is not yet verified on one), for exact tiles (which walk the reference's
    graph) and for a ``model`` that is a module but not the reference MSFIN (the engine is built from one)."""
    if isinstance(model, nn.Module) and not isinstance(model, MSFIN):
        return "reference"
    return "auto" if torch.device(device).type == "cpu" and tile_mode != "exact" else "reference"


def statuses() -> list[B.BackendStatus]:
    """What each backend the doors offer says about this machine (its class's ``status()``), in
    the registry's order, and what ``auto`` has measured here: ``msfin-fast info``'s backends."""
    from .auto import choices_status

    return [B.backend_class(name).status() for name in B.CHOICES if name != "auto"] + [choices_status()]


def variants(model: MSFIN) -> dict[str, dict]:
    """The engine configurations ``backend="auto"`` measures on ``model``'s device (those that can run)."""
    out = {}
    for label, kw in B.candidates(model.head.weight.device).items():
        backend = B.create(kw["name"], fuse_rrcab=kw.get("fuse_rrcab", False))
        if backend.unavailable_reason(model) is None:
            out[label] = dict(backend=kw["name"], fuse_rrcab=kw.get("fuse_rrcab", False))
    return out


def optimize(model: MSFIN, dtype: torch.dtype = torch.float16, backend: str = "auto",
             cuda_graphs: bool = False, max_graphs: int = 8, conv_kernels: bool = True,
             fuse_rrcab: bool = False, max_arenas: int = 4, output_dtype: torch.dtype | None = None) -> nn.Module:
    """A faster drop-in for ``model`` (see :class:`Engine`); ``model`` stays usable and unchanged.

    ``conv_kernels=False`` runs the layers between RRCAB blocks through PyTorch (cuDNN) instead
    of the backend's conv launches, to compare the two. ``fuse_rrcab=True`` runs each RRCAB pass
    the Triton kernel can fuse as one launch that keeps conv1's output in an L2-resident scratch
    (kernels/rrcab_fused.py) instead of two. With ``backend="auto"`` and several candidates that
    can run here, the result measures them per shape class (``auto.AutoEngine``).
    """
    engine = Engine(model, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs, max_graphs=max_graphs,
                    conv_kernels=conv_kernels, fuse_rrcab=fuse_rrcab, max_arenas=max_arenas, output_dtype=output_dtype)
    if backend != "auto" or engine.fallback_reason is not None or not B.measures(model.head.weight.device):
        return engine
    found = variants(model)
    if len(found) < 2:
        return engine
    from .auto import AutoEngine

    options = dict(dtype=dtype, cuda_graphs=cuda_graphs, max_graphs=max_graphs, conv_kernels=conv_kernels,
                   max_arenas=max_arenas, output_dtype=output_dtype)
    built = dict(backend=engine.backend, fuse_rrcab=fuse_rrcab)
    engines = {label: engine if kw == built else Engine(model, **options, **kw) for label, kw in found.items()}
    return AutoEngine(model, engines, dtype)
