"""Compile every Triton kernel variant the engine launches, for real GPU targets, without a GPU.

    python benchmarks/compile_kernels.py                    # sm_80 and sm_90, both presets, fp16 + fp32
    python benchmarks/compile_kernels.py --archs 90 --out benchmarks/results/compile-sm90.md

The engine's plan is run on the CPU with each kernel replaced by a recorder, which captures the
exact arguments and constexprs of every launch; each distinct variant is then compiled ahead of
time by Triton (TTIR → TTGIR → LLVM → PTX → cubin, ptxas included) for each target. This proves
the kernels compile for the cards they are meant for and shows their resource use (registers and
spills from ptxas, shared memory, tensor-core instructions in the PTX). It does not run them: correctness on a GPU is the job of ``pytest -m gpu``.
Must run without ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import msfin_fast  # noqa: E402
from msfin_fast.engine.backends.triton import TritonBackend  # noqa: E402
from msfin_fast.kernels import conv, head, materialize, rrcab, rrcab_fused, tail  # noqa: E402

KERNELS = {
    (rrcab, "_rrcab_conv1_kernel"), (rrcab, "_rrcab_conv2_kernel"), (head, "_head_kernel"),
    (materialize, "_materialize_kernel"), (tail, "_tail_kernel"), (conv, "_conv_kernel"),
    (rrcab_fused, "_rrcab_fused_kernel"),
}
TRITON_TYPES = {torch.float16: "*fp16", torch.float32: "*fp32"}


class Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **constexprs)`` records the call."""

    def __init__(self, fn, calls: dict):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            names = self.fn.arg_names
            values = dict(zip(names, args))
            values.update(kwargs)
            signature, constexprs, attrs = {}, {}, {}
            for i, name in enumerate(names):
                v = values[name]
                if self.fn.params[i].is_constexpr:
                    signature[name], constexprs[name] = "constexpr", v
                elif isinstance(v, torch.Tensor):
                    signature[name] = TRITON_TYPES[v.dtype]
                    # As the JIT specialises a launch: 16-byte-aligned pointers (PyTorch's are).
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif isinstance(v, float):
                    signature[name] = "fp32"
                else:
                    signature[name] = "i32"
                    if v % 16 == 0:  # the JIT also specialises integers divisible by 16
                        attrs[(i,)] = [["tt.divisibility", 16]]
            key = (self.fn.__name__, tuple(sorted(signature.items())),
                   tuple(sorted(constexprs.items())) + tuple(sorted(options.items())))
            self.calls.setdefault(key, (self.fn, signature, constexprs, options, attrs))
        return launch


def record_launches(preset: str, dtype: torch.dtype, fuse_rrcab: bool = False) -> dict:
    calls: dict = {}
    saved = {}
    for module, name in KERNELS:
        saved[(module, name)] = getattr(module, name)
        setattr(module, name, Recorder(saved[(module, name)], calls))
    try:
        torch.manual_seed(0)
        engine = msfin_fast.optimize(msfin_fast.MSFIN(preset).eval(), dtype=dtype, backend="emulate",
                                     fuse_rrcab=fuse_rrcab)
        # The Triton backend over the same plan (emulate builds Triton's), its weights re-packed in
        # its own layouts; the launches are recorded, not run.
        engine.backend_object = TritonBackend(fuse_rrcab=fuse_rrcab)
        engine._version = None
        engine(torch.rand(2, 3, 8, 12) * 255)
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)
    return calls


def _tool(name: str) -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def resource_usage(ptx: str, arch: int) -> str:
    """Registers and spills as ptxas reports them for this PTX (Triton's own ptxas when bundled)."""
    tool = _tool("ptxas")
    if tool is None:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([tool, "-v", f"--gpu-name={arch_name}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs:
        return ""
    return f"{regs.group(1)} regs" + (f", spills {spill.group(1)}/{spill.group(2)} B" if spill else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--models", nargs="+", default=["msfin-x4", "msfin-s-x4"])
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)

    variants: dict = {}
    for preset in args.models:
        for dtype in (torch.float16, torch.float32):
            for fused in (False, True):
                variants.update(record_launches(preset, dtype, fused))
    rows = ["| kernel | variant | arch | compile s | shared B | warps | mma/wgmma in PTX | vector / scalar loads | ptxas |",
            "|---|---|---|---|---|---|---|---|---|"]
    failures = 0
    for (name, _, consts), (fn, signature, constexprs, options, attrs) in sorted(variants.items(),
                                                                                key=lambda kv: str(kv[0])):
        ptr = next(t for t in signature.values() if t.startswith("*f")).lstrip("*")
        variant = f"{ptr} " + " ".join(f"{k}={v}" for k, v in consts)
        for arch in args.archs:
            t0 = time.time()
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                          target=GPUTarget("cuda", arch, 32), options=options)
            except Exception as exc:  # report every failing variant, not just the first
                failures += 1
                rows.append(f"| {name} | {variant} | sm_{arch} | FAILED | | | | | {str(exc).splitlines()[0][:120]} |")
                continue
            ptx = compiled.asm["ptx"]
            mma = len(re.findall(r"\b(?:mma|wgmma)\.", ptx))
            vector = len(re.findall(r"\bld\.global\.v\d", ptx))
            scalar = len(re.findall(r"\bld\.global\.b(?:16|32)\b", ptx))
            rows.append(
                f"| {name} | {variant} | sm_{arch} | {time.time() - t0:.1f} | {compiled.metadata.shared} | "
                f"{compiled.metadata.num_warps} | {mma} | {vector} / {scalar} | {resource_usage(ptx, arch)} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    header = (f"# Ahead-of-time compile of the engine's Triton kernels\n\ntriton {triton.__version__}, "
              f"torch {torch.__version__}; command: `python benchmarks/compile_kernels.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n\n{len(variants)} variants, "
              f"{failures} failures.\n\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + table)
    print(f"{len(variants)} variants x {len(args.archs)} archs, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
