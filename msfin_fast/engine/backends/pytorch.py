"""Backends that run the whole network as one PyTorch module (a plan of one ``Network`` launch).

``reference``  the model itself, in the engine's dtype: what ``auto`` falls back to where no
               kernel backend can run, and a baseline.
``cpu``        the fastest configuration measured on a CPU (benchmarks/NOTES.md): fp32 weights and
               activations in ``channels_last``, so oneDNN runs its NHWC convolutions without
               reordering each layer's input. fp16 and bf16 convolutions are slower on a CPU and no
               more accurate, so it computes in fp32 whatever the engine's dtype, and its output is
               cast to that dtype.
"""

from __future__ import annotations

import copy

import torch

from ...model import MSFIN
from . import BackendStatus


class ReferenceBackend:
    name = "reference"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    fused_max_channels = 0
    whole_network = True

    def __init__(self, fuse_rrcab: bool = False):
        pass

    @classmethod
    def status(cls) -> BackendStatus:
        gpus = [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        return BackendStatus("reference (PyTorch)", True, f"torch {torch.__version__} on cpu" + "".join(", " + g for g in gpus))

    def unavailable_reason(self, model) -> str | None:
        return None

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def pack(self, model: MSFIN, plan, dtype: torch.dtype) -> dict:
        with torch.no_grad():
            return {"network": copy.deepcopy(model).to(dtype=self.compute_dtype(dtype)).eval()}

    def network(self, x: torch.Tensor, module: MSFIN) -> torch.Tensor:
        return module(x.to(module.head.weight.dtype), check_finite=False)


class CpuBackend(ReferenceBackend):
    name = "cpu"

    @classmethod
    def status(cls) -> BackendStatus:
        return BackendStatus("cpu (PyTorch, fp32 channels-last)", True,
                             "what backend='auto' runs on a CPU where the native kernels cannot")

    def unavailable_reason(self, model) -> str | None:
        device = model.head.weight.device
        if device.type != "cpu":
            return f"the cpu backend runs on the CPU (the model is on {device})"
        return None

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def pack(self, model: MSFIN, plan, dtype: torch.dtype) -> dict:
        packed = super().pack(model, plan, dtype)
        packed["network"] = packed["network"].to(memory_format=torch.channels_last)
        return packed

    def network(self, x: torch.Tensor, module: MSFIN) -> torch.Tensor:
        x = x.to(torch.float32).contiguous(memory_format=torch.channels_last)
        return module(x, check_finite=False)


BACKENDS = {"reference": ReferenceBackend, "cpu": CpuBackend}
