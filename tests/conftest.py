"""Shared fixtures: where the released weights and the benchmark images are.

Weights come from ``MSFIN_WEIGHTS_DIR``, else ``../shared/weights``, else ``shared/weights`` inside the
checkout (the git-ignored copy a GPU machine gets); images likewise from ``MSFIN_DATA_DIR`` or
``data``. Without them the tests that need them skip on a developer's CPU and fail under CI, on
any machine with a GPU and with ``MSFIN_STRICT_TESTS=1`` (``helpers.missing``): a GPU run is too rare to
lose tests to a missing folder, a module or a tool.
Tests never touch the network or the user's torch hub cache. Every test runs with TF32 off, so
an fp32 reference on a GPU is true fp32 (see ``msfin_fast.devices.true_fp32``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. The flag is read
# when a kernel is decorated, so it has to be set before anything imports msfin_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import HAS_CUDA, SHARED_DIRS, missing  # noqa: E402  (after the flag)


def find_resource(env: str, sub: str, needed: list[str]) -> tuple[Path | None, str]:
    """(folder holding every name in ``needed``, "") or (None, what is missing where)."""
    bases = [Path(os.environ[env])] if os.environ.get(env) else [d / sub for d in SHARED_DIRS]
    for base in bases:
        if all((base / name).exists() for name in needed):
            return base, ""
    return None, f"{', '.join(needed)} not found in {' or '.join(map(str, bases))} (set {env})"


def _resource(env: str, sub: str, needed: list[str]) -> Path:
    base, message = find_resource(env, sub, needed)
    if base is None:
        missing(message)
    return base


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


WEIGHT_FILES = ["MSFIN_X4.pt", "MSFIN-S_X4.pt"]
# What every test sees as MSFIN_WEIGHTS_DIR: looked up once, not per test.
WEIGHTS_DIR = Path(os.environ.get("MSFIN_WEIGHTS_DIR")
                   or find_resource("MSFIN_WEIGHTS_DIR", "weights", WEIGHT_FILES)[0]
                   or SHARED_DIRS[0] / "weights")


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    return _resource("MSFIN_WEIGHTS_DIR", "weights", WEIGHT_FILES)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _resource("MSFIN_DATA_DIR", "data", ["Set5", "Set14"])


@pytest.fixture(scope="session", autouse=True)
def _true_fp32():
    from msfin_fast.devices import true_fp32

    with true_fp32():
        yield


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No downloads, a private hub cache and choice cache, and MSFIN_WEIGHTS_DIR as the run found it."""
    hub = tmp_path_factory.mktemp("hub")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("MSFIN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("MSFIN_OFFLINE", "1")
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(WEIGHTS_DIR))


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


def preset_model(preset: str, device: str = "cpu"):
    """The released weights of ``preset`` where they are found, else seeded random weights."""
    from msfin_fast.model import MSFIN
    from msfin_fast.weights import REGISTRY, load_pretrained

    base, _ = find_resource("MSFIN_WEIGHTS_DIR", "weights", [REGISTRY[preset].filename])
    if base is not None:
        return load_pretrained(preset, device=device, weights=base / REGISTRY[preset].filename)
    torch.manual_seed(0)
    return MSFIN(preset).to(device).eval()


@pytest.fixture(scope="session")
def model_for():
    """``model_for(preset, device)``: :func:`preset_model`, cached. For tests that compare two
    implementations of the same network, which hold for any weights: they run even where the files
    are missing (the files' own tests fail there)."""
    cache = {}

    def get(preset: str, device: str = "cpu"):
        if (preset, device) not in cache:
            cache[preset, device] = preset_model(preset, device)
        return cache[preset, device]

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


@pytest.fixture
def locked(tmp_path):
    """``locked(name)``: a file ``b"old"`` in tmp_path made immutable (chattr +i, as root), unlocked
    after the test; the test is skipped where the flag cannot be set."""
    import shutil
    import subprocess

    made = []

    def make(name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(b"old")
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                            capture_output=True).returncode:
            pytest.skip("chattr +i needs root and a file system that has the flag")
        made.append(path)
        return path
    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
