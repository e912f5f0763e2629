"""How many Triton compiles one pass over the GPU suite needs: a CPU count of launch signatures.

    python benchmarks/count_compiles.py                   # per group, as the kernels are now
    python benchmarks/count_compiles.py --out FILE.md     # and write the table

Triton's JIT compiles one binary per kernel and *specialisation key*: the constexprs, the launch
options, the argument types, whether each pointer is 16-byte aligned, and, for every integer
argument not marked ``do_not_specialize``, whether it is 1 or divisible by 16. This script replays
the launches that the GPU suite and the GPU script's latency runs make, on the CPU, with every
kernel replaced by a recorder that computes that key with Triton's own binder for an sm_90 target
(nothing runs; activations live on the meta device, so 4K batches cost no memory), and counts the
distinct keys twice: as the kernels are declared, and as if every integer were specialised (what
the kernels did before their shape arguments were marked ``do_not_specialize``).

What is replayed, from the files that define it (so the count follows the suite):
  engine-tests  tests/test_engine_gpu.py: SIZES × VARIANTS × both presets (engine vs reference)
  psnr          the same file's PSNR test: every Set5 and Set14 image, fp16, fused and not
  kernel-tests  tests/test_kernels.py and test_engine.py's end-to-end test, run by pytest here with
                the recorders in place (their assertions fail: nothing computes; the launches count)
  latency       the GPU script's latency runs (benchmarks/gpu_check.py: LATENCY_RUNS)
  latency-full  latency.py's default matrix (both models, 3 sizes, batch 1 and 8, every backend)
Must run without ``TRITON_INTERPRET=1`` (the recorders need the JIT's kernel objects).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # test_engine_gpu.py imports its helpers (bounds.py) from there

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: the count needs the JIT's kernel objects")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import KernelParam, create_function_from_signature  # noqa: E402

import msfin_fast  # noqa: E402
from msfin_fast.engine import executor  # noqa: E402
from msfin_fast.engine import cuda_ext  # noqa: E402
from msfin_fast.engine.backends import cuda, triton  # noqa: E402
from msfin_fast.kernels import conv, head, materialize, rrcab, rrcab_fused, tail  # noqa: E402

KERNELS = [(rrcab, "_rrcab_conv1_kernel"), (rrcab, "_rrcab_conv2_kernel"), (rrcab_fused, "_rrcab_fused_kernel"),
           (conv, "_conv_kernel"), (head, "_head_kernel"), (tail, "_tail_kernel"),
           (materialize, "_materialize_kernel")]
H100_SMS = 132  # the persistent grid's program count depends on it


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class KeyRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` computes the JIT's cache key,
    as declared and with every argument specialised, and runs nothing."""

    def __init__(self, fn, keys: dict):
        self.fn, self.keys = fn, keys
        backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binders = {
            "declared": create_function_from_signature(fn.signature, fn.params, backend),
            "specialize-all": create_function_from_signature(
                fn.signature, [KernelParam(p.num, p._param, False, False) for p in fn.params], backend),
        }

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for mode, binder in self.binders.items():
                _, specialization, options = binder(*args, **kwargs)
                key = (self.fn.__name__, tuple(map(tuple, specialization)), tuple(sorted(options.items())))
                self.keys.setdefault(self.group, {}).setdefault(mode, set()).add(key)
        return launch


@contextlib.contextmanager
def recording(keys: dict):
    """Kernels replaced by recorders, the fused kernel's grid sized for an H100, the engine's
    backends accepted on the CPU and the CUDA C++ pass a no-op (it compiles no Triton)."""
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    recorders = []
    for module, name in KERNELS:
        recorder = KeyRecorder(getattr(module, name), keys)
        recorders.append(recorder)
        patch(module, name, recorder)
    patch(rrcab_fused, "programs", lambda device, jobs: min(jobs, 4 * H100_SMS))
    patch(triton, "device_problem", lambda device: None)
    patch(cuda.CudaBackend, "unavailable_reason", lambda self, model: None)
    patch(cuda_ext, "_C", None)  # packing without the extension's check; the pass itself is a no-op below
    patch(cuda_ext, "rrcab_pass", lambda *a, **k: None)
    patch(executor.Executor, "arena", _meta_arena(executor.Executor.arena))
    try:
        yield lambda group: [setattr(r, "group", group) for r in recorders]
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _meta_arena(arena):
    def on_meta(self, n, H, W, device):
        return arena(self, n, H, W, torch.device("meta"))
    return on_meta


def replay(model, shapes, *, dtype, backend="triton", fuse_rrcab=False, conv_kernels=True) -> None:
    """The engine's launches for each input shape (the CUDA C++ passes stubbed out)."""
    engine = msfin_fast.optimize(model, dtype=dtype, backend=backend, fuse_rrcab=fuse_rrcab,
                                 conv_kernels=conv_kernels)
    for n, h, w in shapes:
        engine._arenas.clear()
        engine(torch.zeros(n, 3, h, w), check_finite=False)


