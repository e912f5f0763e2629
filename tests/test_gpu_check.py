"""benchmarks/gpu_check.py, the one-command GPU run, checked on the CPU.

The scheduler runs synthetic stages here (short Python sleeps), so its time limits, the overall
budget, skips, exclusive stages and the packing of the output folder are checked for real; the
dry run goes through the real stage list with commands that need no GPU (pytest selections are
collected, latency matrices printed), so a stage that would select nothing fails here, not on a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


G = load_gpu_check()


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def sleeper(seconds: float, mark: Path | None = None) -> list[str]:
    """Sleeps; with ``mark``, appends 'start' and 'end' with times to it."""
    return py(f"""
        import time, sys
        mark = {str(mark)!r} if {mark is not None} else None
        if mark: open(mark, "a").write(f"start {{time.time()}}\\n")
        print("sleeping", flush=True)
        time.sleep({seconds})
        if mark: open(mark, "a").write(f"end {{time.time()}}\\n")
        print("done", flush=True)
    """)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a killed orphan may linger as a zombie until reaped)."""
    time.sleep(0.2)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def scheduler(tmp_path, plan, budget=60.0, **kw):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    return G.Scheduler(plan, out, work, budget=budget, max_parallel=kw.pop("max_parallel", 8), **kw), out


def test_stages_run_in_parallel_and_dependencies_hold(tmp_path):
    plan = [G.Stage("a", sleeper(1.0), 20, 1), G.Stage("b", sleeper(1.0), 20, 1),
            G.Stage("c", py("print('c')"), 20, 1, after=("a", "b"))]
    s, out = scheduler(tmp_path, plan)
    t0 = time.monotonic()
    assert s.run() == 0
    assert time.monotonic() - t0 < 1.9  # a and b overlapped
    assert [st.status for st in plan] == ["passed"] * 3
    assert plan[2].started >= max(plan[0].started + plan[0].wall, plan[1].started + plan[1].wall) - 0.05
    assert sorted(p.name for p in out.iterdir()) == sorted(G.OUT_FILES)


