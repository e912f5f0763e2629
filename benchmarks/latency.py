"""Latency of MSFIN / MSFIN-S per backend, input size and batch: JSON, a markdown table, a PNG plot.

    python benchmarks/latency.py                      # everything that can run here
    python benchmarks/latency.py --quick              # one size, batch 1, no torch.compile (< 1 min;
                                                      # on a CPU LR 64x64 and 3 timed calls, said in the output)
    python benchmarks/latency.py --models msfin-x4 --sizes 180x320 --batch 1 --backends engine-fp16-graph
    python benchmarks/latency.py ... --warm-only      # compile and capture everything once, time nothing
    python benchmarks/latency.py ... --dry-run        # print the matrix and exit

Backends: ref-fp32 (eager reference), ref-fp16-cl (eager fp16, channels_last), ref-fp16-cl-graph
(the same replayed from a CUDA graph per shape), compile (torch.compile, default mode, fp16
channels_last, static shapes), compile-max-autotune (which CUDA-graphs the call; minutes to build),
engine-fp16 / engine-fp32 (the Triton engine), engine-fp16-graph / engine-fp32-graph (the engine
replaying a CUDA graph per shape), engine-fp16-fused[-graph] (one launch per RRCAB pass, conv1 kept
in L2) and engine-fp16-cudnn-graph (the layers between blocks through cuDNN instead of
kernels/conv.py); cuda-fp16[-graph] / cuda-fp32 (the RRCAB passes by the CUDA C++ kernel of csrc/);
auto-fp16-graph (what backend="auto" picks); native-fp32 (the native backend: the C++ CPU kernels,
what auto runs on a CPU); native-bf16 (the same with dtype=torch.bfloat16: the addends of the
residual stream stored in bf16, the image returned in fp32 as the Upscaler takes it); cpu-fp32 (the cpu backend: the whole network in PyTorch fp32
channels_last); the CPU peers, each at its best settings (said in the output's "settings"):
onnxruntime-cpu-fp32 (the model exported by ``msfin_fast.export_onnx``, dynamic shapes, ONNX
Runtime's CPU provider, all graph optimisations, intra-op threads = torch's), openvino-cpu-fp32
(the same ONNX file, reshaped to each input's static shape, compiled for the CPU with the LATENCY
hint, torch's thread count and the f32 precision hint), openvino-cpu-default (the same without a
precision hint: bf16 where the CPU computes it natively, f32 elsewhere; the precision it used is
recorded), compile-cpu-fp32 (``torch.compile``, default mode, fp32 channels_last, static shapes).
Exports and compiles are not timed.

On a CPU the entries of one (model, size, batch) run interleaved (``--interleave``, the default
there): every callable is built and warmed up, then each round calls each backend once untimed
(which also absorbs threads another runtime left spinning) and once timed, so drift and neighbours
on the machine weigh on every backend alike. ``--busy N`` runs N busy-looping processes beside the
run (the under-load measurement). "GFLOP/s" counts the convolutions' multiply-adds as two FLOPs.
On a GPU each number is the median of CUDA-event timings after warm-up, with cuDNN's benchmark
mode on (the peers' best case for fixed shapes). Each (backend, shape) gets a fresh callable and its
"peak MiB" is what it allocated beyond the model and input: arena, graphs, workspaces and outputs.
"floor" is the time to move each RRCAB pass's activation once in and once out at the card's copy
bandwidth (``--bandwidth``; on a GPU measured at the start by a 1 GiB device-to-device copy), the
bound the kernels are written against; "% floor" = floor / median. ``--check`` also records each
backend's max |Δ| against the true-fp32 reference (TF32 off), in grey levels, so a fast but wrong
variant shows next to its time. On a GPU the clocks, temperature and power are recorded before and
after the run.

A run returns what it measured whatever fails: the JSON and the markdown are rewritten (atomically)
after every entry and say how far the run got; an entry that raises records its error in its row
and the run goes on (after an error that leaves the CUDA context unusable, the remaining rows say
so); SIGTERM or SIGINT ends the run with the files saying which entry was cut short; the
``torch.compile`` entries, minutes each when cold, run after all the others. Exit status: 0, 1 if
an entry raised, 128 + the signal if stopped.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msfin_fast  # noqa: E402
from msfin_fast.devices import true_fp32  # noqa: E402
from msfin_fast.engine import plan as P  # noqa: E402

BACKENDS = ["ref-fp32", "ref-fp16-cl", "ref-fp16-cl-graph", "compile", "compile-max-autotune", "engine-fp16",
            "engine-fp32", "engine-fp16-graph", "engine-fp32-graph", "engine-fp16-fused", "engine-fp16-fused-graph",
            "engine-fp16-cudnn-graph", "cuda-fp16", "cuda-fp16-graph", "cuda-fp32", "auto-fp16-graph", "native-fp32",
            "native-bf16",
            "cpu-fp32", "onnxruntime-cpu-fp32", "openvino-cpu-fp32", "openvino-cpu-default", "compile-cpu-fp32"]
CPU_ONLY = ("native-fp32", "native-bf16", "cpu-fp32", "onnxruntime-cpu-fp32", "openvino-cpu-fp32", "openvino-cpu-default",
            "compile-cpu-fp32")
SLOW = ("compile-max-autotune",)  # left out unless named
COMPILERS = ("compile", "compile-max-autotune", "compile-cpu-fp32")  # run after every other entry (see ordered())
DEFAULT_BANDWIDTH = 2.95e12  # H100 device-to-device copy, read + write; a GPU run measures its own
NOT_QUICK = ("compile", "compile-max-autotune", "onnxruntime-cpu-fp32", "openvino-cpu-fp32", "openvino-cpu-default",
             "compile-cpu-fp32")  # minutes to build, or an export
SIZES = ["64x64", "180x320", "270x480"]
QUICK_CPU_SIZE = (64, 64)  # --quick without a GPU: the smallest of SIZES (HR 256x256)


def default_matrix() -> dict:
    """What ``latency.py`` with no arguments runs."""
    return dict(models=["msfin-x4", "msfin-s-x4"], backends=[b for b in BACKENDS if b not in SLOW],
                sizes=[parse_size(s) for s in SIZES], batch=[1, 8])


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 180x320 (LR height x width), got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def floor_bytes(model: msfin_fast.MSFIN, n: int, h: int, w: int, elem: int) -> int:
    """One read and one write of every RRCAB pass's activation, at the network's resolutions."""
    H, W = 4 * h, 4 * w
    total = 0
    for launch in P.build_plan(model).launches:
        if isinstance(launch, P.RRCABPass):  # the floor counts the passes' activations
            t = launch.src.t
            total += 2 * n * (H // t.div) * (W // t.div) * t.channels * elem
    return total


def flops_per_pixel(model: msfin_fast.MSFIN) -> float:
    """Convolution FLOPs (a multiply-add is two) per output pixel, counted by PyTorch on a small input
    (the count is linear in the pixels)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, 8, 8, device=model.head.weight.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.float()(x, check_finite=False)
    return counter.get_total_flops() / (8 * model.config.scale) ** 2


