"""The installed package: layout, entry point, and the README's main command."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_kernels_ship_inside_the_package(tmp_path):
    # Run outside the checkout so only installed modules are visible.
    out = _run(
        "import importlib.util, msfin_fast.kernels as k; "
        "print(k.__name__, importlib.util.find_spec('kernels') is None)",
        tmp_path,
    )
    assert out.split() == ["msfin_fast.kernels", "True"]


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("msfin-fast") == "msfin_fast.cli:main"


def test_readme_main_command(tmp_path, weights_dir):
    # The README's first command, run as a user would: sample picture in, upscaled picture out.
    env = dict(os.environ, MSFIN_WEIGHTS_DIR=str(weights_dir))
    cli = [sys.executable, "-m", "msfin_fast"]
    subprocess.run(cli + ["sample", "lr.png"], cwd=tmp_path, env=env, check=True, capture_output=True)
    proc = subprocess.run(cli + ["upscale", "-i", "lr.png", "-o", "sr.png"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "lr.png").size == (128, 128)
    assert Image.open(tmp_path / "sr.png").size == (512, 512)
    readme = (ROOT / "README.md").read_text()
    assert "msfin-fast sample lr.png && msfin-fast upscale -i lr.png -o sr.png" in readme


def _checkout_copy(tmp_path: Path) -> Path:
    import shutil

    src = tmp_path / "checkout"
    for name in ("msfin_fast", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__", "build"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    return src


def test_an_uninstalled_checkout_imports_its_kernels(tmp_path):
    """kernels/ installs as msfin_fast.kernels; straight from a checkout (no install, or one that
    failed) the package must import all the same."""
    src = _checkout_copy(tmp_path)
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        "import msfin_fast, msfin_fast.kernels.rrcab as r\n"
        "print(msfin_fast.__file__); print(r.__file__)\n"
    )
    package, kernel = _run(code, tmp_path).split()
    assert package == str(src / "msfin_fast" / "__init__.py")
    assert kernel == str(src / "kernels" / "rrcab.py")


def _fake_torch(folder: Path, version: str, cuda: str | None) -> Path:
    """A folder to put on PYTHONPATH holding a torch package with only its version.py, which is
    all setup.py reads of the environment's torch."""
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "__init__.py").write_text("")
    (folder / "torch" / "version.py").write_text(f"__version__ = {version!r}\ncuda = {cuda!r}\n")
    return folder


def _planted_nvcc(tmp_path: Path) -> Path:
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'nvcc: planted failure' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    return nvcc