def test_a_stage_over_its_limit_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The stage starts a grandchild that would outlive a plain kill of the stage's own process.
    stage = G.Stage("hang", py(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
    """), 1.5, 1)
    after = G.Stage("next", py("print('next ran')"), 10, 1, after=("hang",))
    s, out = scheduler(tmp_path, [stage, after])
    assert s.run() == 1
    assert stage.status == "timeout" and "over its 2 s limit" in stage.note
    assert 1.4 < stage.wall < 10
    assert after.status == "passed"  # `after` waits for an end, not for success
    assert not running(int(pid_file.read_text()))
    summary = (out / "summary.txt").read_text()
    assert "hang" in summary and "timeout" in summary and "stages: 1 timeout, 1 passed" in summary


def test_the_budget_stops_the_running_stage_and_skips_the_rest(tmp_path):
    plan = [G.Stage("long", sleeper(30), 100, 1), G.Stage("later", py("print(1)"), 100, 1, after=("long",))]
    s, out = scheduler(tmp_path, plan, budget=3.0, min_stage=1.0)
    t0 = time.monotonic()
    assert s.run() == 1
    assert time.monotonic() - t0 < 10
    assert plan[0].status == "timeout" and "budget" in plan[0].note
    assert plan[0].limit == pytest.approx(3.0, abs=0.5)  # clipped to what was left
    assert plan[1].status == "skipped" and "budget was spent" in plan[1].note


def test_a_failed_need_skips_its_dependants_only(tmp_path):
    plan = [G.Stage("build", py("raise SystemExit(3)"), 10, 1),
            G.Stage("tests", py("print(1)"), 10, 1, needs=("build",)),
            G.Stage("other", py("print(2)"), 10, 1, after=("build",))]
    s, out = scheduler(tmp_path, plan)
    assert s.run() == 1
    assert (plan[0].status, plan[0].returncode) == ("failed", 3)
    assert plan[1].status == "skipped" and plan[1].note == "needs build, which failed"
    assert plan[2].status == "passed"


def test_an_exclusive_stage_runs_alone(tmp_path):
    marks = {name: tmp_path / f"{name}.marks" for name in "abcd"}
    plan = [G.Stage("a", sleeper(0.6, marks["a"]), 10, 1), G.Stage("b", sleeper(1.2, marks["b"]), 10, 1),
            G.Stage("x", sleeper(0.6, marks["c"]), 10, 1, exclusive=True),
            G.Stage("d", sleeper(0.3, marks["d"]), 10, 1)]
    s, _ = scheduler(tmp_path, plan)
    assert s.run() == 0

    def span(name):
        lines = dict(line.split() for line in marks[name].read_text().splitlines())
        return float(lines["start"]), float(lines["end"])

    x0, x1 = span("c")
    for other in "abd":
        o0, o1 = span(other)
        assert o1 <= x0 or o0 >= x1, f"{other} overlapped the exclusive stage"
    assert span("d")[0] >= x1  # a stage listed after it waits for it


def test_stages_may_only_wait_for_earlier_stages():
    with pytest.raises(ValueError, match="earlier stages"):
        G.Scheduler([G.Stage("a", py(""), 1, 1, after=("b",)), G.Stage("b", py(""), 1, 1)],
                    Path("."), Path("."))


def test_out_is_packed_after_every_stage_so_a_killed_run_returns_what_finished(tmp_path):
    """The device tool kills a command at its limit: what finished before must already be in OUT."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
        import gpu_check as G
        from pathlib import Path
        plan = [G.Stage("first", [sys.executable, "-c", "print('first stage output')"], 10, 1),
                G.Stage("second", [sys.executable, "-c", "import time; time.sleep(60)"], 100, 1, after=("first",))]
        out, work = Path({str(tmp_path / 'out')!r}), Path({str(tmp_path / 'work')!r})
        out.mkdir(); work.mkdir()
        G.Scheduler(plan, out, work, budget=100).run()
    """))
    proc = subprocess.Popen([sys.executable, str(driver)], start_new_session=True)
    out = tmp_path / "out"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        summary = out / "summary.txt"
        if summary.exists() and re.search(r"^second +running", summary.read_text(), re.M):
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^first +passed", summary, re.M) and re.search(r"^second +running", summary, re.M)
    assert "still running" in summary
    assert "first stage output" in (out / "logs.txt").read_text()
    with tarfile.open(out / "artifacts.tar.gz") as tar:
        assert "gpu-check/first.log" in tar.getnames()
    assert len([p for p in out.iterdir() if not p.name.startswith(".")]) <= 5


def test_sigterm_stops_the_stages_and_leaves_a_final_summary(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run",
                             "--only", "env", "--work", str(tmp_path / "work")], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not (out / "summary.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, 128 + signal.SIGTERM)  # the env stage may have finished first
    summary = (out / "summary.txt").read_text()
    assert "still running" not in summary and "env" in summary


def test_a_signal_in_the_middle_of_packing_is_acted_on_after_it(tmp_path):
    """A real SIGTERM delivered while ``pack`` runs (CI once caught one mid-``import gzip``).

    The handler must only record it: doing the abort inside the handler re-entered ``pack`` and
    crashed with exit 1. Here the signal lands inside every ``pack`` call until the loop notices.
    """
    sched, out = scheduler(tmp_path, [G.Stage("long", sleeper(60), 100, 1), G.Stage("later", sleeper(1), 100, 1,
                                                                                      after=("long",))])
    depth, deepest, original = [0], [0], sched.pack

    def pack(final=False):
        depth[0] += 1
        deepest[0] = max(deepest[0], depth[0])
        try:
            if "long" in sched.procs:  # the stage is running: the signal lands here, mid-pack
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs at the next bytecode boundary, inside this call
            original(final)
        finally:
            depth[0] -= 1

    sched.pack = pack
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sched.request_stop(signum))
    try:
        t0 = time.monotonic()
        rc = sched.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert rc == 128 + signal.SIGTERM
    assert deepest[0] == 1, "pack was re-entered from the signal handler"
    assert time.monotonic() - t0 < 20, "the stop was not acted on promptly"
    summary = (out / "summary.txt").read_text()
    assert "still running" not in summary
    assert re.search(r"^long +killed .*got signal 15", summary, re.M), summary
    assert re.search(r"^later +skipped", summary, re.M), summary
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "a half-written file was left in OUT"


def test_pytest_tallies_are_read_from_the_logs(tmp_path):
    cases = {
        "........\n12 passed, 3 skipped, 2 warnings in 41.20s\n": "12 passed, 3 skipped, 2 warnings",
        "==== 1 failed, 9 passed in 3.0s ====\n": "1 failed, 9 passed",
        "20/80 tests collected (60 deselected) in 0.31s\n": "20/80 tests collected (60 deselected)",
        "1 test collected in 0.2s\n": "1 test collected",
        "no tally here\n": "",
    }
    for text, want in cases.items():
        log = tmp_path / "x.log"
        log.write_text(text)
        assert G.pytest_tally(log) == want


def test_out_must_be_empty_of_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "give an empty folder" in proc.stderr


def test_dry_run_goes_through_every_stage(tmp_path):
    """CI's end-to-end run of the script: every stage, its real selection, the five output files."""
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--dry-run",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    assert sorted(p.name for p in out.iterdir()) == sorted(G.OUT_FILES)
    summary = (out / "summary.txt").read_text()
    plan = G.stages(tmp_path / "work")
    for stage in plan:
        line = next(line for line in summary.splitlines() if line.startswith(stage.name + " "))
        assert " passed " in line, line
        if stage.command[1:3] == ["-m", "pytest"]:  # the selection collects tests (rc 5 if none)
            assert "collected" in line, line
    assert sum(s.predicted for s in plan) > 0
    logs = (out / "logs.txt").read_text()
    assert "would time msfin-x4 540x960 b8 engine-fp16-graph" in logs
    assert "## python / torch / triton / device" in (out / "environment.txt").read_text()


def test_the_stage_commands_use_an_offline_install_and_one_cuda_target():
    plan = {s.name: s for s in G.stages(Path("/work"))}
    install = plan["install"]
    assert {"--no-build-isolation", "--no-deps", "--no-index"} <= set(install.command)
    assert install.env["MSFIN_CUDA_EXT"] == "0"  # the Python side installs whatever nvcc does
    assert plan["cuda-build"].env["MSFIN_CUDA_EXT"] == "1" and "build_ext" in plan["cuda-build"].command
    assert all(s.timeout <= 300 for s in plan.values())
    assert all(s.timeout <= 200 for name, s in plan.items() if name.startswith("sanitize-"))
    assert [s.name for s in plan.values() if s.exclusive] == ["latency", "latency-4k"]
    for stage in plan.values():
        if stage.command[1:3] == ["-m", "pytest"]:  # a hung test cannot eat its stage; the log says where time went
            assert any(a.startswith("--timeout=") for a in stage.command) and "--durations=15" in stage.command
        if stage.name.startswith("sanitize-"):  # memcheck sees each allocation's own bounds
            assert stage.env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
        if stage.name.startswith(("latency", "warm-")):  # auto's choice is measured by the timed run, alone
            assert stage.env["MSFIN_CACHE_DIR"] == "/work/cache-latency"
    for name in ("latency", "latency-4k"):
        command = plan[name].command
        assert command[command.index("--bandwidth") + 1] == "/work/bandwidth.txt"
    assert plan["sanitize-racecheck"].min_budget > 0 and plan["sanitize-synccheck"].min_budget > 0


def test_the_predicted_timeline_runs_latency_first_and_fits_the_budget():
    """The scheduler played on the predicted durations for the H200 machine (16 cores): latency
    right after the warm-up, then 4K, then the tests, the sanitizers last, all inside the budget,
    and never more threads at once than cores."""
    timeline = G.Timeline(G.stages(Path("/work"), cpus=16))
    plan = {s.name: s for s in timeline.play()}
    end = {name: s.started + s.wall for name, s in plan.items()}
    assert all(s.status == "passed" for s in plan.values()), [(s.name, s.status, s.note) for s in plan.values()]
    warm = [n for n in plan if n.startswith(("warm-", "engine-")) or n in ("env", "install", "cuda-build")]
    assert plan["latency"].started == max(end[n] for n in warm) <= 100
    assert plan["latency-4k"].started == end["latency"]
    tests = ("psnr", "kernels", "cuda-tests", "serving")
    assert all(plan[n].started == end["latency-4k"] for n in tests)
    assert plan["sanitize-memcheck"].started >= end["cuda-tests"]
    assert plan["sanitize-racecheck"].started >= end["sanitize-memcheck"]
    assert plan["sanitize-synccheck"].started >= end["sanitize-memcheck"]
    assert max(end.values()) <= G.BUDGET_S
    for t in sorted({s.started for s in plan.values()}):
        busy = [s for s in plan.values() if s.started <= t < s.started + s.wall]
        assert sum(s.cores for s in busy) <= 16, (t, [(s.name, s.cores) for s in busy])
    table = timeline.table()
    assert f"| latency | every stage above; runs alone | 16 | {plan['latency'].started:.0f}–" in table
    assert "Predicted end:" in table
    # Even with every stage before it running to its limit, the latency table gets its whole limit.
    worst = {s.name: s for s in G.Timeline([dataclasses.replace(s, predicted=s.timeout)
                                            for s in G.stages(Path("/work"), cpus=16)]).play()}
    assert worst["latency"].started is not None and worst["latency"].limit == worst["latency"].timeout


def test_a_stage_that_needs_more_budget_than_is_left_is_skipped(tmp_path):
    plan = [G.Stage("first", sleeper(1.5), 10, 1),
            G.Stage("optional", py("print('ran')"), 10, 1, after=("first",), min_budget=20),
            G.Stage("cheap", py("print('ran')"), 10, 1, after=("first",), min_budget=2)]
    s, out = scheduler(tmp_path, plan, budget=8.0, min_stage=1.0)
    assert s.run() == 1
    assert plan[1].status == "skipped" and re.fullmatch(r"\d s of the budget left, it needs 20", plan[1].note)
    assert plan[2].status == "passed"
    assert "it needs 20" in (out / "summary.txt").read_text()


def test_each_stage_gets_its_share_of_the_cores(tmp_path):
    show = py("import os; print('threads', *(os.environ.get(v) for v in "
              "('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'TORCHINDUCTOR_COMPILE_THREADS')))")
    plan = [G.Stage("a", show, 10, 1, cores=3), G.Stage("b", show, 10, 1)]
    s, _ = scheduler(tmp_path, plan, env={"OMP_NUM_THREADS": "99"})
    assert s.run() == 0
    assert "threads 3 3 3" in (tmp_path / "work" / "a.log").read_text()
    assert "threads 99 None None" in (tmp_path / "work" / "b.log").read_text()  # no share: as the run's


def test_the_environment_stage_reports_nvcc_and_python_h(tmp_path):
    report = tmp_path / "environment.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--environment", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = report.read_text()
    assert re.search(r"## Python.h\n\S+/Python.h (exists|MISSING)", text)
    assert re.search(r"## nvcc\n(\S+/nvcc: .*|not found .*)\n", text)
    if not __import__("torch").cuda.is_available():
        assert not (tmp_path / "bandwidth.txt").exists()  # measured on a GPU only


def test_toolkit_programs_are_found_off_path(tmp_path, monkeypatch):
    """CUDA images often leave /usr/local/cuda/bin off PATH: nvcc, compute-sanitizer and ncu are
    looked for there too (and the stages get it on their PATH)."""
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("nvcc", "ncu"):
        (bin_dir / name).write_text("#!/bin/sh\necho fake\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(G, "CUDA_BIN", bin_dir)
    assert G.find_tool("nvcc") == str(bin_dir / "nvcc") and G.find_tool("compute-sanitizer") is None