def load_model(preset: str, device: str) -> tuple[msfin_fast.MSFIN, str]:
    """The model and which weights it holds: latency does not depend on their values."""
    try:
        return msfin_fast.load_pretrained(preset, device=device, allow_download=False), "released"
    except msfin_fast.MSFINError:
        torch.manual_seed(0)
        return msfin_fast.MSFIN(preset).to(device).eval(), "random (seed 0)"


class Graphed:
    """``fn`` replayed from a CUDA graph captured on the first call of each input shape."""

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in self.graphs:
            static_x = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (cuDNN picks its algorithms)
                for _ in range(2):
                    self.fn(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = self.fn(static_x)
            self.graphs[key] = (graph, static_x, static_y)
        graph, static_x, static_y = self.graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_y


_ONNX_FILES: dict = {}  # MSFINConfig → exported file, shared by every shape of a run
_ONNX_DIR = None  # a TemporaryDirectory, removed when the process ends


def onnx_file(model: msfin_fast.MSFIN) -> Path | str:
    """The model exported once per run (a path), or why it could not be."""
    import tempfile

    global _ONNX_DIR
    path = _ONNX_FILES.get(model.config)
    if path is None:
        _ONNX_DIR = _ONNX_DIR or tempfile.TemporaryDirectory(prefix="msfin-onnx-")
        try:
            path = Path(_ONNX_DIR.name) / f"model-{len(_ONNX_FILES)}.onnx"
            msfin_fast.export_onnx(model, path, check=False)
        except (msfin_fast.MSFINError, ImportError) as exc:
            return f"export failed ({exc})"
        _ONNX_FILES[model.config] = path
    return path


class Peer:
    """A peer's callable and the settings it runs with (recorded in the row)."""

    def __init__(self, fn, settings: str):
        self.fn, self.settings = fn, settings

    def __call__(self, x):
        return self.fn(x)


def onnxruntime_peer(model: msfin_fast.MSFIN):
    try:
        import onnxruntime as ort
    except ImportError:
        return "ONNX Runtime is not installed (pip install 'msfin_fast[onnx]')", None
    path = onnx_file(model)
    if isinstance(path, str):
        return path, None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def call(x):
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    settings = (f"ONNX Runtime {ort.__version__}, CPUExecutionProvider, {options.intra_op_num_threads} intra-op "
                "threads, ORT_ENABLE_ALL, dynamic shapes, fp32")
    return Peer(call, settings), torch.float32


def openvino_peer(model: msfin_fast.MSFIN, shape: tuple, precision: str | None):
    """OpenVINO on the exported ONNX file, compiled for ``shape`` (static shapes are its best case)."""
    try:
        import openvino as ov
    except ImportError:
        return "OpenVINO is not installed (pip install openvino)", None
    path = onnx_file(model)
    if isinstance(path, str):
        return path, None
    core = ov.Core()
    ov_model = core.read_model(str(path))
    ov_model.reshape({ov_model.inputs[0].any_name: list(shape)})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()
    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    used = used.get_type_name() if hasattr(used, "get_type_name") else str(used)

    def call(x):
        return torch.from_numpy(request.infer({0: x.numpy()})[0].copy())
    settings = (f"OpenVINO {ov.get_version().split('-')[0]}, CPU, LATENCY hint, {torch.get_num_threads()} threads, "
                f"static shape {'x'.join(map(str, shape))}, precision hint {precision or 'default'} "
                f"(runs in {used})")
    return Peer(call, settings), torch.float32


def native_isa() -> str:
    from msfin_fast.engine.backends import native

    return native.isa() or "none"


def cpu_peer(backend: str, model: msfin_fast.MSFIN, shape: tuple, cuda: bool):
    """``build`` for the CPU entries (ours and the peers)."""
    if cuda:
        return f"{backend} runs on the CPU", None
    if backend == "onnxruntime-cpu-fp32":
        return onnxruntime_peer(model)
    if backend.startswith("openvino"):
        return openvino_peer(model, shape, "f32" if backend.endswith("fp32") else None)
    if backend == "compile-cpu-fp32":
        m = torch.compile(copy.deepcopy(model).float().to(memory_format=torch.channels_last), dynamic=False)
        settings = (f"torch.compile (default mode, inductor) of the reference, fp32 channels_last, static shapes, "
                    f"{torch.get_num_threads()} threads")
        return Peer(lambda x: m(x.contiguous(memory_format=torch.channels_last), check_finite=False), settings), torch.float32
    if backend in ("cpu-fp32", "native-fp32", "native-bf16"):
        name, precision = backend.split("-")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        try:
            engine = msfin_fast.optimize(model, dtype=dtype, backend=name, output_dtype=torch.float32)
        except msfin_fast.MSFINError as exc:
            return f"cannot run here ({exc})", None
        stored = ", addends stored in bf16, fp32 image" if precision == "bf16" else ""
        settings = (f"msfin_fast {name} backend, {precision}{stored}, {torch.get_num_threads()} threads"
                    + (f", {engine.backend_object.__module__.rsplit('.', 1)[-1]} kernels with {native_isa()}" if name == "native" else
                       ", PyTorch (oneDNN) channels_last"))
        return Peer(lambda x: engine(x, check_finite=False), settings), torch.float32
    raise ValueError(f"unknown CPU backend {backend!r}")


def build(backend: str, model: msfin_fast.MSFIN, shape: tuple = (1, 3, 64, 64)):
    """A callable for ``backend`` and the dtype its input takes, or a reason it cannot run here.
    ``shape`` is the input's (for peers that compile per shape)."""
    cuda = model.head.weight.is_cuda
    if backend == "ref-fp32":
        return model.float(), torch.float32
    if backend in CPU_ONLY:
        return cpu_peer(backend, model, shape, cuda)
    if backend.startswith("ref-fp16-cl") or backend.startswith("compile"):
        if not cuda:
            return "fp16 convolutions on the CPU are not a serving configuration", None
        m = copy.deepcopy(model).half().to(memory_format=torch.channels_last)
        if backend == "compile":
            m = torch.compile(m, dynamic=False)
        elif backend == "compile-max-autotune":
            m = torch.compile(m, mode="max-autotune", dynamic=False)

        def call(x):  # no input NaN test: a host sync per call, and not capturable in a CUDA graph
            return m(x.contiguous(memory_format=torch.channels_last), check_finite=False)
        return (Graphed(call) if backend.endswith("-graph") else call), torch.float16
    dtype = torch.float16 if "fp16" in backend else torch.float32
    graphs = backend.endswith("-graph")
    if graphs and not cuda:
        return "CUDA graphs need a GPU", None
    if not cuda and os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton's interpreter checks the kernels, it does not time them", None
    kind = "cuda" if backend.startswith("cuda") else "triton" if backend.startswith("engine") else "auto"
    try:
        engine = msfin_fast.optimize(model, dtype=dtype, backend=kind, cuda_graphs=graphs,
                                     fuse_rrcab="-fused" in backend, conv_kernels="-cudnn" not in backend)
    except msfin_fast.MSFINError as exc:
        return f"cannot run here ({exc})", None
    if engine.backend == "reference":
        return f"engine falls back to the reference here ({engine.fallback_reason})", None
    return (lambda x: engine(x, check_finite=False)), dtype


def time_it(fn, x: torch.Tensor, warmup: int, iters: int) -> tuple[list[float], int | None]:
    """Times of ``iters`` calls after ``warmup`` calls, and (on CUDA) the bytes allocated at the
    peak beyond what was allocated before the first call."""
    cuda = x.is_cuda
    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return times, peak


def max_error(fn, x: torch.Tensor, want: torch.Tensor) -> float:
    """max |Δ| of ``fn(x)`` against ``want`` on the 0–255 scale."""
    with torch.no_grad():
        return (fn(x).float() - want).abs().max().item()


def cpu_name() -> str:
    """The CPU's model, cores and vector extensions (from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("cpu", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2", "fma") if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs" + (f" ({', '.join(isa)})" if isa else "")


def environment(device: str, argv: list[str]) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["latency.py"] + argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "msfin_fast": msfin_fast.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def cell(text: str) -> str:
    """``text`` inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: list[dict]) -> str:
    lines = ["| model | LR size | batch | backend | median ms | p10–p90 ms | peak MiB | floor ms | % floor | GFLOP/s | max abs err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['backend']} | — | error: {cell(r['error'])} | | | | | |")
            continue
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['backend']} | — | skipped: {cell(r['skipped'])} | | | | | |")
            continue
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "—"
        err = f"{r['max_abs_err']:.3g}" if r.get("max_abs_err") is not None else "—"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch']} | {r['backend']} | {r['median_ms']:.3f} | "
            f"{r['p10_ms']:.3f}–{r['p90_ms']:.3f} | {peak} | {r['floor_ms']:.3f} | {100 * r['floor_ms'] / r['median_ms']:.0f}% | "
            f"{r.get('gflops', float('nan')):.1f} | {err} |"
        )
    settings = {r["backend"]: r["settings"] for r in results if r.get("settings")}
    if settings:
        lines += ["", "Settings:", ""] + [f"- {b}: {text}" for b, text in settings.items()]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot (pip install matplotlib)", file=sys.stderr)
        return False
    done = [r for r in results if "median_ms" in r]
    groups = sorted({(r["model"], r["batch"]) for r in done})
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 4), squeeze=False)
    for ax, (model, batch) in zip(axes[0], groups):
        rows = [r for r in done if r["model"] == model and r["batch"] == batch]
        sizes = sorted({r["size"] for r in rows}, key=lambda s: parse_size(s)[0] * parse_size(s)[1])
        for backend in dict.fromkeys(r["backend"] for r in rows):
            ys = {r["size"]: r["median_ms"] for r in rows if r["backend"] == backend}
            ax.plot([s for s in sizes if s in ys], [ys[s] for s in sizes if s in ys], marker="o", label=backend)
        floors = {r["size"]: r["floor_ms"] for r in rows}
        ax.plot(sizes, [floors[s] for s in sizes], "k--", label="floor")
        ax.set_yscale("log")
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("LR size")
        ax.set_ylabel("median latency (ms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


class Stopped(BaseException):
    """A signal (the GPU script's time limit sends SIGTERM) ends the run between two entries' files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def ordered(matrix: list[tuple]) -> list[tuple]:
    """``torch.compile`` entries last: a cold compile takes minutes per shape, and a run stopped
    during one keeps every other row."""
    return sorted(matrix, key=lambda entry: entry[1] in COMPILERS)  # stable: the rest keep their order


def describe(exc: BaseException) -> str:
    """One line for a table cell: the exception's type and the first line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 300 else text[:297] + "..."


def context_error(cuda: bool) -> str | None:
    """Why the CUDA context can no longer run anything, or None (always None on a CPU). After an
    illegal address or a launch failure every later CUDA call fails with the same (sticky) error; a
    failure of one backend's own (a Triton compile error, a wrong shape) leaves the context usable."""
    if not cuda:
        return None
    try:
        torch.cuda.synchronize()
        (torch.ones(1, device="cuda") + 1).item()
    except Exception as exc:  # noqa: BLE001 — whatever the driver raises, the context is gone
        return describe(exc)
    return None


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (the floor's
    unit): the median of ``iters`` copies of ``nbytes`` after two warm-up copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def resolve_bandwidth(value: str | None, cuda: bool) -> tuple[float, str]:
    """(bytes/s, where it came from) for ``--bandwidth``: a number, a file holding one (what
    ``gpu_check.py``'s environment stage writes), or nothing (measured here on a GPU)."""
    if value is not None:
        try:
            return float(value), "given"
        except ValueError:
            pass
        path = Path(value)
        try:
            return float(path.read_text().split()[0]), f"measured by the environment stage ({path.name})"
        except (OSError, ValueError, IndexError) as exc:
            print(f"--bandwidth {value}: not a number nor a file holding one ({exc}); measuring instead",
                  file=sys.stderr, flush=True)
    if cuda:
        return copy_bandwidth(), "measured here (device-to-device copy of 1 GiB)"
    return DEFAULT_BANDWIDTH, "assumed (H100 copy bandwidth; the floor is a GPU figure)"


def gpu_clocks() -> str:
    """What nvidia-smi says of the clocks, temperature, power and throttling right now."""
    fields = "clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit"
    for extra in (",clocks_event_reasons.active", ",clocks_throttle_reasons.active", ""):
        try:
            p = subprocess.run(["nvidia-smi", f"--query-gpu={fields}{extra}", "--format=csv"],
                               capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable: {exc}"
        if p.returncode == 0:
            return p.stdout.strip().replace("\n", " / ")
    return f"unavailable: {(p.stdout + p.stderr).strip()[:200]}"


def write_results(out_dir: Path, stem: str, env: dict, results: list[dict], progress: dict,
                  quick_note: str | None) -> None:
    """Both files, each replaced atomically, with signals held off while they are written: a run
    stopped or killed at any moment leaves valid files holding every row finished before."""
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {"environment": env, "progress": progress, "results": results}
        _atomic(out_dir / f"{stem}.json", json.dumps(data, indent=1))
        _atomic(out_dir / f"{stem}.md",
                f"# Latency ({env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']})\n\n"
                f"Command: `python benchmarks/{env['command']}`\n\n" + (f"{quick_note}\n\n" if quick_note else "")
                + f"Floor at {env['bandwidth'] / 1e12:.2f} TB/s ({env['bandwidth_source']}).\n\n"
                + (f"Threads: {env['threads']}. Protocol: {env['protocol']}. Load: {env['load']}.\n\n"
                   if "protocol" in env else "")
                + "".join(f"GPU {when}: {env[key]}\n\n" for when, key in (("before", "clocks_before"),
                                                                          ("after", "clocks_after")) if key in env)
                + progress_line(progress) + "\n\n" + markdown(results))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def progress_line(progress: dict) -> str:
    done, total, state = progress["done"], progress["total"], progress["state"]
    if state == "finished":
        return f"All {total} entries done."
    if state == "running":
        return (f"{done} of {total} entries done; running {progress['current']} when this was written "
                "(if the run is over, it was killed there).")
    return f"{done} of {total} entries done; {state}."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = default_matrix()
    ap.add_argument("--models", nargs="+", default=defaults["models"], choices=list(msfin_fast.PRESETS))
    ap.add_argument("--sizes", nargs="+", type=parse_size, default=None, help=f"LR sizes (default {' '.join(SIZES)})")
    ap.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 8)")
    ap.add_argument("--backends", nargs="+", default=None, choices=BACKENDS)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bandwidth", default=None, metavar="BYTES_PER_S|FILE",
                    help="bytes/s the floor assumes, or a file holding it (default: measured on a GPU, "
                         f"{DEFAULT_BANDWIDTH:.3g} on a CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="defaults to 180x320, batch 1, no torch.compile and no ONNX Runtime, 10 iterations; "
                         "on a CPU 64x64, 3 iterations")
    ap.add_argument("--check", action="store_true",
                    help="also record each backend's max |Δ| against the true-fp32 reference")
    ap.add_argument("--warm-only", action="store_true",
                    help="compile and capture every entry once (fills Triton's and Inductor's caches); time nothing")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="time the backends of each (model, size, batch) interleaved, round by round "
                         "(default: on a CPU; not with --warm-only)")
    ap.add_argument("--settle", type=int, default=1,
                    help="untimed calls before each timed one when interleaved (default 1)")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="run N busy-looping processes beside the benchmark (the under-load measurement)")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="file stem for the results (default: latency-<device>-<date>)")
    args = ap.parse_args(argv)
    quick_note = None
    if args.quick and args.device.startswith("cuda"):
        args.sizes, args.batch = args.sizes or [(180, 320)], args.batch or [1]
        args.iters, args.warmup = min(args.iters, 10), min(args.warmup, 3)
    elif args.quick:  # MSFIN at 180x320 takes seconds per call on a CPU: 10 of them would be minutes
        args.sizes, args.batch = args.sizes or [QUICK_CPU_SIZE], args.batch or [1]
        args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
        quick_note = (f"--quick on the CPU: LR {'/'.join(f'{h}x{w}' for h, w in args.sizes)}, batch "
                      f"{'/'.join(map(str, args.batch))}, {args.warmup} warm-up + {args.iters} timed calls "
                      f"(on a GPU: 180x320, 3 + 10)")
        print(quick_note, flush=True)
    args.sizes = args.sizes or defaults["sizes"]
    args.batch = args.batch or defaults["batch"]
    backends = args.backends or [b for b in defaults["backends"] if not (args.quick and b in NOT_QUICK)]
    if any(b < 1 for b in args.batch):
        ap.error("--batch values must be >= 1")
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    matrix = ordered([(preset, backend, (h, w), n) for preset in args.models for backend in backends
                      for h, w in args.sizes for n in args.batch])
    if args.dry_run:
        for preset, backend, (h, w), n in matrix:
            print(f"would {'warm' if args.warm_only else 'time'} {preset} {h}x{w} b{n} {backend}")
        print(f"{len(matrix)} entries on {args.device}")
        return 0
    cuda = args.device.startswith("cuda")
    if args.interleave is None:
        args.interleave = not cuda and not args.warm_only
    if args.interleave and (cuda or args.warm_only):
        ap.error("--interleave times CPU backends (not with --warm-only or on a GPU)")
    if args.settle < 0 or args.busy < 0:
        ap.error("--settle and --busy must be >= 0")
    if cuda:
        torch.backends.cudnn.benchmark = True
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run(args, matrix, cuda, quick_note, sys.argv[1:] if argv is None else argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args, matrix: list[tuple], cuda: bool, quick_note: str | None, argv: list[str]) -> int:
    """Time every entry of ``matrix``, rewriting the JSON and the markdown after each one. An entry
    that raises records its error and the run goes on; after an error that leaves the CUDA context
    unusable, the remaining rows say so; a signal ends the run with the files saying where."""
    env = environment("cuda" if cuda else args.device, argv)
    env["bandwidth"], env["bandwidth_source"] = resolve_bandwidth(args.bandwidth, cuda)
    env["weights"] = {}
    env["flops_per_pixel"] = {}
    env["threads"] = torch.get_num_threads()
    env["protocol"] = (f"interleaved: {args.warmup} warm-up calls each, then {args.iters} rounds of {args.settle} untimed "
                       "+ 1 timed call of each backend" if args.interleave else
                       f"one backend at a time: {args.warmup} warm-up + {args.iters} timed calls")
    env["load"] = f"{args.busy} busy-looping processes beside the run" if args.busy else "none"
    if quick_note:
        env["note"] = quick_note
    if cuda:
        env["clocks_before"] = gpu_clocks()
    stem = args.name or f"latency-{args.device}-{env['date'][:10]}"
    results: list[dict] = []
    progress = {"done": 0, "total": len(matrix), "state": "running", "current": None}
    models: dict = {}
    dead: str | None = None  # why the CUDA context cannot run anything more
    status = 0
    save = lambda: write_results(args.out_dir, stem, env, results, progress, quick_note)  # noqa: E731
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        if args.interleave:
            return run_interleaved(args, matrix, env, results, progress, models, save, stem)
        for preset, backend, (h, w), n in matrix:
            label = f"{preset} {h}x{w} b{n} {backend}"
            row = {"model": preset, "size": f"{h}x{w}", "batch": n, "backend": backend}
            progress["current"] = label
            save()  # a run killed during this entry says which one it was
            results.append(row)
            if dead is not None:
                row["skipped"] = f"not run: the CUDA context failed earlier ({dead})"
            else:
                try:
                    said = measure(args, row, preset, backend, h, w, n, models, env, cuda)
                except Stopped:
                    raise
                except Exception as exc:  # noqa: BLE001 — one backend's failure is that row's result
                    if cuda and isinstance(exc, torch.cuda.OutOfMemoryError):
                        row["skipped"] = "out of memory"
                    else:
                        row["error"] = describe(exc)
                        traceback.print_exc()  # the whole story goes to the log, one line to the table
                        status = 1
                        dead = context_error(cuda)
                finally:
                    gc.collect()
                    if cuda and dead is None:
                        torch.cuda.empty_cache()
            if "error" in row or "skipped" in row:
                said = f"error: {row['error']}" if "error" in row else f"skipped ({row['skipped']})"
            print(f"{label}: {said}", flush=True)
            progress["done"] += 1
            progress["current"] = None
        progress["state"] = "finished"
    except Stopped as stop:
        row = results[-1] if results and progress["current"] else None
        if row is not None and "median_ms" not in row and "skipped" not in row and "error" not in row:
            row["error"] = f"stopped by signal {stop.signum} during this entry"
        progress["state"] = f"stopped by signal {stop.signum}" + (
            f" during {progress['current']}" if progress["current"] else " between two entries")
        print(f"latency.py: {progress['state']}", file=sys.stderr, flush=True)
        status = 128 + stop.signum
    finally:
        for process in busy:
            process.kill()
            process.wait()
    if cuda:
        env["clocks_after"] = gpu_clocks() if dead is None else f"not read: {dead}"
    save()
    table = markdown(results)
    plotted = progress["state"] == "finished" and not args.warm_only and plot(results, args.out_dir / f"{stem}.png")
    print(table)
    print(f"wrote {args.out_dir / stem}.json, .md" + (", .png" if plotted else ""))
    return status