def _setup_env(nvcc: Path, torch_folder: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSFIN_") and k != "PYTHONPATH"}
    env.update(CUDA_HOME=str(nvcc.parent.parent), MSFIN_CUDA_ARCHS="90", MSFIN_CPU_EXT="0",
               MSFIN_SETUP_NO_TTY="1")
    if torch_folder is not None:
        env["PYTHONPATH"] = str(torch_folder)
    return env


def test_a_cpu_torch_skips_the_cuda_build_by_default(tmp_path):
    """nvcc present but the environment's torch is a CPU build: the default install builds no CUDA
    extension (minutes of nvcc for kernels that cannot get a CUDA tensor) and says so and why; a
    CUDA torch builds it; MSFIN_CUDA_EXT=1 builds it whatever torch is."""
    src = _checkout_copy(tmp_path)
    nvcc = _planted_nvcc(tmp_path)
    build = [sys.executable, "setup.py", "build_ext", "--inplace"]
    cpu = _fake_torch(tmp_path / "cpu_torch", "2.13.0+cpu", None)
    skipped = subprocess.run(build, cwd=src, env=_setup_env(nvcc, cpu), capture_output=True, text=True)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipping the CUDA extension msfin_fast._C: torch 2.13.0+cpu is a CPU-only build" in skipped.stderr
    attempted = ("planted failure", "building msfin_fast._C needs pybind11")  # nvcc ran, or it would have
    assert not any(a in skipped.stderr + skipped.stdout for a in attempted)  # no build was tried
    cuda = _fake_torch(tmp_path / "cuda_torch", "2.13.0+cu128", "12.8")
    built = subprocess.run(build, cwd=src, env=_setup_env(nvcc, cuda), capture_output=True, text=True)
    assert "building the CUDA extension msfin_fast._C" in built.stderr, built.stderr[-3000:]
    assert "torch 2.13.0+cu128 is a CUDA 12.8 build" in built.stderr
    assert any(a in built.stderr + built.stdout for a in attempted)  # the build was tried
    forced = subprocess.run(build, cwd=src, env=dict(_setup_env(nvcc, cpu), MSFIN_CUDA_EXT="1"),
                            capture_output=True, text=True)
    assert forced.returncode != 0 and "MSFIN_CUDA_EXT=1: building the CUDA extension" in forced.stderr


def test_the_cuda_build_decision_without_torch_follows_the_driver():
    wanted = _setup_module()["cuda_ext_wanted"]
    assert wanted(None, True) == (True, "no torch installed yet, and an NVIDIA driver is present")
    assert wanted(None, False)[0] is False
    assert wanted({"version": "2.11.0", "cuda": "13.0"}, False)[0] is True
    assert wanted({"version": "2.13.0+cpu", "cuda": None}, True)[0] is False


def test_spandrel_extra_pins_the_torchvision_of_the_installed_torch():
    setup = _setup_module()
    match = setup["matching_torchvision"]
    assert match("2.13.0+cpu") == "torchvision>=0.28,<0.29"
    assert match("2.14.1") == "torchvision>=0.29,<0.30"
    assert match("2.1.2") == "torchvision>=0.16,<0.17"
    assert match(None) is None and match("garbage") is None
    import torch

    assert setup["target_torch"]()["version"] == torch.__version__  # the probe reads this environment's
    assert setup["spandrel_pins"]() == [match(torch.__version__)]


def test_a_failed_cuda_build_leaves_an_install_without_the_extension(tmp_path):
    """MSFIN_CUDA_EXT=auto (the default) beside a CUDA torch: a build that fails is reported and
    skipped; =1: an error."""
    src = _checkout_copy(tmp_path)
    (src / "csrc" / "bindings.cpp").unlink()  # the host compiler's part would only add time
    nvcc = _planted_nvcc(tmp_path)
    env = _setup_env(nvcc, _fake_torch(tmp_path / "cuda_torch", "2.13.0+cu128", "12.8"))
    build = [sys.executable, "setup.py", "build_ext", "--inplace"]
    auto = subprocess.run(build, cwd=src, env=env, capture_output=True, text=True)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "installing without it" in auto.stderr
    assert not list((src / "msfin_fast").glob("_C*.so"))
    required = subprocess.run(build, cwd=src, env=dict(env, MSFIN_CUDA_EXT="1"), capture_output=True, text=True)
    assert required.returncode != 0 and "msfin_fast._C" in required.stderr
    bad = subprocess.run(build, cwd=src, env=dict(env, MSFIN_CUDA_EXT="maybe"), capture_output=True, text=True)
    assert bad.returncode != 0 and "MSFIN_CUDA_EXT must be auto, 0 or 1" in bad.stderr


def _imports(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against the package."""
    import ast

    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_layering_only_the_triton_backend_imports_kernels_and_only_cuda_ext_the_extension():
    """The engine's layers know no kernel: kernels/ reaches the package through backends/triton.py
    alone, the CUDA extension through engine/cuda_ext.py alone; weights never build engines and
    training resolves devices without the user API."""
    files = {p.relative_to(ROOT).as_posix(): _imports(p) for p in (ROOT / "msfin_fast").rglob("*.py")}
    assert len(files) > 20
    kernels = {f for f, mods in files.items() if any(m.startswith("msfin_fast.kernels") for m in mods)}
    extension = {f for f, mods in files.items() if "msfin_fast._C" in mods}
    assert kernels == {"msfin_fast/engine/backends/triton.py"}, kernels
    assert extension == {"msfin_fast/engine/cuda_ext.py"}, extension
    assert not any(m.startswith("msfin_fast.engine") for m in files["msfin_fast/weights.py"])
    training = [f for f in files if f.startswith("msfin_fast/train/")]
    assert len(training) >= 4
    assert not any(m.startswith("msfin_fast.upscaler") for f in training for m in files[f])


def _setup_module():
    """setup.py's functions, without running setup() (it runs only as __main__, as pip runs it)."""
    import runpy

    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")


def test_every_package_of_the_tree_is_installed():
    """The package list comes from the tree: a subpackage added later (engine/backends once was
    left out of a hand-written list, and `pip install .` gave a package that could not import)."""
    listed = set(_setup_module()["packages"]())
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "msfin_fast").rglob("__init__.py")}
    tree |= {"msfin_fast." + ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kernels").rglob("__init__.py")}
    assert "msfin_fast.engine.backends" in tree and "msfin_fast.kernels" in tree
    assert listed == tree


def test_nvcc_off_path_is_found_in_the_toolkit_folder(tmp_path, monkeypatch):
    setup = _setup_module()
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    setup["find_nvcc"].__globals__["DEFAULT_NVCC"] = str(nvcc)
    assert setup["find_nvcc"]() == str(nvcc)
    setup["find_nvcc"].__globals__["DEFAULT_NVCC"] = str(tmp_path / "none" / "nvcc")
    assert setup["find_nvcc"]() is None
