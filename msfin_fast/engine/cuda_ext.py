"""The CUDA C++ extension ``msfin_fast._C``, behind one interface: whether it is built and sees a
GPU (:func:`built`, :func:`available`, :func:`extension_problem`, :func:`status`), what it was built
for, the kernel's weight layout (:func:`pack_block`) and the checked binding of its one operation
(:func:`rrcab_pass`). This is the only module that imports the extension; the ``cuda`` backend
(``backends/cuda.py``) is an adapter over it.

The pass has the same contract as the Triton kernels (csrc/README.md has it in full):

- activations are NHWC, contiguous ``[N, H, W, C]``, fp16 or fp32 (the packed block's dtype), on one
  CUDA device; ``sums_in`` / ``sums_out`` are fp32 ``[N, C]``;
- the kernel loads ``x = t + s·u + e1 + e2`` (``s`` from ``sums_in`` and the CA weights of u's
  producer), rounds it to the storage dtype, optionally stores it to ``x_out``, and computes
  ``u_out = conv1x1(relu(gconv(relu(gconv(x)))))`` with ``sums_out += Σ_hw u_out`` — this block's
  channel attention is left to the consumer of ``u_out``;
- it launches on torch's current stream of that device, allocates nothing and never synchronises,
  so it can be captured in a CUDA graph.

The extension is built without torch, so this module hands it raw pointers: every argument is
checked here first (types, shapes, dtypes, layout, device, alignment, aliasing), and a bad one is an
``InvalidInputError`` that names it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import resolve_dtype
from ..errors import ConfigError, DeviceError, InvalidInputError
from ..model import RRCAB
from .backends import BackendStatus, DenseCA

try:
    from .. import _C
except ImportError as exc:  # not built: no nvcc at install time, a failed build, or MSFIN_CUDA_EXT=0
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1}  # the extension's dtype argument
# 16-byte vector loads and stores of activations need 16-byte aligned tensors.
_ALIGNMENT = 16
_device_status: tuple[int, str] | None = None


def built() -> bool:
    """Whether the extension module ``msfin_fast._C`` was built and imports."""
    return _C is not None


def _status() -> tuple[int, str]:
    # Devices do not come and go within a process: ask the runtime once.
    global _device_status
    if _device_status is None:
        _device_status = tuple(_C.device_status()) if _C is not None else (0, "not built")
    return _device_status


def available() -> bool:
    """Whether the extension is built and its CUDA runtime sees at least one device."""
    return _C is not None and _status()[0] > 0


def extension_problem() -> str | None:
    """Why ``available()`` is False, as a sentence that says what to do; None when it is True."""
    if _C is None:
        return (
            f"the CUDA extension msfin_fast._C is not built ({_IMPORT_ERROR}); build it with nvcc on "
            "PATH or CUDA_HOME set, and pybind11 and ninja installed: "
            "MSFIN_CUDA_EXT=1 python setup.py build_ext --inplace (or reinstall: pip install -e .)"
        )
    count, why = _status()
    if count > 0:
        return None
    driver, runtime = _C.driver_version(), _C.runtime_version()
    if driver == 0:
        return f"the CUDA extension is built but this machine has no CUDA driver, so no GPU ({why})"
    if driver < runtime:
        return (
            f"the CUDA extension is built with CUDA runtime {_version(runtime)}, which needs a newer "
            f"driver than this one (it supports CUDA {_version(driver)}); update the driver or rebuild "
            "the extension with an nvcc no newer than the driver"
        )
    return f"the CUDA extension is built but finds no usable GPU ({why})"


def _version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def compiled_archs() -> list[str]:
    """GPU code in the extension (``sm_XX`` machine code, ``compute_XX`` PTX); [] when not built."""
    return list(_C.compiled_archs()) if _C is not None else []


def supports_capability(major: int, minor: int) -> bool:
    """Whether the extension has code a GPU of compute capability ``major.minor`` can run: machine
    code of the same major version and no newer minor, or PTX no newer than the GPU."""
    cap = 10 * major + minor
    for arch in compiled_archs():
        kind, _, number = arch.partition("_")
        value = int(number)
        if kind == "sm" and value // 10 == major and value <= cap:
            return True
        if kind == "compute" and value <= cap:
            return True
    return False


def supported_configs() -> list[tuple[int, int]]:
    """The (channels, groups) pairs the extension has kernels for, as it reports them ([] when not built)."""
    return [tuple(c) for c in _C.supported_configs()] if _C is not None else []


def _resolve_dtype(dtype) -> torch.dtype:
    try:
        dtype = resolve_dtype(dtype)
    except DeviceError:
        raise ConfigError(f"unknown dtype {dtype!r} for the CUDA backend; use 'fp16' or 'fp32'") from None
    if dtype not in _DTYPE_CODES:
        raise ConfigError(f"the CUDA backend stores activations as fp16 or fp32, not {dtype}")
    return dtype


CudaCA = DenseCA  # a block's channel attention; the pass that reads this block's ``u_out`` applies it


@dataclass(frozen=True)
class CudaBlock:
    """One RRCAB's weights in the kernel's layout, fp32 and contiguous on one device.

    ``w1`` / ``w2``: grouped 3×3 convs as ``[G, C/G ci, 3 dy, 3 dx, C/G co]`` (a thread's output
    channels are adjacent); ``w3t``: the 1×1 transposed, ``[C ci, C co]``; ``dtype``: the storage
    dtype of the activations the pass reads and writes.
    """

    channels: int
    groups: int
    dtype: torch.dtype
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w3t: torch.Tensor
    b3: torch.Tensor
    ca: CudaCA

    @property
    def device(self) -> torch.device:
        return self.w1.device


def pack_block(block: RRCAB, dtype, device) -> CudaBlock:
    """Repack ``block``'s weights for the kernel once; ``dtype`` (fp16/fp32) is the activations'."""
    if not isinstance(block, RRCAB):
        raise ConfigError(f"pack_block takes an msfin_fast.model.RRCAB, got {type(block).__name__}")
    dtype = _resolve_dtype(dtype)
    device = torch.device(device)
    conv1, conv2, conv3, ca = block.body[0], block.body[2], block.body[4], block.body[5]
    c, g = conv1.out_channels, conv1.groups
    supported = supported_configs()  # unknown without the extension: its launches then refuse to run
    if _C is not None and (c, g) not in supported:
        raise ConfigError(
            f"no CUDA kernel for an RRCAB of {c} channels in {g} groups; "
            f"the kernels cover (channels, groups) in {supported}"
        )
    cg = c // g

    def f32(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device=device, dtype=torch.float32).contiguous()

    def grouped(w: torch.Tensor) -> torch.Tensor:
        # [C out, C/G in, 3, 3] with out = g·C/G + co  →  [G, ci, dy, dx, co]
        return f32(w.detach().reshape(g, cg, cg, 3, 3).permute(0, 2, 3, 4, 1))

    packed_ca = DenseCA.of(ca, device)
    return CudaBlock(
        channels=c,
        groups=g,
        dtype=dtype,
        w1=grouped(conv1.weight),
        b1=f32(conv1.bias),
        w2=grouped(conv2.weight),
        b2=f32(conv2.bias),
        w3t=f32(conv3.weight.reshape(c, c).t()),
        b3=f32(conv3.bias),
        ca=packed_ca,
    )



def _check_tensor(name: str, x, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise InvalidInputError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if x.dtype != dtype:
        raise InvalidInputError(f"{name} has dtype {x.dtype}, expected {dtype}")
    if not x.is_contiguous():
        raise InvalidInputError(
            f"{name} is not contiguous (strides {x.stride()}); activations are NHWC [N, H, W, C] "
            "contiguous: use x.permute(0, 2, 3, 1).contiguous() on an NCHW tensor"
        )
    return x


def _span(x: torch.Tensor) -> tuple[int, int]:
    start = x.data_ptr()
    return start, start + x.numel() * x.element_size()


def _validated(packed, t, u, sums_in, ca, e1, e2, x_out, u_out, sums_out) -> CudaCA | None:
    """Every check of rrcab_pass's arguments, before any pointer is taken; returns u's CA weights."""
    if not isinstance(packed, CudaBlock):
        raise InvalidInputError(f"packed must come from pack_block, got {type(packed).__name__}")
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"t must be a torch.Tensor, got {type(t).__name__}")
    c, dtype = packed.channels, packed.dtype
    if t.dim() != 4 or t.shape[-1] != c:
        raise InvalidInputError(
            f"t has shape {tuple(t.shape)}; the block takes NHWC activations [N, H, W, {c}]"
        )
    n, h, w, _ = t.shape
    if n < 1 or h < 1 or w < 1:
        raise InvalidInputError(f"t has shape {tuple(t.shape)}: a zero-size dimension")
    if n > 65535 or h * w > 2**31 - 1:
        raise InvalidInputError(f"t has shape {tuple(t.shape)}: batch ≤ 65535 and H·W < 2^31 per launch")
    act = (n, h, w, c)
    acts = {"t": _check_tensor("t", t, act, dtype)}
    for name, x in (("u", u), ("e1", e1), ("e2", e2), ("x_out", x_out)):
        if x is not None:
            acts[name] = _check_tensor(name, x, act, dtype)
    if u_out is None:
        raise InvalidInputError("u_out is required: a preallocated [N, H, W, C] tensor")
    acts["u_out"] = _check_tensor("u_out", u_out, act, dtype)
    if sums_out is None:
        raise InvalidInputError("sums_out is required: a zeroed fp32 [N, C] tensor")
    sums = {"sums_out": _check_tensor("sums_out", sums_out, (n, c), torch.float32)}

    ca_weights = None
    if u is not None:
        if sums_in is None or ca is None:
            raise InvalidInputError("u needs sums_in (its producer's CA sums) and ca (its producer's CA weights)")
        sums["sums_in"] = _check_tensor("sums_in", sums_in, (n, c), torch.float32)
        ca_weights = ca.ca if isinstance(ca, CudaBlock) else ca
        if not isinstance(ca_weights, CudaCA):
            raise InvalidInputError(f"ca must be a CudaCA or CudaBlock, got {type(ca).__name__}")
        if ca_weights.channels != c:
            raise InvalidInputError(f"ca has {ca_weights.channels} channels, the activations {c}")
    elif sums_in is not None or ca is not None:
        raise InvalidInputError("sums_in and ca go with u; pass u too, or neither")

    for name, x in acts.items():
        if x.data_ptr() % _ALIGNMENT:
            raise InvalidInputError(f"{name} is not {_ALIGNMENT}-byte aligned (a view at an odd offset?)")

    # Blocks read the halo of their neighbours' inputs while others write outputs, and every block
    # reads sums_in while others add to sums_out: inputs and outputs must be distinct memory.
    inputs = {k: v for k, v in {**acts, **sums}.items() if k in ("t", "u", "e1", "e2", "sums_in")}
    outputs = {k: v for k, v in {**acts, **sums}.items() if k in ("x_out", "u_out", "sums_out")}
    checked = list(outputs.items())
    for i, (out_name, out) in enumerate(checked):
        lo, hi = _span(out)
        for other_name, other in list(inputs.items()) + checked[i + 1 :]:
            olo, ohi = _span(other)
            if lo < ohi and olo < hi:
                raise InvalidInputError(f"{out_name} overlaps {other_name}; outputs need memory of their own")

    device = packed.device
    for name, x in {**acts, **sums}.items():
        if x.device.type != "cuda":
            raise InvalidInputError(
                f"{name} is on {x.device}; the CUDA backend runs on CUDA tensors (move it with .cuda())"
            )
        if x.device != device:
            raise InvalidInputError(f"{name} is on {x.device}, the packed weights on {device}")
    if ca_weights is not None and ca_weights.w1.device != device:
        raise InvalidInputError(f"ca's weights are on {ca_weights.w1.device}, the block's on {device}")
    return ca_weights


def rrcab_pass(
    packed: CudaBlock,
    t: torch.Tensor,
    *,
    u: torch.Tensor | None = None,
    sums_in: torch.Tensor | None = None,
    ca: CudaCA | CudaBlock | None = None,
    e1: torch.Tensor | None = None,
    e2: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
    u_out: torch.Tensor,
    sums_out: torch.Tensor,
    check: bool = True,
) -> None:
    """Run one RRCAB pass of ``packed`` on ``t`` (see the module docstring for the contract).

    ``u`` comes with ``sums_in`` and ``ca``, the CA weights of the block that produced it (a
    ``CudaCA`` or that block's ``CudaBlock``). ``sums_out`` is accumulated into: zero it first.
    Outputs must not overlap inputs. ``check=False`` skips the argument checks (their Python cost
    is paid on every call) for a caller that has validated the same tensors before, such as a plan
    run over a preallocated arena; wrong arguments then reach the kernel as raw pointers.
    """
    if check:
        ca_weights = _validated(packed, t, u, sums_in, ca, e1, e2, x_out, u_out, sums_out)
    else:
        ca_weights = ca.ca if isinstance(ca, CudaBlock) else ca
    if _C is None or not available():
        raise DeviceError(extension_problem())

    def ptr(x) -> int:
        return 0 if x is None else x.data_ptr()

    n, h, w, c = t.shape
    dtype, device = packed.dtype, packed.device
    stream = torch.cuda.current_stream(device).cuda_stream
    _C.rrcab_pass(
        dtype_code=_DTYPE_CODES[dtype],
        N=n, H=h, W=w, C=c, G=packed.groups,
        CR=ca_weights.squeeze if ca_weights is not None else 0,
        t=ptr(t), u=ptr(u), sums_in=ptr(sums_in),
        ca_w1=ptr(ca_weights.w1 if ca_weights is not None else None),
        ca_b1=ptr(ca_weights.b1 if ca_weights is not None else None),
        ca_w2=ptr(ca_weights.w2 if ca_weights is not None else None),
        ca_b2=ptr(ca_weights.b2 if ca_weights is not None else None),
        e1=ptr(e1), e2=ptr(e2), x_out=ptr(x_out), u_out=ptr(u_out), sums_out=ptr(sums_out),
        w1=ptr(packed.w1), b1=ptr(packed.b1), w2=ptr(packed.w2), b2=ptr(packed.b2),
        w3t=ptr(packed.w3t), b3=ptr(packed.b3),
        device=device.index,
        stream=stream,
    )


def status() -> BackendStatus:
    """Whether the extension is built, for which GPU targets, and whether its runtime sees a GPU."""
    name = "CUDA C++ extension"
    if _C is None:
        return BackendStatus(name, False, extension_problem())
    configs = ", ".join(f"{c}/{g}" for c, g in supported_configs())
    built_for = (f"built for {', '.join(_C.compiled_archs())} (CUDA runtime {_version(_C.runtime_version())}, "
                 f"linked statically; channels/groups {configs})")
    if not available():
        return BackendStatus(name, False, f"{built_for}; {extension_problem()}")
    devices = []
    for i in range(_C.device_count()):
        label = f"cuda:{i}"
        if torch.cuda.is_available() and i < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(i)
            label += f" sm_{major}{minor}" + ("" if supports_capability(major, minor) else " (no code for it)")
        devices.append(label)
    return BackendStatus(name, True, f"{built_for}; devices: {', '.join(devices)}")