def run_interleaved(args, matrix, env, results, progress, models, save, stem) -> int:
    """The CPU protocol: the entries of each (model, size, batch) timed together (measure_group)."""
    groups: dict = {}
    for preset, backend, size, n in matrix:
        groups.setdefault((preset, size, n), []).append(backend)
    status = 0
    try:
        for (preset, (h, w), n), backends in groups.items():
            rows = [{"model": preset, "size": f"{h}x{w}", "batch": n, "backend": b} for b in backends]
            progress["current"] = f"{preset} {h}x{w} b{n} ({', '.join(backends)})"
            save()
            results.extend(rows)
            try:
                measure_group(args, rows, preset, h, w, n, models, env)
            finally:
                gc.collect()
            for row in rows:
                status = 1 if "error" in row else status
                text = (said(row) if "median_ms" in row else f"error: {row['error']}" if "error" in row
                        else f"skipped ({row['skipped']})")
                print(f"{preset} {h}x{w} b{n} {row['backend']}: {text}", flush=True)
            progress["done"] += len(rows)
            progress["current"] = None
        progress["state"] = "finished"
    except Stopped as stop:
        for row in results:
            if "median_ms" not in row and "skipped" not in row and "error" not in row:
                row["error"] = f"stopped by signal {stop.signum} during this entry"
        progress["state"] = f"stopped by signal {stop.signum} during {progress['current']}"
        print(f"latency.py: {progress['state']}", file=sys.stderr, flush=True)
        status = 128 + stop.signum
    save()
    print(markdown(results))
    plotted = progress["state"] == "finished" and plot(results, args.out_dir / f"{stem}.png")
    print(f"wrote {args.out_dir / stem}.json, .md" + (", .png" if plotted else ""))
    return status


