"""Build and install msfin_fast.

The top-level ``kernels/`` folder (Triton) installs as ``msfin_fast.kernels``. The CUDA C++ sources
in ``csrc/`` build into ``msfin_fast._C`` with nvcc, the host compiler and ninja — pybind11 for the
binding, the CUDA runtime linked statically — so no CUDA build of torch is needed, neither to build
nor to import it.

``MSFIN_CUDA_EXT`` says what the install does with the extension:
  ``auto`` (default)  build it only where it can be used: nvcc is found (``CUDA_HOME``/``CUDA_PATH``,
                      else ``PATH``) *and* the environment's torch is a CUDA build (or, with no
                      torch installed yet, an NVIDIA driver is present). A CPU torch, or no nvcc,
                      skips it — the build takes minutes and its kernels need CUDA tensors. A
                      failed build is reported and the package installs without it (its CUDA
                      backend then says it is not built);
  ``0``               skip it (``MSFIN_NO_CUDA_EXT=1`` means the same);
  ``1``               it must build: no nvcc, or a failed build, fails the command.
What is built and why is printed; pip shows a build's output only with ``-v``, so the same lines
also go to the terminal when there is one.
Built as a separate step after a Python-only install:

    MSFIN_CUDA_EXT=0 pip install --no-build-isolation -e .
    MSFIN_CUDA_EXT=1 MSFIN_CUDA_ARCHS=90 python setup.py build_ext --inplace

``MSFIN_CUDA_ARCHS`` (default ``80;86;89;90``) picks the GPU targets: machine code for each, plus
PTX of the newest for GPUs after it; nvcc compiles the targets of a file in parallel (``--threads 0``).

The CPU kernels in ``csrc/cpu/`` build into ``msfin_fast._cpu`` with the host compiler, pybind11 and
ninja alone (no nvcc, no torch headers): ``kernels.cpp`` is compiled once per instruction set
(AVX-512, AVX2+FMA and a portable build, only the portable one off x86-64) and the module picks one
at run time. ``MSFIN_CPU_EXT`` works as ``MSFIN_CUDA_EXT`` (``auto``: build it, report a failure and
install without it; ``0``: skip; ``1``: it must build).
"""

import glob
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
from functools import lru_cache

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "80;86;89;90"
DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"


def note(message):
    """To stderr, and to the terminal when stderr is not one: pip captures a build's output and
    shows it only with ``-v``, and a user waiting minutes on a build should know what it is."""
    line = f"msfin_fast setup: {message}"
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty() or os.environ.get("MSFIN_SETUP_NO_TTY") == "1":
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass  # no terminal (CI, a pipe): stderr is all there is


#: Run in a fresh interpreter so that the *target* environment's torch is seen, not the isolated
#: build environment's (pip builds with PYTHONPATH set to a folder whose sitecustomize hides the
#: environment's packages; that entry is dropped). Reads torch/version.py without importing torch.
_TORCH_PROBE = """
import importlib.util, json, os
spec = importlib.util.find_spec("torch")
if spec is None or not spec.submodule_search_locations:
    print(json.dumps(None))
else:
    names = {}
    with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")) as f:
        exec(f.read(), names)
    print(json.dumps({"version": names.get("__version__"), "cuda": names.get("cuda")}))
"""


