"""What can run the network on this machine, reported honestly for ``msfin-fast info``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass
class BackendStatus:
    name: str
    available: bool
    detail: str


def cuda_devices() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]


def available_backends() -> list[BackendStatus]:
    gpus = cuda_devices()
    statuses = [
        BackendStatus(
            "reference (PyTorch)",
            True,
            f"torch {torch.__version__} on cpu" + (", " + ", ".join(gpus) if gpus else ""),
        )
    ]
    if importlib.util.find_spec("triton") is None:
        statuses.append(BackendStatus("triton kernels", False, "triton is not installed"))
    else:
        import triton

        from .engine import triton_unavailable_reason

        device = torch.device("cuda" if gpus else "cpu")
        reason = triton_unavailable_reason(device)
        statuses.append(
            BackendStatus(
                "triton kernels (msfin_fast.optimize)",
                reason is None,
                f"triton {triton.__version__}; " + (f"runs on {device}" if reason is None else reason),
            )
        )
    from .engine.choice import cache_path, load_choices

    choices = load_choices()
    statuses.append(
        BackendStatus(
            "auto choices",
            bool(choices),
            (f"{len(choices)} measured in {cache_path()}: "
             + "; ".join(f"{k.split(' | ')[-2]} on {k.split(' | ')[0]} → {v.get('backend')}" for k, v in choices.items()))
            if choices else f"none measured yet ({cache_path()}); backend='auto' measures on first use per GPU and shape class",
        )
    )
    statuses.append(
        BackendStatus("CUDA C++ extension", False, "not built (this version has no csrc sources yet)")
    )
    return statuses