def finish(row: dict, times: list[float], peak, model, n: int, h: int, w: int, elem: int, env: dict) -> None:
    """The row's statistics from its timings."""
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    median = statistics.median(times)
    row.update(median_ms=median, p10_ms=q[0], p90_ms=q[-1], peak_bytes=peak,
               floor_ms=floor_bytes(model, n, h, w, elem) / env["bandwidth"] * 1e3,
               gflops=env["flops_per_pixel"][row["model"]] * n * 16 * h * w / (median * 1e-3) / 1e9)


def said(row: dict) -> str:
    err = f", max |Δ| {row['max_abs_err']:.3g}" if "max_abs_err" in row else ""
    peak_text = f", peak {row['peak_bytes'] / 2**20:.0f} MiB" if row.get("peak_bytes") is not None else ""
    return f"{row['median_ms']:.3f} ms{peak_text}{err}"


def measure_group(args, rows: list[dict], preset: str, h: int, w: int, n: int, models: dict, env: dict) -> None:
    """The rows of one (model, size, batch) on a CPU, timed interleaved: build and warm up every
    backend, then ``iters`` rounds of one untimed and one timed call of each. A backend that fails
    to build or to run gets its error in its row; the others go on."""
    if preset not in models:
        models[preset], env["weights"][preset] = load_model(preset, args.device)
        env["flops_per_pixel"][preset] = flops_per_pixel(models[preset])
    model = models[preset]
    g = torch.Generator(device=args.device).manual_seed(h * w + n)
    x = torch.rand(n, 3, h, w, device=args.device, generator=g) * 255
    live = {}
    for row in rows:
        try:
            fn, dtype = build(row["backend"], model, (n, 3, h, w))
            if dtype is None:
                row["skipped"] = fn
                continue
            if isinstance(fn, Peer):
                row["settings"] = fn.settings
            xd = x.to(dtype)
            with torch.no_grad():
                for _ in range(max(1, args.warmup)):
                    fn(xd)
            live[row["backend"]] = (row, fn, xd, [])
        except Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 — one backend's failure is that row's result
            row["error"] = describe(exc)
            traceback.print_exc()
    with torch.no_grad():
        for _ in range(args.iters):
            for name, (row, fn, xd, times) in list(live.items()):
                try:
                    for _ in range(args.settle):
                        fn(xd)
                    t0 = time.perf_counter()
                    fn(xd)
                    times.append((time.perf_counter() - t0) * 1e3)
                except Stopped:
                    raise
                except Exception as exc:  # noqa: BLE001
                    row["error"] = describe(exc)
                    traceback.print_exc()
                    del live[name]
    for row, fn, xd, times in live.values():
        if args.check:
            with true_fp32(), torch.no_grad():
                want = model(x.float())
            row["max_abs_err"] = max_error(fn, xd, want)
        finish(row, times, None, model, n, h, w, 4, env)


