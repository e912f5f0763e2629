"""Mutation audit: plant each known fault, run the tests that must catch it, report who survives.

    python tests/mutate.py                 # every mutation (about 10 minutes on two cores)
    python tests/mutate.py tile-row conv-grid-width   # some of them, by name
    python tests/mutate.py --list          # names, files and the tests that must fail

Each mutation is a one-line change of the source (``old`` must occur exactly once in ``path``). The
file is edited in place, the named tests run in a fresh interpreter (no bytecode written, so no stale
cache outlives the mutation), and the original bytes and timestamps are put back in a ``finally``,
also on Ctrl-C. A mutation is *killed* when the tests fail, *survives* when they pass. The script
exits non-zero when any mutation survives, or when the tests fail without any mutation (``--baseline``
checks that first). The list and the last run's outcome are in tests/MUTATIONS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    fault: str
    select: str = ""  # a pytest -k expression: which of the tests must already fail
    build: bool = False  # C++ of csrc/cpu/: the extension is rebuilt with the mutation, then put back


K = "tests/test_kernels.py"
NATIVE = "tests/test_native.py"
CPU_KERNELS = "csrc/cpu/kernels.cpp"
CUDA_CPU = "tests/test_cuda_ext.py::test_kernel_source_matches_the_reference_on_the_cpu"

MUTATIONS = [
    # 1. tile-to-pixel mappings and grids
    Mutation("tile-row", "kernels/source.py", "tiles_w = tl.cdiv(W, BW)", "tiles_w = tl.cdiv(W, BW) + 1",
             (f"{K}::test_rrcab_pass_over_a_grid_of_tiles",),
             "tile_pixels maps tiles to rows with one tile too many per row"),
    Mutation("fused-tile-row", "kernels/rrcab_fused.py", "r = (tile // tiles_w) * (EH - 2) - 1 + li",
             "r = (tile // (tiles_w + 1)) * (EH - 2) - 1 + li",
             (f"{K}::test_rrcab_fused_pass_over_a_grid_of_tiles",),
             "the fused kernel's lattice maps tiles to rows with one tile too many per row"),
    Mutation("conv-grid-width", "kernels/conv.py", "n, r, c = tile_pixels(W_out, BH, BW)",
             "n, r, c = tile_pixels(W_in, BH, BW)",
             (f"{K}::test_conv_over_a_grid_of_tiles",),
             "the conv kernel lays its tiles over the input's width, not the output's (stride 2)"),
    Mutation("grid-rows-by-width", "kernels/rrcab.py", "return triton.cdiv(h, bh) * triton.cdiv(w, bw), n",
             "return triton.cdiv(h, bw) * triton.cdiv(w, bw), n",
             (f"{K}::test_rrcab_pass_over_a_grid_of_tiles",),
             "the RRCAB grid counts tile rows with the tile width: too few programs, except on square tiles"),
    # 2. the trained MeanShift folds
    Mutation("tail-fold-identity", "msfin_fast/engine/backends/__init__.py",
             "m = add_mean.weight.detach().double()[:, :, 0, 0]",
             "m = torch.eye(3, dtype=torch.float64, device=add_mean.weight.device)",
             (f"{K}::test_tail", "tests/test_engine.py::test_emulated_plan_matches_reference_fp32"),
             "the tail's add_mean fold ignores the trained 3×3 matrix"),
    # 3. misplaced biases, sums, tolerances
    Mutation("conv1-bias-after-relu", "kernels/rrcab.py",
             "return tl.maximum(acc + tl.load(b_ptr + ch)[None, :], 0.0)",
             "return tl.maximum(acc, 0.0) + tl.load(b_ptr + ch)[None, :]",
             (f"{K}::test_rrcab_pass",), "conv1's bias added after the ReLU"),
    Mutation("conv2-bias-after-relu", "kernels/rrcab.py",
             "h = tl.maximum(acc + tl.load(b_ptr + ch)[None, :], 0.0).to(a_ptr.dtype.element_ty)",
             "h = (tl.maximum(acc, 0.0) + tl.load(b_ptr + ch)[None, :]).to(a_ptr.dtype.element_ty)",
             (f"{K}::test_rrcab_pass",), "conv2's bias added after the ReLU"),
    Mutation("sums-stored", "kernels/rrcab.py",
             "tl.atomic_add(sums_ptr + n * C + cp, tl.sum(tl.where(keep, u, 0.0), axis=0), mask=cp < C)",
             "tl.store(sums_ptr + n * C + cp, tl.sum(tl.where(keep, u, 0.0), axis=0), mask=cp < C)",
             (f"{K}::test_rrcab_pass",), "the channel sums stored instead of accumulated"),
    Mutation("fused-sums-stored", "kernels/rrcab_fused.py",
             "tl.atomic_add(sums_out_ptr + n * C + cp, tl.sum(tl.where(keep, u, 0.0), axis=0), mask=cp < C)",
             "tl.store(sums_out_ptr + n * C + cp, tl.sum(tl.where(keep, u, 0.0), axis=0), mask=cp < C)",
             (f"{K}::test_rrcab_fused_pass",), "the fused kernel's channel sums stored instead of accumulated"),
    Mutation("ca-product-in-fp16", "kernels/source.py",
             "x += scale[None, :] * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)",
             "x += (scale[None, :] * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(tl.float16)",
             (f"{K}::test_materialize",), "the deferred CA product s·u rounded to fp16 before it is added"),
    # 4. the CUDA C++ kernel, through its host emulation
    Mutation("cuda-fp32-stores-fp16", "csrc/rrcab_kernel.cuh",
             "for (int k = 0; k < K3; k += VEC) store16(dst + k, &acc[j][k]);",
             "for (int k = 0; k < K3; ++k) acc[j][k] = round_to<__half>(acc[j][k]);\n"
             "          for (int k = 0; k < K3; k += VEC) store16(dst + k, &acc[j][k]);",
             (f"{CUDA_CPU}[C24G6-fp32]", f"{CUDA_CPU}[C96G6-fp32]"),
             "the fp32 CUDA pass stores its output u rounded to fp16"),
    Mutation("cuda-fp32-intermediates-fp16", "csrc/rrcab_kernel.cuh",
             "template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }",
             "template <> __device__ __forceinline__ float from_float<float>(float v) "
             "{ return __half2float(__float2half_rn(v)); }",
             (f"{CUDA_CPU}[C24G6-fp32]", f"{CUDA_CPU}[C96G6-fp32]"),
             "the fp32 CUDA pass keeps its on-chip intermediates (x, a, h) in fp16"),
    Mutation("cuda-sums-skip-column", "csrc/rrcab_kernel.cuh",
             "for (int k = 0; k < K3; ++k) sums[k] += acc[j][k];",
             "for (int k = 0; k < K3; ++k) sums[k] += (q % TW == 0) ? 0.0f : acc[j][k];",
             (f"{CUDA_CPU}[C24G6-fp16]", f"{CUDA_CPU}[C64G4-fp16]"),
             "the CUDA pass's channel sums skip the first column of every tile"),
    # 5. the engine end to end
    Mutation("engine-fp32-passes-in-fp16", "msfin_fast/engine/backends/emulate.py",
             "        dt = p.dtype\n        body = p.module.body",
             "        dt = torch.float16\n        body = p.module.body",
             ("tests/test_engine.py::test_emulated_plan_matches_reference_fp32",
              "tests/test_engine.py::test_released_weights_through_the_plan"),
             "an fp32 engine whose RRCAB passes store fp16"),
    # 6. out-of-bounds stores
    Mutation("materialize-store-unmasked-rows", "kernels/materialize.py",
             "tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)",
             "tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=(cp < C)[None, :])",
             (f"{K}::test_materialize",), "materialize stores the padding pixels of its last block"),
    Mutation("conv1-store-unmasked-rows", "kernels/rrcab.py",
             "tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=inside[:, None] & (ch < C)[None, :])",
             "tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=(c < W)[:, None] & (ch < C)[None, :])",
             (f"{K}::test_rrcab_pass",), "conv1 stores the rows of its tiles below the image"),
    Mutation("tail-store-unmasked-rows", "kernels/tail.py",
             "mask=((r < H) & (c < W))[:, None] & (ci < 3)[None, :])",
             "mask=(c < W)[:, None] & (ci < 3)[None, :])",
             (f"{K}::test_tail",), "the tail stores the rows of its tiles below the image"),
    # 5. the C++ CPU kernels (csrc/cpu/), each rebuilt with its fault
    Mutation("native-halo-row", CPU_KERNELS, "for (int y = r0 - 2; y <= r0; ++y) make_x(y);",
             "for (int y = r0 - 1; y <= r0; ++y) make_x(y);",
             (f"{NATIVE}::test_rrcab_pass_over_strips_and_bands",),
             "a band's first conv1 row reads a stale input row instead of the halo row above it", build=True),
    Mutation("native-halo-column", CPU_KERNELS, "if (c1 == W)\n", "if (c1 == W + 1)\n",
             (f"{NATIVE}::test_rrcab_pass",),
             "conv1's output just right of the image is left as relu(bias), not the zero padding", build=True),
    Mutation("native-sums-partial-block", CPU_KERNELS, "            rowsum[ov0 + v] += acc[p][v];",
             "            if (PB > 1) rowsum[ov0 + v] += acc[p][v];",
             (f"{NATIVE}::test_rrcab_pass",),
             "the channel sums leave out the pixels of a row's partial block", build=True),
    Mutation("native-ca-scale-of-sample-0", CPU_KERNELS,
             "const float* scale = s.scale ? s.scale + (row / rows_per_sample) * C : nullptr;",
             "const float* scale = s.scale ? s.scale : nullptr;",
             (f"{NATIVE}::test_materialize",), "materialize applies sample 0's channel attention to the whole batch",
             build=True),
    Mutation("native-shuffle-swapped", CPU_KERNELS,
             "const size_t at = ((size_t)(n * 2 * c.Ho + 2 * y + (q >> 1)) * 2 * c.Wo + 2 * (x0 + p) + (q & 1));",
             "const size_t at = ((size_t)(n * 2 * c.Ho + 2 * y + (q & 1)) * 2 * c.Wo + 2 * (x0 + p) + (q >> 1));",
             (f"{NATIVE}::test_every_conv_of_the_plan",),
             "the pixel-shuffled store swaps the sub-pixel's row and column", build=True),
    Mutation("native-x-out-unfinished", CPU_KERNELS, "if (xo) store8(xo + j, x);",
             "if (xo) store8(xo + j, load8(t + j));",
             (f"{NATIVE}::test_rrcab_pass",),
             "x_out holds t, not the finished t + s·u + e1 + e2", build=True),
    Mutation("native-stale-padding", CPU_KERNELS,
             "        std::memset(xrow, 0, sizeof(float) * C * (lo - (c0 - 2)));\n", "",
             (f"{NATIVE}::test_rrcab_pass",),
             "the zero padding left of the image keeps what another strip left in the row buffer", build=True),
    Mutation("native-tail-band-halo", CPU_KERNELS, "    rows_of.make(r0 - 1, xslot(r0 - 1));\n", "",
             (f"{NATIVE}::test_head_and_tail",),
             "the tail's first row of a band reads a stale row instead of the halo row above it", build=True),
    Mutation("native-replay-stale-input", "msfin_fast/engine/backends/native.py", "args[i] = xa", "args[i] = args[i]",
             (f"{NATIVE}::test_a_recorded_forward_replays_for_new_inputs_and_records_again_on_another_thread_count",),
             "a replayed forward reads the recorded input's address, not the new input's"),
    Mutation("native-head-strip-halo", CPU_KERNELS, "const int lo = c0 - 1 < 0 ? 0 : c0 - 1, hi = c1 + 1 > W ? W : c1 + 1;",
             "const int lo = c0 < 0 ? 0 : c0, hi = c1 + 1 > W ? W : c1 + 1;",
             (f"{NATIVE}::test_head_and_tail",),
             "the head's upsampled rows leave out the column left of a strip (zero, not the image)", build=True),
    Mutation("native-bf16-rounds-residual", CPU_KERNELS, "            store8(dst + j, x);\n",
             "            if (BF) { bf16_t r[8]; store8_bf16(r, x); x = load8_bf16(r); }\n            store8(dst + j, x);\n",
             (f"{NATIVE}::test_rrcab_pass_with_bf16_addends",),
             "with bf16 addends the finished input, the residual stream, is rounded to bf16 too", build=True),
    Mutation("native-bf16-truncates", CPU_KERNELS, "    b += 0x7FFFu + ((b >> 16) & 1u);", "",
             (f"{NATIVE}::test_rrcab_pass_with_bf16_addends",),
             "bf16 stores truncate instead of rounding to nearest even", build=True),
    Mutation("native-bf16-convs-wide", "msfin_fast/engine/plan.py",
             "        elif isinstance(launch, Conv):\n            written.add(launch.out)\n", "",
             (f"{NATIVE}::test_a_bf16_engine_stores_only_the_addends_in_bf16",),
             "a bf16 engine keeps the convs' addend outputs (transposed convs, up-sampling) in fp32"),
]




def fp16_alone(name: str) -> Mutation:
    """Mutation ``name`` again, with only the fp16 cases of its tests allowed to catch it."""
    m = next(m for m in MUTATIONS if m.name == name)
    return dataclasses.replace(m, name=f"{name}-fp16", fault=f"{m.fault}, seen by the fp16 cases alone",
                               select="fp16")


# The faults the fp16 cases alone used to let through (a 2e-2 tolerance, sums judged as fp16).
MUTATIONS += [fp16_alone("conv1-bias-after-relu"), fp16_alone("sums-stored")]


def run_tests(tests: tuple[str, ...], timeout: float, select: str = "") -> tuple[bool, str]:
    """(passed, last lines of output) of the tests in a fresh interpreter."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--tb=line"] + (["-k", select] if select else [])
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc.returncode == 0, "\n".join(lines[-4:])


