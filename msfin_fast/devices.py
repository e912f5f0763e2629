"""Devices and dtypes, resolved in one place for the API, the CLI, the engine and training."""

from __future__ import annotations

import contextlib

import torch

from .errors import DeviceError

#: Every precision name the package accepts, and the dtype it means.
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
#: The dtypes an engine may be asked for: fp32 and fp16 everywhere, bf16 on the CPU (the native
#: kernels store what is added to the residual stream in bf16; backends list theirs in ``dtypes``).
ENGINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 → "fp16" (the short name the CLI and the reports use)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """'auto'/None → CUDA when present, else CPU; 'cpu', 'cuda', 'cuda:N' are checked."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise DeviceError(f"device type {device.type!r} is not supported; use cpu or cuda")
    return device


def resolve_dtype(spec: str | torch.dtype) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise DeviceError(f"dtype {spec} is not supported; use float32, float16 or bfloat16")
        return spec
    try:
        return DTYPES[str(spec).lower()]
    except KeyError:
        raise DeviceError(f"unknown precision {spec!r}; use fp32, fp16 or bf16") from None


@contextlib.contextmanager
def true_fp32():
    """Inside the block, fp32 convolutions and matrix products are computed in fp32.

    PyTorch lets cuDNN use TF32 for fp32 convolutions by default on Ampere and later (10-bit
    mantissa products): MSFIN's fp32 output then drifts by up to ~2 grey levels, more than the
    engine's own fp32 error. A reference that other implementations are checked against runs in here.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