def measure(args, row: dict, preset: str, backend: str, h: int, w: int, n: int, models: dict, env: dict,
            cuda: bool) -> str | None:
    """Fill ``row`` for one entry (its timings, peak memory, floor and, with ``--check``, max |Δ|),
    or say in it why the entry was skipped; return the line to print for a timed entry."""
    if preset not in models:
        models[preset], env["weights"][preset] = load_model(preset, args.device)
        env["flops_per_pixel"][preset] = flops_per_pixel(models[preset])
    model = models[preset]
    fn, dtype = build(backend, model, (n, 3, h, w))  # fresh per shape: its memory is its own
    if dtype is None:
        row["skipped"] = fn
        return None
    if isinstance(fn, Peer):
        row["settings"] = fn.settings
    g = torch.Generator(device=args.device).manual_seed(h * w + n)
    x = (torch.rand(n, 3, h, w, device=args.device, generator=g) * 255).to(dtype)
    if args.warm_only:
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(x)
        if cuda:
            torch.cuda.synchronize()
        row["skipped"] = f"warm-up only ({time.perf_counter() - t0:.1f} s)"
        return None
    times, peak = time_it(fn, x, args.warmup, args.iters)
    if args.check:
        with true_fp32(), torch.no_grad():
            want = model(x.float())
        row["max_abs_err"] = max_error(fn, x, want)
    elem = 2 if dtype == torch.float16 else 4
    finish(row, times, peak, model, n, h, w, elem, env)
    return said(row)


if __name__ == "__main__":
    sys.exit(main())
