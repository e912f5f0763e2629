"""Build and install msfin_fast.

The top-level ``kernels/`` folder (Triton) installs as ``msfin_fast.kernels``. Sources in ``csrc/``
(``*.cu``, ``*.cpp``) are compiled with ninja into ``msfin_fast._C`` through torch's
``BuildExtension``; that needs torch importable while building, so use
``pip install --no-build-isolation -e .`` once csrc/ has sources. ``MSFIN_NO_CUDA_EXT=1`` skips it.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_extension():
    sources = sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
    )
    if not sources or os.environ.get("MSFIN_NO_CUDA_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise SystemExit(
            f"csrc/ needs torch at build time ({exc}); run: pip install --no-build-isolation -e ."
        ) from None
    ext = CUDAExtension(
        "msfin_fast._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def version():
    with open(os.path.join(ROOT, "msfin_fast", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in msfin_fast/__init__.py")


ext_modules, cmdclass = cuda_extension()

setup(
    name="msfin_fast",
    version=version(),
    description="Inference engine for MSFIN / MSFIN-S lightweight image super-resolution (ICME 2021)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["msfin_fast", "msfin_fast.engine", "msfin_fast.kernels"],
    package_dir={"msfin_fast": "msfin_fast", "msfin_fast.kernels": "kernels"},
    install_requires=["torch>=2.1", "numpy>=1.23", "pillow>=9.1"],
    extras_require={
        "triton": ["triton>=3.0"],
        "build": ["pybind11>=2.10", "ninja"],
        "test": ["pytest>=7"],
        "serve": ["starlette>=0.37", "uvicorn>=0.29"],
    },
    entry_points={"console_scripts": ["msfin-fast = msfin_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
