"""A first GPU run that cannot waste its minutes: build, check, time and keep every output.

    python3 benchmarks/gpu_check.py OUT              # on the GPU machine, in the repository root
    python3 benchmarks/gpu_check.py OUT --dry-run    # anywhere: the same control flow, no GPU needed
    python3 benchmarks/gpu_check.py --timeline       # the predicted start and end of every stage

The GPU machine has no network and no ``../shared``: copy the released weights and the test images
into the git-ignored ``shared/`` first (``mkdir -p shared && cp -r ../shared/weights ../shared/data
shared/``); the stages read them from there. Everything comes back in OUT as at most five files:

  summary.txt       one line per stage: status, exit code, start, wall time, limit, pytest tally
  environment.txt   GPU, driver, clocks, free memory, copy bandwidth, versions of python/torch/triton/
                    CUDA, the nvcc found and whether Python.h exists
  logs.txt          every stage's output (long logs keep their head and tail)
  latency.md        the latency tables (rewritten after every entry of a latency run)
  artifacts.tar.gz  the whole work folder: raw logs, JUnit XML, latency JSON and plots

The stages run in order of value: set-up; a short warm-up (the CUDA extension's build, the kernel
compiles the latency run needs, the engine's correctness tests beside them); the latency table
alone on the machine, then the 4K run; the other correctness tests; the sanitizers last (memcheck,
then racecheck and synccheck only if the budget allows). Stages are separate processes, in
parallel where they are independent (a CUDA fault stays in its stage), each under its own time
limit and with its share of the cores (OMP, MKL and Inductor's compile threads); pytest stages
have a per-test time limit and list their slowest tests. Once the overall budget (default 530 s)
is spent, running stages are stopped and later ones skipped. OUT is re-packed whenever a stage
starts or ends, so a run killed from outside still returns everything that finished and says what
was running. ``--dry-run`` runs the same scheduler with commands that need no GPU (pytest
selections are collected, latency matrices printed, install and build echoed), which is how CI
checks this script; ``--timeline`` plays the same scheduler on the predicted durations. Exit
status: 0 when every stage passed, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BUDGET_S = 530.0
MIN_STAGE_S = 10.0  # a stage is not started with less of the budget left than this
LOG_KEEP = (60_000, 140_000)  # bytes of a long log kept from its head and its tail in logs.txt
OUT_FILES = ("summary.txt", "environment.txt", "logs.txt", "latency.md", "artifacts.tar.gz")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")
CUDA_BIN = Path("/usr/local/cuda/bin")  # where the CUDA toolkit's tools are when they are not on PATH

# The latency runs: MSFIN at 720p, 1080p and 256² output, batch 1, every engine variant next to its
# peers (eager fp16 channels-last, the same under a CUDA graph, torch.compile's default mode, which
# latency.py runs after everything else); then 4K output at batch 8 with its peak memory.
# compile-max-autotune takes minutes: not here.
LATENCY_RUNS = [
    dict(name="latency", models=["msfin-x4"], sizes=[(180, 320), (270, 480), (64, 64)], batch=[1], warmup=5,
         iters=30, backends=["ref-fp32", "ref-fp16-cl", "ref-fp16-cl-graph", "engine-fp16", "engine-fp16-graph",
                             "engine-fp16-fused", "engine-fp16-fused-graph", "engine-fp16-cudnn-graph",
                             "engine-fp32-graph", "cuda-fp16", "cuda-fp16-graph", "auto-fp16-graph", "compile"]),
    dict(name="latency-4k", models=["msfin-x4"], sizes=[(540, 960)], batch=[8], warmup=2, iters=5,
         backends=["engine-fp16-graph", "engine-fp16-fused-graph", "cuda-fp16-graph", "ref-fp16-cl"]),
]
# The warm-up before them: every Triton kernel variant the latency runs launch, compiled once by
# processes side by side (Triton's on-disk cache then serves the timed run). The kernels take no
# shape specialisation (benchmarks/NOTES.md, "Compiles"), so one size warms every size; the cuda-*
# backends launch the same Triton kernels around the extension's RRCAB kernel (built ahead). Not
# warmed: torch.compile (latency.py runs it last, alone, with every core) and auto's choice
# (measured in the timed run, on an idle GPU, not here beside other stages).
WARM_RUNS = {
    "warm-engine": ["engine-fp16", "engine-fp16-graph", "engine-fp32-graph"],
    "warm-fused": ["engine-fp16-fused", "engine-fp16-fused-graph", "engine-fp16-cudnn-graph"],
}


@dataclasses.dataclass
class Stage:
    name: str
    command: list[str]
    timeout: float
    predicted: float  # seconds of wall time predicted on an H200 machine (benchmarks/NOTES.md)
    after: tuple[str, ...] = ()  # start once these have ended, whatever their outcome
    needs: tuple[str, ...] = ()  # ... and skip unless these passed
    exclusive: bool = False  # alone on the machine: after every earlier stage, nothing beside it
    cores: int | None = None  # CPU threads it may use (OMP, MKL, Inductor's compile workers, ninja)
    min_budget: float = 0.0  # skipped unless this much of the overall budget is left when it could start
    env: dict = dataclasses.field(default_factory=dict)
    dry: list[str] | None = None  # the command under --dry-run (default: the command itself)
    status: str = "pending"  # pending, running, passed, failed, timeout, skipped, killed
    returncode: int | None = None
    started: float | None = None  # seconds after the run's start
    wall: float | None = None
    limit: float | None = None
    note: str = ""

    @property
    def ended(self) -> bool:
        return self.status not in ("pending", "running")


def pytest_cmd(*args: str, per_test: int = 120) -> list[str]:
    """pytest with a per-test time limit (pytest-timeout: one hung test cannot eat its stage) and
    the slowest tests listed (where the stage's time went)."""
    return [PY, "-m", "pytest", *args, "-q", "-rfEs", "--tb=short", "-p", "no:cacheprovider", "-o", "addopts=",
            f"--timeout={per_test}", "--durations=15"]


def latency_cmd(run: dict, work: Path, *extra: str, name: str | None = None, backends: list[str] | None = None,
                sizes: list[tuple[int, int]] | None = None) -> list[str]:
    return [PY, "benchmarks/latency.py", "--models", *run["models"],
            "--sizes", *[f"{h}x{w}" for h, w in sizes or run["sizes"]], "--batch", *map(str, run["batch"]),
            "--backends", *(backends or run["backends"]), "--warmup", str(run["warmup"]), "--iters", str(run["iters"]),
            "--out-dir", str(work), "--name", name or run["name"], *extra]


def stages(work: Path, cpus: int | None = None) -> list[Stage]:
    """The GPU run, in order of value: a short warm-up, the latency table, the 4K run, the
    correctness tests, the sanitizers. ``after``/``needs`` name earlier stages only; predicted
    seconds are for an H200 machine with 16 cores (benchmarks/NOTES.md has the timeline)."""
    cpus = cpus or os.cpu_count() or 2
    share = lambda n: max(1, cpus // n)  # noqa: E731 — cores each of n stages side by side gets
    junit = lambda name: f"--junitxml={work / (name + '.xml')}"  # noqa: E731
    engine = "tests/test_engine_gpu.py::test_engine_matches_reference"
    psnr = "tests/test_engine_gpu.py::test_engine_keeps_the_paper_psnr"
    latency_cache = {"MSFIN_CACHE_DIR": str(work / "cache-latency")}  # auto measures its choice alone
    bandwidth = str(work / "bandwidth.txt")  # written by the env stage
    # Phase 1: set-up (env and install side by side).
    out = [
        Stage("env", [PY, "benchmarks/gpu_check.py", "--environment", str(work / "environment.txt")], 45, 10,
              cores=share(2)),
        Stage("install", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-q",
                          "-e", "."], 60, 15, env={"MSFIN_CUDA_EXT": "0"}, cores=share(2)),
    ]
    # Phase 2: the warm-up, 7 stages side by side: the extension's build, the kernel compiles the
    # latency run needs, and the engine's correctness tests (which compile most of the same kernels).
    # Short limits: the latency table waits for all of them.
    build = min(4, share(4))  # nvcc for 4 files, one target each
    warm = max(1, (cpus - build) // 6)
    out.append(Stage("cuda-build", [PY, "setup.py", "-q", "build_ext", "--inplace", "-j", str(build)], 120, 40,
                     after=("install",), env={"MSFIN_CUDA_EXT": "1"}, cores=build))
    for name, backends in WARM_RUNS.items():
        out.append(Stage(name, latency_cmd(LATENCY_RUNS[0], work, "--warm-only", name=name, backends=backends,
                                           sizes=[(180, 320)]), 90, 45, after=("install",), env=latency_cache,
                         cores=warm))
    for preset in ("msfin-x4", "msfin-s-x4"):
        for dtype in ("fp16", "fp32"):
            name = f"engine-{preset.removesuffix('-x4')}-{dtype}"
            out.append(Stage(name, pytest_cmd(engine, "-k", f"{preset} and {dtype} and not cuda", junit(name)),
                             120, 60, after=("install",), cores=warm))
    # Phase 3: latency alone on the machine, then the 4K run. A stage stopped at its limit keeps its
    # rows (latency.py rewrites its files after every entry, torch.compile's entries last).
    out += [
        Stage("latency", latency_cmd(LATENCY_RUNS[0], work, "--check", "--bandwidth", bandwidth), 300, 190,
              exclusive=True, env=latency_cache, cores=cpus),
        Stage("latency-4k", latency_cmd(LATENCY_RUNS[1], work, "--bandwidth", bandwidth), 120, 45,
              exclusive=True, env=latency_cache, cores=cpus),
    ]
    # Phase 4: the other correctness tests, 4 side by side, kernels mostly compiled by now.
    tests = share(4)
    out += [
        Stage("psnr", pytest_cmd(psnr, "-k", "not cuda", junit("psnr"), per_test=240), 240, 150, cores=tests),
        Stage("kernels", pytest_cmd("tests/test_kernels.py", "tests/test_engine.py::test_triton_kernels_end_to_end",
                                    junit("kernels")), 200, 60, cores=tests),
        Stage("cuda-tests", pytest_cmd(
            "tests/test_cuda_ext.py", engine, psnr, "-k", "(test_cuda_ext and not compute_sanitizer and not host_sanitizers "
            "and not on_the_cpu) or (test_engine_gpu and cuda)", junit("cuda-tests")), 200, 60, needs=("cuda-build",),
            cores=tests),
        Stage("serving", pytest_cmd("tests/test_serving.py", "-m", "gpu", junit("serving")), 150, 30, cores=tests),
    ]
    # Phase 5: the sanitizers, memcheck first; racecheck and synccheck only if the budget allows.
    # PyTorch's caching allocator hands out 2 MiB segments, inside which an out-of-bounds access is
    # invisible to memcheck: every allocation goes to the driver instead.
    for tool, after, predicted in (("memcheck", "cuda-tests", 45), ("racecheck", "sanitize-memcheck", 90),
                                   ("synccheck", "sanitize-memcheck", 45)):
        out.append(Stage(f"sanitize-{tool}", pytest_cmd(f"tests/test_cuda_ext.py::test_compute_sanitizer_is_clean[{tool}]",
                                                        junit(f"sanitize-{tool}"), per_test=190),
                         200, predicted, after=(after,), needs=("cuda-build",), cores=tests,
                         min_budget=0 if tool == "memcheck" else predicted + 15,
                         env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    return out


def dry_command(stage: Stage) -> list[str]:
    """What ``--dry-run`` runs instead: collection for pytest, the matrix for latency, an echo else."""
    cmd = stage.command
    if cmd[1:3] == ["-m", "pytest"]:
        return cmd + ["--collect-only"]
    if cmd[1:2] == ["benchmarks/latency.py"]:
        return cmd + ["--dry-run"]
    if stage.name == "env":
        return cmd
    return [PY, "-c", "import sys; print('dry run: would run', sys.argv[1])", shlex.join(cmd)]


# ---------------------------------------------------------------------------------------------
# The scheduler


class Scheduler:
    def __init__(self, plan: list[Stage], out: Path, work: Path, *, budget: float = BUDGET_S,
                 max_parallel: int = 12, dry_run: bool = False, env: dict | None = None,
                 min_stage: float = MIN_STAGE_S):
        names = [s.name for s in plan]
        for i, s in enumerate(plan):
            unknown = [d for d in s.after + s.needs if d not in names[:i]]
            if unknown:
                raise ValueError(f"stage {s.name}: {unknown} must name earlier stages")
        self.plan, self.out, self.work = plan, out, work
        self.budget, self.max_parallel, self.dry_run, self.min_stage = budget, max_parallel, dry_run, min_stage
        self.env = dict(os.environ if env is None else env)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, object] = {}
        self.t0 = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.stop_signal: int | None = None  # set by request_stop, acted on by run's loop
        self.changed = False  # a stage started or ended since OUT was last packed

    def request_stop(self, signum: int) -> None:
        """Ask ``run`` to stop (safe from a signal handler: it only records the signal).

        The handler must not do the work itself: it runs between two bytecodes of whatever the loop
        was doing (writing the tarball, importing gzip, starting a stage's process) and would re-enter it.
        """
        if self.stop_signal is None:
            self.stop_signal = signum

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def by_name(self, name: str) -> Stage:
        return next(s for s in self.plan if s.name == name)

    def blocked(self, i: int, stage: Stage) -> str | None:
        """None when ``stage`` may start now; "skip: why" when it never will; else why it waits."""
        for dep in stage.needs:
            d = self.by_name(dep)
            if d.ended and d.status != "passed":
                return f"skip: needs {dep}, which {d.status}"
        if any(not self.by_name(d).ended for d in stage.after + stage.needs):
            return "waiting"
        earlier = self.plan[:i]
        if any(s.exclusive and not s.ended for s in earlier):
            return "waiting for an exclusive stage"
        if stage.exclusive and (any(not s.ended for s in earlier) or self.procs):
            return "waiting to run alone"
        if any(self.by_name(n).exclusive for n in self.procs):
            return "an exclusive stage is running"
        return None

    def stage_env(self, stage: Stage) -> dict:
        """The stage's environment: the run's, its own, and its share of the cores for every pool
        of threads it may start (so that stages side by side do not oversubscribe the CPU)."""
        env = dict(self.env, **stage.env, PYTHONUNBUFFERED="1")
        if stage.cores:
            for var in THREAD_VARS:
                env[var] = str(stage.cores)
        return env

    def start(self, stage: Stage) -> None:
        remaining = self.budget - self.elapsed()
        stage.limit = min(stage.timeout, remaining)
        command = (stage.dry or dry_command(stage)) if self.dry_run else stage.command
        log = open(self.work / f"{stage.name}.log", "w")
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        env = self.stage_env(stage)
        stage.started, stage.status = self.elapsed(), "running"
        try:
            self.procs[stage.name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                      stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.write(f"cannot start: {exc}\n")
            log.close()
            self.finish(stage, "failed", None, f"cannot start: {exc}")
            return
        self.logs[stage.name] = log
        print(f"[{self.elapsed():6.1f}s] start {stage.name} (limit {stage.limit:.0f} s)", flush=True)
        self.changed = True  # packed at the end of this tick: a run killed from outside says what was running

    def finish(self, stage: Stage, status: str, returncode: int | None, note: str = "") -> None:
        stage.status, stage.returncode, stage.note = status, returncode, note or stage.note
        if stage.started is not None:
            stage.wall = self.elapsed() - stage.started
        proc = self.procs.pop(stage.name, None)
        log = self.logs.pop(stage.name, None)
        if log is not None:
            if proc is not None and status in ("timeout", "killed"):
                log.write(f"\n[gpu_check: stopped after {stage.wall:.0f} s: {note}]\n")
            log.close()
        tally = pytest_tally(self.work / f"{stage.name}.log")
        print(f"[{self.elapsed():6.1f}s] {stage.name}: {status}" + (f" ({tally})" if tally else "")
              + (f" — {note}" if note else ""), flush=True)
        self.changed = True

    def stop(self, stage: Stage, status: str, note: str) -> None:
        proc = self.procs[stage.name]
        kill_group(proc)
        self.finish(stage, status, proc.returncode, note)

    def run(self) -> int:
        """Run the plan; 0 if every stage passed, 1 if not, 128 + signal after ``request_stop``."""
        self.pack()
        while any(not s.ended for s in self.plan):
            if self.stop_signal is not None:
                self.abort(f"gpu_check got signal {self.stop_signal}")
                return 128 + self.stop_signal
            for stage in [s for s in self.plan if s.status == "running"]:
                proc = self.procs[stage.name]
                if proc.poll() is not None:
                    self.finish(stage, "passed" if proc.returncode == 0 else "failed", proc.returncode)
                elif self.elapsed() - stage.started > stage.limit:
                    budget_hit = stage.limit < stage.timeout
                    self.stop(stage, "timeout",
                              "the overall budget was spent" if budget_hit else f"over its {stage.timeout:.0f} s limit")
            self.admit()
            if self.changed:  # once per tick, however many stages started or ended in it
                self.changed = False
                self.pack()
            time.sleep(0.05 if self.dry_run else 0.2)
        self.pack(final=True)
        return 0 if all(s.status == "passed" for s in self.plan) else 1

    def admit(self) -> None:
        """Start every pending stage that may start now, in plan order; skip those that never will."""
        for i, stage in enumerate(self.plan):
            if stage.status != "pending":
                continue
            why = self.blocked(i, stage)
            if why is not None and why.startswith("skip: "):
                self.finish(stage, "skipped", None, why[6:])
                continue
            left = self.budget - self.elapsed()
            if left < self.min_stage:
                self.finish(stage, "skipped", None, f"the {self.budget:.0f} s budget was spent")
                continue
            if why is None and left < stage.min_budget:
                self.finish(stage, "skipped", None, f"{left:.0f} s of the budget left, it needs {stage.min_budget:.0f}")
                continue
            if why is None and len(self.procs) < self.max_parallel and self.stop_signal is None:
                self.start(stage)

    def abort(self, why: str) -> None:
        for name in list(self.procs):
            self.stop(self.by_name(name), "killed", why)
        for stage in self.plan:
            if stage.status == "pending":
                stage.status, stage.note = "skipped", why
        self.pack(final=True)

    # Packing ---------------------------------------------------------------------------------

    def summary(self, final: bool) -> str:
        mode = "dry run (no GPU commands)" if self.dry_run else "GPU"
        lines = [f"msfin_fast GPU check, {mode}; started {self.started_at.isoformat(timespec='seconds')}; "
                 f"elapsed {self.elapsed():.0f} s of a {self.budget:.0f} s budget"
                 + ("" if final else "; still running"),
                 f"{'stage':<20} {'status':<8} {'rc':>4} {'start s':>7} {'wall s':>7} {'limit s':>7} {'pred s':>6}  "
                 "tally / note"]
        for s in self.plan:
            rc = "" if s.returncode is None else str(s.returncode)
            start = "" if s.started is None else f"{s.started:.0f}"
            wall = "" if s.wall is None else f"{s.wall:.1f}"
            limit = "" if s.limit is None else f"{s.limit:.0f}"
            detail = "; ".join(x for x in (pytest_tally(self.work / f"{s.name}.log"), s.note) if x)
            lines.append(f"{s.name:<20} {s.status:<8} {rc:>4} {start:>7} {wall:>7} {limit:>7} {s.predicted:>6.0f}  "
                         f"{detail}")
        counts = {}
        for s in self.plan:
            counts[s.status] = counts.get(s.status, 0) + 1
        lines.append("stages: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        return "\n".join(lines) + "\n"

    def pack(self, final: bool = False) -> None:
        """Rewrite OUT's five files from the work folder (each atomically)."""
        write(self.out / "summary.txt", self.summary(final).encode())
        env = self.work / "environment.txt"
        write(self.out / "environment.txt", env.read_bytes() if env.exists() else b"(not collected yet)\n")
        parts = []
        for s in self.plan:
            path = self.work / f"{s.name}.log"
            if not path.exists():
                continue
            data = path.read_bytes()
            head, tail = LOG_KEEP
            if len(data) > head + tail:
                data = data[:head] + f"\n[... {len(data) - head - tail} bytes cut ...]\n".encode() + data[-tail:]
            parts.append(f"===== {s.name}: {s.status}, rc {s.returncode}, {s.wall or 0:.1f} s =====\n".encode()
                         + data + b"\n")
        write(self.out / "logs.txt", b"".join(parts) or b"(no stage has started)\n")
        tables = [p.read_bytes() for p in sorted(self.work.glob("latency*.md"))]
        write(self.out / "latency.md", b"\n".join(tables) or b"(no latency run has finished)\n")
        tmp = self.out / ".artifacts.tar.gz.part"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.work.iterdir()):
                if path.is_file() and path.stat().st_size < 8 << 20:
                    tar.add(path, arcname=f"gpu-check/{path.name}")
        os.replace(tmp, self.out / "artifacts.tar.gz")


class Timeline(Scheduler):
    """The scheduler's own decisions played on predicted durations instead of processes: when
    each stage would start and end, and which would be skipped for want of budget."""

    def __init__(self, plan: list[Stage], *, budget: float = BUDGET_S, max_parallel: int = 12):
        copies = [dataclasses.replace(s, status="pending", returncode=None, started=None, wall=None, limit=None,
                                      note="") for s in plan]
        super().__init__(copies, Path(os.devnull), Path(os.devnull), budget=budget, max_parallel=max_parallel, env={})
        self.now = 0.0

    def elapsed(self) -> float:
        return self.now

    def start(self, stage: Stage) -> None:
        stage.limit = min(stage.timeout, self.budget - self.now)
        stage.started, stage.status = self.now, "running"
        self.procs[stage.name] = None

    def finish(self, stage: Stage, status: str, returncode: int | None, note: str = "") -> None:
        stage.status, stage.returncode, stage.note = status, returncode, note
        if stage.started is not None:
            stage.wall = self.now - stage.started
        self.procs.pop(stage.name, None)

    def pack(self, final: bool = False) -> None:
        pass

    def play(self) -> list[Stage]:
        """The plan with predicted ``started`` and ``wall``; a stage predicted past its limit times out."""
        while any(not s.ended for s in self.plan):
            self.admit()
            running = [s for s in self.plan if s.status == "running"]
            if not running:
                for s in self.plan:
                    if not s.ended:
                        self.finish(s, "skipped", None, "never startable")
                break
            ends = {s.name: s.started + min(s.predicted, s.limit) for s in running}
            self.now = min(ends.values())
            for s in running:
                if ends[s.name] <= self.now:
                    self.finish(s, "passed" if s.predicted <= s.limit else "timeout", 0)
        return self.plan

    def table(self) -> str:
        lines = ["| stage | starts after | cores | predicted start–end s | limit s | status |", "|---|---|---|---|---|---|"]
        for i, s in enumerate(self.plan):
            alone = [e.name for e in self.plan[:i] if e.exclusive]
            waits = ", ".join(s.after + tuple(n for n in s.needs if n not in s.after) + tuple(alone)) or "—"
            if s.exclusive:
                waits = "every stage above; runs alone"
            span = "—" if s.started is None else f"{s.started:.0f}–{s.started + s.wall:.0f}"
            lines.append(f"| {s.name} | {waits} | {s.cores or '—'} | {span} | {s.timeout:.0f} | "
                         f"{s.status}{': ' + s.note if s.note else ''} |")
        end = max((s.started + s.wall for s in self.plan if s.started is not None), default=0.0)
        lines.append(f"\nPredicted end: {end:.0f} s of the {self.budget:.0f} s budget.")
        return "\n".join(lines) + "\n"


def write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the stage's process group, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


TALLY = re.compile(r"(\d+(?:/\d+)? tests? collected(?: \(\d+ deselected\))?|"
                   r"(?:\d+ (?:passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)(?:, )?)+)"
                   r" in [\d.]+s")


def pytest_tally(log: Path) -> str:
    """pytest's closing tally in a stage log ("12 passed, 1 skipped"), or ""."""
    if not log.exists():
        return ""
    found = TALLY.findall(log.read_text(errors="replace")[-20_000:])
    return found[-1].rstrip(", ") if found else ""


# ---------------------------------------------------------------------------------------------
# The environment report


def find_tool(name: str) -> str | None:
    """A CUDA toolkit program where setup.py looks for nvcc: $CUDA_HOME/bin or $CUDA_PATH/bin, else
    PATH, else /usr/local/cuda/bin."""
    homes = [Path(os.environ[var]) / "bin" / name for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    for candidate in (*homes, shutil.which(name), CUDA_BIN / name):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def environment_report(path: Path) -> int:
    def run(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip() or f"(no output, exit {p.returncode})"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable: {exc}"

    probe = (
        "import platform, sys, torch\n"
        "print('python', sys.version.split()[0], platform.platform())\n"
        "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())\n"
        "try:\n import triton; print('triton', triton.__version__)\n"
        "except ImportError as e: print('triton missing', e)\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    free, total = torch.cuda.mem_get_info()\n"
        "    print('device', p.name, 'sm', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count,\n"
        "          'L2 MB', getattr(p, 'L2_cache_size', 0) / 2**20)\n"
        "    print('memory free / total GiB', round(free / 2**30, 1), round(total / 2**30, 1))\n"
        "    try:\n"
        "        sys.path.insert(0, 'benchmarks')\n"
        "        from latency import copy_bandwidth\n"
        "        bandwidth = copy_bandwidth()\n"
        "        open(sys.argv[1], 'w').write(f'{bandwidth:.4g} bytes/s, device-to-device copy of 1 GiB, read + write\\n')\n"
        "        print(f'copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write; the floor of latency.py uses it)')\n"
        "    except Exception as e:\n"
        "        print('copy bandwidth not measured:', type(e).__name__, e, '(latency.py measures it itself)')\n"
        "else:\n"
        "    print('no CUDA device visible to torch')\n"
    )
    nvcc = find_tool("nvcc")
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    sections = [
        ("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        ("git", run(["git", "-C", str(ROOT), "log", "-1", "--format=%H %s"])),
        ("nvidia-smi", run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,"
                            "clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit", "--format=csv"])),
        ("python / torch / triton / device", run([PY, "-c", probe, str(path.parent / "bandwidth.txt")])),
        ("nvcc", f"{nvcc}: {run([nvcc, '--version']).splitlines()[-1]}" if nvcc else
         f"not found (PATH, CUDA_HOME, {CUDA_BIN}): the cuda-build stage will fail"),
        ("Python.h", f"{include} " + ("exists" if include.is_file() else "MISSING: the extension cannot build")),
        ("compute-sanitizer", f"{tool}: {run([tool, '--version']).splitlines()[-1]}"
         if (tool := find_tool("compute-sanitizer")) else "not found"),
        ("ncu", f"{tool}: {run([tool, '--version']).splitlines()[-1]}" if (tool := find_tool("ncu")) else "not found"),
        ("cpu", f"{os.cpu_count()} cores; " + run(["sh", "-c", "free -g | head -2 | tail -1"])),
        ("shared/", run(["sh", "-c", "ls shared/weights shared/data 2>&1 | tr '\\n' ' '"])),
    ]
    path.write_text("".join(f"## {k}\n{v}\n\n" for k, v in sections))
    print(path.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", help="output folder (what comes back: at most five files)")
    ap.add_argument("--dry-run", action="store_true", help="the same control flow with commands that need no GPU")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S:.0f})")
    ap.add_argument("--only", nargs="+", default=None, help="run just these stages (with nothing they wait for)")
    ap.add_argument("--max-parallel", type=int, default=None, help="stages at once (default 12; dry run: CPUs)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default build/gpu-check-<time>)")
    ap.add_argument("--timeline", action="store_true",
                    help="print the predicted timeline (the scheduler on predicted durations) and exit")
    ap.add_argument("--cpus", type=int, default=None, help="cores to plan for (default: this machine's)")
    ap.add_argument("--environment", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.environment:
        return environment_report(args.environment)
    if args.timeline:
        timeline = Timeline(stages(Path("build/gpu-check"), args.cpus), budget=args.budget,
                            max_parallel=args.max_parallel or 12)
        timeline.play()
        print(timeline.table(), end="")
        return 0
    if args.out is None:
        ap.error("give the output folder")
    args.out.mkdir(parents=True, exist_ok=True)
    stray = [p.name for p in args.out.iterdir() if p.name not in OUT_FILES and not p.name.startswith(".")]
    if stray:
        ap.error(f"{args.out} already holds other files ({', '.join(stray[:5])}): give an empty folder")
    work = args.work or ROOT / "build" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    plan = stages(work, args.cpus)
    if args.only:
        unknown = set(args.only) - {s.name for s in plan}
        if unknown:
            ap.error(f"unknown stages {sorted(unknown)}; stages: {', '.join(s.name for s in plan)}")
        plan = [dataclasses.replace(s, after=(), needs=()) for s in plan if s.name in args.only]
    path = os.environ.get("PATH", "")
    if shutil.which("nvcc") is None and CUDA_BIN.is_dir():  # nvcc, compute-sanitizer and ncu for every stage
        path = os.pathsep.join(filter(None, [path, str(CUDA_BIN)]))
    env = dict(os.environ, PATH=path,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MSFIN_CUDA_ARCHS=os.environ.get("MSFIN_CUDA_ARCHS", "90"), MSFIN_OFFLINE="1",
               MSFIN_STRICT_TESTS="1",  # a missing file, module, tool or extension fails its test
               MSFIN_CACHE_DIR=str(work / "cache"))
    for var, sub in (("MSFIN_WEIGHTS_DIR", "weights"), ("MSFIN_DATA_DIR", "data")):
        if not env.get(var) and (ROOT / "shared" / sub).is_dir():
            env[var] = str(ROOT / "shared" / sub)
    parallel = args.max_parallel or (max(2, os.cpu_count() or 2) if args.dry_run else 12)
    scheduler = Scheduler(plan, args.out, work, budget=args.budget, max_parallel=parallel, dry_run=args.dry_run,
                          env=env)

    signal.signal(signal.SIGTERM, lambda signum, frame: scheduler.request_stop(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: scheduler.request_stop(signum))
    rc = scheduler.run()
    print(scheduler.summary(final=True))
    return rc


if __name__ == "__main__":
    sys.exit(main())