def engine_variant(name: str) -> list[dict]:
    """optimize() arguments of a test variant or latency backend (auto: every variant it times)."""
    dtype = torch.float32 if "fp32" in name else torch.float16
    if name.startswith("auto"):
        return [dict(dtype=dtype), dict(dtype=dtype, fuse_rrcab=True), dict(dtype=dtype, backend="cuda")]
    return [dict(dtype=dtype, backend="cuda" if "cuda" in name and "cudnn" not in name else "triton",
                 fuse_rrcab="fused" in name, conv_kernels="cudnn" not in name)]


def lr_shapes(folder: Path) -> list[tuple[int, int, int]]:
    """The LR input shapes evaluate_folder() makes of an HR folder (cropped to a multiple of 4)."""
    from PIL import Image

    from msfin_fast.images import list_image_files

    shapes = []
    for path in list_image_files(folder):
        with Image.open(path) as im:
            w, h = im.size
        shapes.append((1, h // 4, w // 4))
    return shapes


def data_dir() -> Path:
    for base in ([os.environ["MSFIN_DATA_DIR"]] if os.environ.get("MSFIN_DATA_DIR") else []) + [
            ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]:
        if (Path(base) / "Set5").is_dir() and (Path(base) / "Set14").is_dir():
            return Path(base)
    raise SystemExit("Set5 and Set14 not found (set MSFIN_DATA_DIR): the PSNR tests' shapes come from them")


def models() -> dict:
    torch.manual_seed(0)
    return {preset: msfin_fast.MSFIN(preset).eval() for preset in ("msfin-x4", "msfin-s-x4")}


def count(groups: list[str]) -> dict:
    keys: dict = {}
    nets = models()
    engine_gpu = _load(ROOT / "tests" / "test_engine_gpu.py", "test_engine_gpu_for_count")
    gpu_check = _load(ROOT / "benchmarks" / "gpu_check.py", "gpu_check_for_count")
    latency = _load(ROOT / "benchmarks" / "latency.py", "latency_for_count")
    with recording(keys) as group:
        if "engine-tests" in groups:
            group("engine-tests")
            for model in nets.values():
                for dtype, _graphs, fused, convs in engine_gpu.VARIANTS.values():
                    replay(model, engine_gpu.SIZES, dtype=dtype, backend="cuda" if fused == "cuda" else "triton",
                           fuse_rrcab=fused is True, conv_kernels=convs)
        if "psnr" in groups:
            group("psnr")
            data = data_dir()
            shapes = lr_shapes(data / "Set5") + lr_shapes(data / "Set14")
            for model in nets.values():
                for fused in (False, True):
                    replay(model, shapes, dtype=torch.float16, fuse_rrcab=fused)
        if "kernel-tests" in groups:
            group("kernel-tests")
            import pytest

            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                pytest.main([str(ROOT / "tests" / "test_kernels.py"),
                             str(ROOT / "tests" / "test_engine.py") + "::test_triton_kernels_end_to_end",
                             "-q", "--tb=no", "-p", "no:cacheprovider", "-o", "addopts="])
        for name, runs in (("latency", gpu_check.LATENCY_RUNS), ("latency-full", [latency.default_matrix()])):
            if name not in groups:
                continue
            group(name)
            for run in runs:
                for preset in run["models"]:
                    for backend in run["backends"]:
                        if not (backend.startswith("engine") or backend.startswith("cuda")
                                or backend.startswith("auto")):
                            continue
                        shapes = [(n, h, w) for h, w in run["sizes"] for n in run["batch"]]
                        for kwargs in engine_variant(backend):
                            replay(nets[preset], shapes, **kwargs)
    return keys


def table(keys: dict) -> str:
    rows = ["| group | distinct compiles, shape integers specialised (before) | as declared (after) |",
            "|---|---|---|"]
    union: dict = {"declared": set(), "specialize-all": set()}
    suite = [g for g in ("engine-tests", "psnr", "kernel-tests") if g in keys]
    for group, found in keys.items():
        rows.append(f"| {group} | {len(found['specialize-all'])} | {len(found['declared'])} |")
    for label, members in (("GPU suite (" + " + ".join(suite) + ")", suite),
                           ("GPU suite + the GPU script's latency runs", suite + ["latency"]),
                           ("GPU suite + latency.py's default matrix", suite + ["latency-full"])):
        if not all(m in keys for m in members):
            continue
        for mode in union:
            union[mode] = set().union(*(keys[m][mode] for m in members))
        rows.append(f"| **{label}** | **{len(union['specialize-all'])}** | **{len(union['declared'])}** |")
    return "\n".join(rows) + "\n"


GROUPS = ["engine-tests", "psnr", "kernel-tests", "latency", "latency-full"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", nargs="+", default=GROUPS, choices=GROUPS)
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    text = table(count(args.groups))
    print(text)
    if args.out:
        import triton

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# Distinct Triton compiles of one GPU run, counted on the CPU\n\n"
            f"triton {triton.__version__}, torch {torch.__version__}, target sm_90; command: "
            f"`python benchmarks/count_compiles.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