@lru_cache(maxsize=None)
def target_torch():
    """``{"version": "2.13.0+cpu", "cuda": None}`` for the torch the package installs beside, or
    None where there is none yet (or it cannot be read)."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and not os.path.exists(os.path.join(p, "sitecustomize.py"))]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    env.pop("PYTHONNOUSERSITE", None)
    try:
        proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE], env=env, capture_output=True,
                              text=True, timeout=60)
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def nvidia_driver():
    """An NVIDIA kernel driver on this machine (the CUDA extension's kernels could run here)."""
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def matching_torchvision(torch_version):
    """The torchvision release series built for a torch release: 2.N pairs with 0.(N+15) (2.1 ↔
    0.16 … 2.13 ↔ 0.28, 2.14 ↔ 0.29). Pinning it keeps pip from replacing the user's torch with the
    newest one when an extra (spandrel) needs torchvision. None for a version it cannot read."""
    try:
        major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    except (AttributeError, ValueError):
        return None
    if major != 2:
        return None
    return f"torchvision>=0.{minor + 15},<0.{minor + 16}"


def version():
    with open(os.path.join(ROOT, "msfin_fast", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in msfin_fast/__init__.py")


def find_nvcc():
    """nvcc from ``CUDA_HOME``/``CUDA_PATH``, else PATH, else the toolkit's usual place (CUDA images
    often leave ``/usr/local/cuda/bin`` off PATH)."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home:
            candidate = os.path.join(home, "bin", "nvcc")
            if os.access(candidate, os.X_OK):
                return candidate
            note(f"{env}={home} has no bin/nvcc; looking on PATH")
    found = shutil.which("nvcc")
    if found is None and os.access(DEFAULT_NVCC, os.X_OK):
        note(f"nvcc is not on PATH; using {DEFAULT_NVCC}")
        found = DEFAULT_NVCC
    return found


def packages():
    """Every package of the tree: msfin_fast and its subpackages, and kernels/ (with any
    subpackages) installed as msfin_fast.kernels."""
    found = find_packages(ROOT, include=["msfin_fast", "msfin_fast.*"])
    found += ["msfin_fast." + p for p in find_packages(ROOT, include=["kernels", "kernels.*"])]
    return sorted(found)


def ext_mode(variable):
    mode = os.environ.get(variable, "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"{variable} must be auto, 0 or 1, got {mode!r}")
    return mode


def cuda_ext_mode():
    if os.environ.get("MSFIN_NO_CUDA_EXT") == "1":
        return "0"
    return ext_mode("MSFIN_CUDA_EXT")


#: instruction set → compiler flags for csrc/cpu/kernels.cpp (x86-64; elsewhere only "portable").
CPU_ISAS = {
    "avx512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "portable": [],
}


def cpu_isas():
    machine = platform.machine().lower()
    return list(CPU_ISAS) if machine in ("x86_64", "amd64") else ["portable"]


def cuda_archs():
    archs = [a.strip() for a in os.environ.get("MSFIN_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"MSFIN_CUDA_ARCHS must list compute capabilities like '80;90', got {archs!r}")
    return sorted(set(archs), key=int)


class CudaExtension(Extension):
    """An extension whose ``.cu`` sources go through nvcc; built by ``NinjaBuildExt``. Optional unless
    ``MSFIN_CUDA_EXT=1``: setuptools then reports a failed build and installs the rest."""


class CpuExtension(Extension):
    """The CPU kernels (csrc/cpu/): the host compiler only, ``kernels.cpp`` once per instruction set."""


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for csrc/ and runs ninja: nvcc for .cu, the host compiler for .cpp, and
    nvcc as the linker driver with the static CUDA runtime (the module then loads without a GPU or
    driver, and tells Python so when asked)."""

    def build_extension(self, ext):
        if isinstance(ext, CpuExtension):
            return self.build_cpu(ext)
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        try:
            import pybind11
        except ImportError:
            self._fail(ext, "building msfin_fast._C needs pybind11 and ninja: pip install pybind11 ninja "
                            "(or set MSFIN_CUDA_EXT=0 to install without the CUDA extension)")
        ninja = self._ninja(ext)
        nvcc = find_nvcc()
        archs = cuda_archs()
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "msfin_fast_C"))
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)

        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        listed = ";".join([f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"])
        defines = [f'-DMSFIN_VERSION="{version()}"', f'-DMSFIN_CUDA_ARCHS="{listed}"']
        includes = [f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        nvcc_flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                      "-lineinfo", "--threads", "0", f"-I{CSRC}"] + gencode
        cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
        cxx_flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden"] + defines + includes

        rules = [
            "ninja_required_version = 1.3",
            f"nvcc = {shlex.quote(nvcc)}",
            f"cxx = {cxx}",
            f"nvcc_flags = {' '.join(shlex.quote(f) for f in nvcc_flags)}",
            f"cxx_flags = {' '.join(shlex.quote(f) for f in cxx_flags)}",
            "rule nvcc",
            "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule cxx",
            "  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
            "rule link",
            "  command = $nvcc -shared -cudart=static -Xcompiler -fPIC $in -o $out -ldl -lrt -lpthread",
            "  description = link $out",
        ]
        objects = []
        for source in ext.sources:
            path = os.path.join(ROOT, source)
            obj = os.path.join(build_dir, os.path.basename(source) + ".o")
            rule = "nvcc" if source.endswith(".cu") else "cxx"
            rules.append(f"build {self._ninja_path(obj)}: {rule} {self._ninja_path(path)}")
            objects.append(self._ninja_path(obj))
        rules.append(f"build {self._ninja_path(out)}: link {' '.join(objects)}")
        rules.append(f"default {self._ninja_path(out)}")
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(rules) + "\n")

        note(f"building msfin_fast._C with {nvcc} for {listed} (ninja in {build_dir})")
        command = [ninja, "-C", build_dir]
        if isinstance(self.parallel, int) and not isinstance(self.parallel, bool) and self.parallel > 0:
            command += ["-j", str(self.parallel)]
        try:
            subprocess.run(command, check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            self._fail(ext, f"building msfin_fast._C failed ({exc}); MSFIN_CUDA_EXT=1 python setup.py "
                            "build_ext --inplace builds it on its own and shows why")

    def build_cpu(self, ext):
        try:
            import pybind11
        except ImportError:
            self._fail(ext, "building msfin_fast._cpu needs pybind11 and ninja: pip install pybind11 ninja "
                            "(or set MSFIN_CPU_EXT=0 to install without the CPU kernels)")
        ninja = self._ninja(ext)
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "msfin_fast_cpu"))
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
        cpu = os.path.join(CSRC, "cpu")
        isas = cpu_isas()
        common = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast", "-Wno-psabi",
                  f"-I{cpu}"]
        have = [f"-DMSFIN_HAVE_{isa.upper()}" for isa in isas if isa != "portable"]
        rules = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            "rule cxx",
            "  command = $cxx $flags -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in ($isa)",
            "rule link",
            "  command = $cxx -shared $in -o $out -lpthread",
            "  description = link $out",
        ]
        objects = []
        for isa in isas:
            obj = self._ninja_path(os.path.join(build_dir, f"kernels_{isa}.o"))
            flags = common + [f"-DMSFIN_ISA={isa}"] + CPU_ISAS[isa]
            rules += [f"build {obj}: cxx {self._ninja_path(os.path.join(cpu, 'kernels.cpp'))}",
                      f"  flags = {' '.join(shlex.quote(f) for f in flags)}", f"  isa = {isa}"]
            objects.append(obj)
        obj = self._ninja_path(os.path.join(build_dir, "module.o"))
        flags = common + have + [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        rules += [f"build {obj}: cxx {self._ninja_path(os.path.join(cpu, 'module.cpp'))}",
                  f"  flags = {' '.join(shlex.quote(f) for f in flags)}", "  isa = dispatch"]
        objects.append(obj)
        rules.append(f"build {self._ninja_path(out)}: link {' '.join(objects)}")
        rules.append(f"default {self._ninja_path(out)}")
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(rules) + "\n")
        note(f"building msfin_fast._cpu (CPU kernels for {', '.join(isas)}) with {cxx}")
        try:
            subprocess.run([ninja, "-C", build_dir], check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            self._fail(ext, f"building msfin_fast._cpu failed ({exc}); MSFIN_CPU_EXT=1 python setup.py "
                            "build_ext --inplace builds it on its own and shows why")

    @staticmethod
    def _fail(ext, message):
        """An optional extension's failure is a CompileError, which setuptools reports and skips."""
        note(message + ("; installing without it" if ext.optional else ""))
        if ext.optional:
            raise CompileError(message)
        raise SystemExit(message)

    @classmethod
    def _ninja(cls, ext):
        try:
            import ninja

            path = os.path.join(ninja.BIN_DIR, "ninja")
            if os.access(path, os.X_OK):
                return path
        except ImportError:
            pass
        path = shutil.which("ninja")
        if path is None:
            cls._fail(ext, "building msfin_fast._C needs ninja: pip install ninja "
                           "(or set MSFIN_CUDA_EXT=0 to install without the CUDA extension)")
        return path

    @staticmethod
    def _ninja_path(path):
        return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def cuda_extension():
    sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cpp"))
    )
    if not sources:
        return []
    mode = cuda_ext_mode()
    if mode == "0":
        note("MSFIN_CUDA_EXT=0: installing without the CUDA extension msfin_fast._C")
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise SystemExit("MSFIN_CUDA_EXT=1 but nvcc was not found: set CUDA_HOME or put nvcc on PATH")
        note(
            "nvcc not found (set CUDA_HOME, or put nvcc on PATH): installing without the CUDA "
            "extension msfin_fast._C; the CUDA backend will report itself unavailable"
        )
        return []
    if mode == "1":
        note(f"MSFIN_CUDA_EXT=1: building the CUDA extension msfin_fast._C with {nvcc} (a few minutes)")
        return [CudaExtension("msfin_fast._C", sources, optional=False)]
    build, why = cuda_ext_wanted(target_torch(), nvidia_driver())
    if not build:
        note(f"skipping the CUDA extension msfin_fast._C: {why} (MSFIN_CUDA_EXT=1 builds it anyway)")
        return []
    note(f"building the CUDA extension msfin_fast._C with {nvcc}: {why}; this takes a few minutes "
         "(MSFIN_CUDA_EXT=0 skips it)")
    return [CudaExtension("msfin_fast._C", sources, optional=True)]