def build_cpu() -> tuple[bool, str]:
    """Rebuild msfin_fast._cpu in place from the (mutated) sources, in build folders of its own so
    the usual ones keep their objects and their module (a mutant left in build/lib would be copied
    in place by the next ``build_ext --inplace`` that finds nothing to recompile)."""
    with tempfile.TemporaryDirectory(prefix="mutate-build-") as temp:
        env = dict(os.environ, MSFIN_CUDA_EXT="0", MSFIN_CPU_EXT="1")
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", temp,
                               "--build-lib", os.path.join(temp, "lib")],
                              cwd=ROOT, env=env, capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]


def apply(m: Mutation) -> tuple[Path, Path]:
    """Plant ``m``; returns (file, backup). The backup keeps the original bytes and timestamps."""
    path = ROOT / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the line to mutate occurs {text.count(m.old)} times in {m.path}, not once")
    backup = Path(tempfile.mkdtemp(prefix="mutate-")) / path.name
    shutil.copy2(path, backup)
    path.write_text(text.replace(m.old, m.new))
    return path, backup


def restore(path: Path, backup: Path) -> None:
    shutil.copy2(backup, path)
    shutil.rmtree(backup.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--baseline", action="store_true", help="first check that the tests pass unmutated")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutations {sorted(unknown)}; see --list")
    if args.list:
        for m in chosen:
            select = f" -k '{m.select}'" if m.select else ""
            print(f"{m.name}: {m.path}: {m.fault}\n    must fail: {' '.join(m.tests)}{select}")
        return 0
    if args.baseline:  # the -k selections only narrow these down
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        ok, tail = run_tests(tests, args.timeout * 2)
        if not ok:
            print(f"the tests fail without any mutation:\n{tail}")
            return 2
        print("baseline: the tests pass unmutated")
    survivors = []
    for m in chosen:
        t0 = time.time()
        modules = [(so, Path(tempfile.mkdtemp(prefix="mutate-so-")) / so.name)
                   for so in (ROOT / "msfin_fast").glob("_cpu*.so")] if m.build else []
        for so, saved in modules:
            shutil.copy2(so, saved)
        path, backup = apply(m)
        try:
            ok, tail = build_cpu() if m.build else (True, "")
            if not ok:
                raise SystemExit(f"{m.name}: the mutated extension does not build:\n{tail}")
            ok, tail = run_tests(m.tests, args.timeout, m.select)
        finally:
            restore(path, backup)
            for so, saved in modules:  # the unmutated module, byte for byte
                restore(so, saved)
        verdict = "SURVIVED" if ok else "killed"
        print(f"{verdict:8s} {m.name} ({time.time() - t0:.0f} s): {m.fault}", flush=True)
        if ok:
            survivors.append(m.name)
        elif os.environ.get("MUTATE_VERBOSE"):
            print("    " + tail.replace("\n", "\n    "))
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} killed" + (f"; survived: {', '.join(survivors)}"
                                                                        if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
