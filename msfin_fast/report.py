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


def native_status() -> BackendStatus:
    """The C++ CPU kernels: built or not, and the instruction set they run with here."""
    from .engine.backends import native

    name = "native (C++ CPU kernels, msfin_fast._cpu)"
    if not native.available():
        return BackendStatus(name, False, native.not_built_reason())
    others = [i for i in native._cpu.isas() if i != native.isa()]
    return BackendStatus(name, True, f"runs with {native.isa()}" + (f" (also built: {', '.join(others)})" if others else "")
                         + f", {torch.get_num_threads()} threads, fp32 (--bf16: the addends stored in bf16); "
                         "the default on a CPU (backend='auto')")


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

        from .engine.backends.triton import unavailable_reason

        device = torch.device("cuda" if gpus else "cpu")
        reason = unavailable_reason(device)
        statuses.append(
            BackendStatus(
                "triton kernels (msfin_fast.optimize)",
                reason is None,
                f"triton {triton.__version__}; " + (f"runs on {device}" if reason is None else reason),
            )
        )
    statuses.append(native_status())
    statuses.append(BackendStatus("cpu (PyTorch, fp32 channels-last)", True,
                                  "what backend='auto' runs on a CPU where the native kernels cannot"))
    from .engine.auto import cache_path, load_choices

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
    statuses.append(cuda_extension_status())
    return statuses


def cuda_extension_status() -> BackendStatus:
    """Whether msfin_fast._C is built, for which GPU targets, and whether its runtime sees a GPU."""
    from .engine.backends import cuda as cuda_backend

    name = "CUDA C++ extension"
    if not cuda_backend.built():
        return BackendStatus(name, False, cuda_backend.unavailable_reason())
    ext = cuda_backend._C
    configs = ", ".join(f"{c}/{g}" for c, g in cuda_backend.supported_configs())
    built = (
        f"built for {', '.join(ext.compiled_archs())} "
        f"(CUDA runtime {cuda_backend._version(ext.runtime_version())}, linked statically; "
        f"channels/groups {configs})"
    )
    if not cuda_backend.available():
        return BackendStatus(name, False, f"{built}; {cuda_backend.unavailable_reason()}")
    devices = []
    for i in range(ext.device_count()):
        label = f"cuda:{i}"
        if torch.cuda.is_available() and i < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(i)
            runs = cuda_backend.supports_capability(major, minor)
            label += f" sm_{major}{minor}" + ("" if runs else " (no code for it)")
        devices.append(label)
    return BackendStatus(name, True, f"{built}; devices: {', '.join(devices)}")
