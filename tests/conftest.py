"""Shared fixtures: where the released weights and the benchmark images are.

Weights come from ``MSFIN_WEIGHTS_DIR`` or ``../shared/weights``; images from ``MSFIN_DATA_DIR`` or
``../shared/data``. Without them the tests that need them skip locally and fail under CI.
Tests never touch the network or the user's torch hub cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
HAS_CUDA = torch.cuda.is_available()

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. The flag is read
# when a kernel is decorated, so it has to be set before any test imports msfin_fast.kernels.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _resource(env: str, default: Path, needed: list[str]) -> Path:
    base = Path(os.environ.get(env) or default)
    missing = [name for name in needed if not (base / name).exists()]
    if missing:
        message = f"{', '.join(missing)} not found in {base} (set {env})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return base


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    return _resource("MSFIN_WEIGHTS_DIR", SHARED / "weights", ["MSFIN_X4.pt", "MSFIN-S_X4.pt"])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _resource("MSFIN_DATA_DIR", SHARED / "data", ["Set5", "Set14"])


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No downloads, a private hub cache and choice cache, and MSFIN_WEIGHTS_DIR as the run found it."""
    hub = tmp_path_factory.mktemp("hub")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("MSFIN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("MSFIN_OFFLINE", "1")
    weights = os.environ.get("MSFIN_WEIGHTS_DIR") or str(SHARED / "weights")
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", weights)


@pytest.fixture(scope="session")
def pretrained(weights_dir):
    """Cached pretrained fp32 CPU models by preset name."""
    from msfin_fast.weights import REGISTRY, load_pretrained, verify

    cache = {}

    def get(name: str):
        if name not in cache:
            path = weights_dir / REGISTRY[name].filename
            verify(name, path)
            cache[name] = load_pretrained(name, weights=path)
        return cache[name]

    return get


@pytest.fixture
def one_line_error(capsys):
    """Checks that the CLI printed exactly one ``msfin-fast: error:`` line, no traceback, holding
    every given fragment."""
    def check(*fragments):
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("msfin-fast: error:")]
        assert len(errors) == 1, err
        assert "Traceback" not in "\n".join(err)
        for fragment in fragments:
            assert fragment in errors[0], errors[0]
    return check


@pytest.fixture(scope="module")
def one_torch_thread():
    """For files of thousands of tiny ops: with two intra-op threads on cores that other processes
    share, OpenMP workers spin-wait at every op and such a file takes 10–20× longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
