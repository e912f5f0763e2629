"""What several test modules share: where things are and how a missing one is handled, stand-in
models and graphs, and a running service. Test modules import from here, never from each other.

**One skip idiom.** A test that needs a CUDA GPU is marked ``@pytest.mark.gpu`` (conftest skips it
elsewhere). A test that needs anything else that may be missing (a module, the weights, a tool)
calls :func:`require_module` or :func:`missing`: a skip on a developer's CPU, a failure under CI, on
any machine with CUDA and with ``MSFIN_STRICT_TESTS=1``. ``pytest.skip`` is left for what does not
apply on this machine (a check of the no-GPU path where there is a GPU), never for what is missing.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from msfin_fast.engine.cuda_graphs import CapturedGraph
from msfin_fast.model import MSFIN

ROOT = Path(__file__).resolve().parent.parent
SHARED_DIRS = [ROOT.parent / "shared", ROOT / "shared"]
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
HAS_CUDA = torch.cuda.is_available()
# Where something a test needs may not be missing: CI, any machine with CUDA, and runs that ask for
# it (the GPU scripts set MSFIN_STRICT_TESTS=1, so a GPU run can never turn green by skipping).
STRICT_ENV = "MSFIN_STRICT_TESTS"


def strict() -> bool:
    return IN_CI or HAS_CUDA or os.environ.get(STRICT_ENV, "") == "1"


def missing(message: str) -> None:
    """A test cannot run because ``message`` is missing: a skip on a developer's CPU, a failure that
    names what is missing wherever :func:`strict` holds. Works at module level too."""
    if strict():
        why = "CI" if IN_CI else "a machine with CUDA" if HAS_CUDA else f"{STRICT_ENV}=1"
        pytest.fail(f"{message} [missing is a failure here: {why}]", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_module(name: str):
    """``pytest.importorskip`` that fails where :func:`strict` holds."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"the module {name!r} is not installed ({exc})")


# ---------------------------------------------------------------------------------------------
# Stand-ins


def random_model(preset: str, seed: int = 0) -> MSFIN:
    """Seeded random weights, with MeanShifts that are not identities (as trained ones are not):
    the head and tail kernels fold their 3×3 matrices, and an identity would hide a fold that drops one."""
    torch.manual_seed(seed)
    model = MSFIN(preset).eval()
    with torch.no_grad():
        for shift in (model.sub_mean, model.add_mean):
            shift.weight.add_(torch.randn_like(shift.weight) * 0.03)
            shift.bias.add_(torch.randn_like(shift.bias) * 3)
    return model


class EagerGraph(CapturedGraph):
    """A :class:`CapturedGraph` that runs on the CPU: the warm-up and the capture call ``fn``
    (under the real ``CapturedGraph.__init__``: static inputs, ``held``), a replay calls it again on
    the static inputs and copies the result into the static outputs, as a real replay overwrites them."""

    def _warm_up(self, fn, warmup, stream):
        for _ in range(warmup):
            fn(*self.inputs)

    def _record(self, fn, stream):
        outputs = fn(*self.inputs)
        inputs = self.inputs

        class Replay:
            @staticmethod
            def replay():
                with torch.inference_mode():  # a graph writes its outputs whatever mode they were made in
                    again = fn(*inputs)
                    for old, new in zip(_flat(outputs), _flat(again)):
                        old.copy_(new)

        return Replay(), outputs


def _flat(outputs):
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def close_enough(a, b):
    """Batched fp32 convs may round a pixel the other way: at most 1 apart, and rarely."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 1e-3


class Gate(nn.Module):
    """×4 nearest that blocks until released, so a test can hold the worker still."""

    scale = 4

    def __init__(self):
        super().__init__()
        self.entered, self.release, self.batches = threading.Event(), threading.Event(), []

    def forward(self, x):
        self.batches.append(x.shape[0])
        self.entered.set()
        assert self.release.wait(30)
        if (x > 250).all():
            raise RuntimeError("white images are refused by this test model")
        return F.interpolate(x, scale_factor=4, mode="nearest")


class HalfBroken(nn.Module):
    """×4 nearest that makes NaN of images whose first pixel is 7 (as an fp16 overflow would)."""

    scale = 4

    def forward(self, x):
        y = F.interpolate(x, scale_factor=4, mode="nearest")
        return torch.where(x[:, :1, :1, :1] == 7, torch.full_like(y, float("nan")), y)


# ---------------------------------------------------------------------------------------------
# A running service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def request(port, path, data=None, timeout=60):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def wait_until_serving(proc, port, seconds=60):
    """Wait for a ``msfin-fast serve`` process to answer /healthz; fail with its output if it exits."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if request(port, "/healthz", timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, f"msfin-fast serve did not come up in {seconds} s"
        time.sleep(0.1)


class Running:
    """A server on a free port in a thread, stopped on exit."""

    def __init__(self, upscaler, limits=None):
        from msfin_fast.server import Limits, make_server

        self.upscaler, self.port = upscaler, free_port()
        limits = limits if limits is not None else Limits()
        self.server = make_server(upscaler, "127.0.0.1", self.port, limits)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.upscaler.close()