def cuda_ext_wanted(torch_info, driver):
    """(build?, why) for ``MSFIN_CUDA_EXT=auto`` once nvcc is found: the extension's kernels take
    CUDA tensors, so it is of use only beside a CUDA build of torch."""
    if torch_info is not None:
        if torch_info.get("cuda"):
            return True, f"torch {torch_info['version']} is a CUDA {torch_info['cuda']} build"
        return False, f"torch {torch_info['version']} is a CPU-only build, which cannot run CUDA kernels"
    if driver:
        return True, "no torch installed yet, and an NVIDIA driver is present"
    return False, "no torch installed yet, and no NVIDIA driver on this machine"


def spandrel_pins():
    """spandrel needs torchvision; an unpinned torchvision is the newest, which needs the newest
    torch and replaces the environment's (a CPU torch by a multi-GB CUDA one). Pin the series that
    matches the torch installed, when there is one."""
    info = target_torch()
    pin = matching_torchvision(info and info.get("version"))
    if pin:
        return [pin]
    return []


def cpu_extension():
    mode = ext_mode("MSFIN_CPU_EXT")
    if mode == "0":
        note("MSFIN_CPU_EXT=0: installing without the CPU kernels msfin_fast._cpu")
        return []
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "cpu", "*")))
    return [CpuExtension("msfin_fast._cpu", sources, optional=mode != "1")]


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too; tests import it
    setup(
        name="msfin_fast",
        version=version(),
        description="Inference engine for MSFIN / MSFIN-S lightweight image super-resolution (ICME 2021)",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=packages(),
        package_dir={"msfin_fast": "msfin_fast", "msfin_fast.kernels": "kernels"},
        install_requires=["torch>=2.1", "numpy>=1.23", "pillow>=9.1"],
        extras_require={
            "triton": ["triton>=3.0"],
            "build": ["pybind11>=2.10", "ninja"],
            "test": ["pytest>=7", "pytest-timeout>=2"],
            "serve": ["starlette>=0.37", "uvicorn>=0.29", "prometheus-client>=0.17"],
            # Ray Data (batch jobs) and Ray Serve (replicated service); 2.60 is the version tested.
            "scale": ["ray[data,serve]>=2.60"],
            # PyAV: FFmpeg in-process, its wheels bundle the codecs (x264, x265, VP9, SVT-AV1); 18 is tested.
            "video": ["av>=18"],
            # ONNX export (the dynamo exporter writes through onnxscript) and ONNX Runtime to run it;
            # onnx 1.23, onnxscript 0.7 and onnxruntime 1.32 are tested.
            "onnx": ["onnx>=1.17", "onnxscript>=0.3", "onnxruntime>=1.20"],
            # spandrel (chaiNNer's model loader): msfin_fast.spandrel_arch.install() registers MSFIN.
            "spandrel": ["spandrel>=0.4"] + spandrel_pins(),
            # 16-bit colour PNG and TIFF, which Pillow reduces to 8 bits: OpenCV's unchanged mode.
            "image16": ["opencv-python-headless>=4.8"],
            # The CPU peers benchmarks/latency.py times beside the native backend (OpenVINO 2026.4
            # and ONNX Runtime 1.32 tested; ONNX export through .[onnx]).
            "peers": ["onnx>=1.17", "onnxscript>=0.3", "onnxruntime>=1.20", "openvino>=2024.0"],
        },
        entry_points={"console_scripts": ["msfin-fast = msfin_fast.cli:main"]},
        ext_modules=cuda_extension() + cpu_extension(),
        cmdclass={"build_ext": NinjaBuildExt},
        zip_safe=False,
    )
