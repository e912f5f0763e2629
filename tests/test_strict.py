"""A run that cannot test something must say so, and where it matters, fail.

On a developer's CPU a test whose file, module, compiler or GPU extension is missing skips. Under CI,
on any machine with CUDA, and with ``MSFIN_STRICT_TESTS=1`` (which the GPU script sets), the same
test fails with a message that names what is missing: a rare GPU run must not turn green by testing
nothing (helpers.missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from helpers import missing, require_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def laptop(monkeypatch):
    """Neither CI nor CUDA nor the strict variable."""
    monkeypatch.setattr(helpers, "IN_CI", False)
    monkeypatch.setattr(helpers, "HAS_CUDA", False)
    monkeypatch.delenv(helpers.STRICT_ENV, raising=False)


def test_missing_is_a_skip_on_a_laptop_and_a_failure_where_strict(laptop, monkeypatch):
    with pytest.raises(pytest.skip.Exception, match="the widget"):
        missing("the widget is not installed")
    monkeypatch.setenv(helpers.STRICT_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"the widget is not installed \[.*MSFIN_STRICT_TESTS=1"):
        missing("the widget is not installed")
    monkeypatch.delenv(helpers.STRICT_ENV)
    for where, reason in (("HAS_CUDA", "a machine with CUDA"), ("IN_CI", "CI")):
        monkeypatch.setattr(helpers, where, True)
        with pytest.raises(pytest.fail.Exception, match=reason):
            missing("the widget is not installed")
        monkeypatch.setattr(helpers, where, False)


def test_require_module(laptop, monkeypatch):
    assert require_module("json").dumps([1]) == "[1]"
    with pytest.raises(pytest.skip.Exception, match="'no_such_module_msfin'"):
        require_module("no_such_module_msfin")
    monkeypatch.setenv(helpers.STRICT_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="'no_such_module_msfin' is not installed"):
        require_module("no_such_module_msfin")


def test_without_nvcc_the_host_emulation_fails_by_name_where_strict(tmp_path):
    """The CUDA kernel's only CPU check, run with nvcc taken off the PATH: a skip on a laptop, a
    failure naming nvcc with MSFIN_STRICT_TESTS=1 (as under CI or on a GPU machine)."""
    nvcc = shutil.which("nvcc")
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if not (nvcc and Path(d, "nvcc").exists())]
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "CI", helpers.STRICT_ENV)}
    env.update(PATH=os.pathsep.join(path), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda_ext.py::test_kernel_source_matches_the_reference_on_the_cpu",
           "-k", "C16G4-fp32", "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts="]
    if helpers.HAS_CUDA:
        pytest.skip("this machine has CUDA: every run here is strict")
    lax = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert lax.returncode == 0 and "1 skipped" in lax.stdout and "nvcc" in lax.stdout, lax.stdout[-2000:]
    strict = subprocess.run(cmd, cwd=ROOT, env=dict(env, MSFIN_STRICT_TESTS="1"), capture_output=True, text=True,
                            timeout=300)
    assert strict.returncode != 0, strict.stdout[-2000:]
    assert "cannot be built: nvcc (for the CUDA headers)" in strict.stdout, strict.stdout[-2000:]
