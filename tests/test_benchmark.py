import importlib.util
import json
from pathlib import Path

import pytest
from bounds import ENGINE_FP32_CPU

ROOT = Path(__file__).resolve().parent.parent


def load_latency():
    spec = importlib.util.spec_from_file_location("latency", ROOT / "benchmarks" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_script_writes_json_and_table(tmp_path):
    latency = load_latency()
    rc = latency.main(["--models", "msfin-s-x4", "--sizes", "8x12", "--batch", "2", "--backends", "ref-fp32",
                       "engine-fp16-graph", "--iters", "3", "--warmup", "1", "--device", "cpu",
                       "--out-dir", str(tmp_path), "--name", "t"])
    assert rc == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["environment"]["torch"] and data["environment"]["command"].startswith("latency.py")
    ref, graph = data["results"]
    assert ref["backend"] == "ref-fp32" and ref["batch"] == 2 and ref["size"] == "8x12"
    assert ref["p10_ms"] <= ref["median_ms"] <= ref["p90_ms"] and ref["median_ms"] > 0
    assert graph["skipped"] == "CUDA graphs need a GPU"
    assert "| msfin-s-x4 | 8x12 | 2 | ref-fp32 |" in (tmp_path / "t.md").read_text()


def test_floor_counts_one_read_and_write_per_pass():
    latency = load_latency()
    import msfin_fast

    model = msfin_fast.MSFIN("msfin-s-x4")
    # MSFIN-S at LR 8x8 (HR 32x32), batch 1, fp16: per level, passes x pixels x channels.
    full = 9 * 32 * 32 * 16          # ds0_body* and block_re*: 9 blocks at full resolution, 16 ch
    half = 5 * 16 * 16 * 16 + 5 * 16 * 16 * 32  # ds4_rcab2..3_4 (16 ch), ds2_rcab* (32 ch)
    quarter = 5 * 8 * 8 * 64         # ds4_rcab..1_4 (64 ch)
    assert latency.floor_bytes(model, 1, 8, 8, 2) == 2 * 2 * (full + half + quarter)


def test_bad_size_is_rejected(capsys):
    latency = load_latency()
    with pytest.raises(SystemExit) as exited:
        latency.main(["--sizes", "12by4"])
    assert exited.value.code == 2  # argparse's usage error, not any exit
    assert "size must look like 180x320 (LR height x width), got '12by4'" in capsys.readouterr().err


def test_latency_check_warm_only_and_dry_run(tmp_path, capsys, monkeypatch):
    latency = load_latency()
    common = ["--models", "msfin-s-x4", "--sizes", "4x6", "--batch", "1", "--backends", "ref-fp32", "engine-fp16-graph",
              "--device", "cpu", "--out-dir", str(tmp_path)]
    assert latency.main(common + ["--dry-run"]) == 0
    assert "would time msfin-s-x4 4x6 b1 engine-fp16-graph" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    assert latency.main(common + ["--iters", "2", "--warmup", "0", "--check", "--name", "c"]) == 0
    ref, engine = json.loads((tmp_path / "c.json").read_text())["results"]
    assert ref["max_abs_err"] == 0.0  # the fp32 reference against itself, TF32 or not
    assert "skipped" in engine  # no GPU here
    # --check measures each backend against the true fp32 reference: the native kernels within the
    # engine's fp32 bound, and a backend planted 3 grey levels off is reported 3 off.
    real_build = latency.build

    def build(backend, model, shape):
        fn, dtype = real_build(backend, model, shape)
        if backend == "cpu-fp32":
            return (lambda x: fn(x) + 3.0), dtype
        return fn, dtype

    monkeypatch.setattr(latency, "build", build)
    checked = common[:common.index("--backends")] + ["--backends", "native-fp32", "cpu-fp32", "--device", "cpu",
                                                     "--out-dir", str(tmp_path)]
    assert latency.main(checked + ["--iters", "1", "--warmup", "0", "--check", "--name", "k"]) == 0
    native, planted = json.loads((tmp_path / "k.json").read_text())["results"]
    assert native["backend"] == "native-fp32" and native["max_abs_err"] <= ENGINE_FP32_CPU
    assert planted["backend"] == "cpu-fp32" and abs(planted["max_abs_err"] - 3.0) < ENGINE_FP32_CPU
    assert latency.main(common + ["--warm-only", "--name", "w"]) == 0
    ref = json.loads((tmp_path / "w.json").read_text())["results"][0]
    assert ref["skipped"].startswith("warm-up only") and "median_ms" not in ref


def test_every_compile_is_independent_of_the_input_shape():
    """Shape integers are do_not_specialize: inputs whose sizes are 1, multiples of 16 or neither
    launch the same compiled variants. The same launches with every integer specialised differ,
    so the count below can tell."""
    import os
    import subprocess
    import sys

    code = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import count_compiles as C
keys = {}
nets = C.models()
with C.recording(keys) as group:
    for name, shapes in (("a", [(1, 16, 32)]), ("b", [(3, 17, 23)]), ("c", [(1, 1, 1)])):
        group(name)
        for model in nets.values():
            for kw in (dict(dtype=torch.float16), dict(dtype=torch.float32, fuse_rrcab=True),
                       dict(dtype=torch.float16, backend="cuda"), dict(dtype=torch.float16, conv_kernels=False)):
                C.replay(model, shapes, **kw)
print(json.dumps({g: {m: sorted(map(repr, v)) for m, v in k.items()} for g, k in keys.items()}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(keys["a"]["declared"]) > 20
    assert keys["a"]["declared"] == keys["b"]["declared"] == keys["c"]["declared"]
    assert keys["a"]["specialize-all"] != keys["b"]["specialize-all"] != keys["c"]["specialize-all"]


def test_quick_on_a_cpu_is_small_and_says_so(tmp_path, capsys, monkeypatch):
    """--quick on a CPU times LR 64x64 with 1 + 3 calls (MSFIN at 180x320 with 3 + 10 took over
    15 minutes on two cores), the reference next to the native and cpu backends, and says so in its
    output and its files."""
    import time

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as the CPU tests run: interpreted kernels are not timed
    latency = load_latency()
    common = ["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]
    assert latency.main(common + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--quick on the CPU: LR 64x64, batch 1, 1 warm-up + 3 timed calls" in out
    matrix = [line for line in out.splitlines() if line.startswith("would time")]
    assert "would time msfin-x4 64x64 b1 ref-fp32" in matrix and all(" 64x64 b1 " in line for line in matrix)
    t0 = time.perf_counter()
    assert latency.main(common + ["--models", "msfin-s-x4", "--name", "q"]) == 0
    assert time.perf_counter() - t0 < 60
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["environment"]["note"].startswith("--quick on the CPU")
    timed = [row for row in data["results"] if "skipped" not in row]
    # On a CPU: the reference, the native kernels (fp32 and bf16) and the cpu backend, side by side;
    # everything else is skipped.
    assert [row["backend"] for row in timed] == ["ref-fp32", "native-fp32", "native-bf16", "cpu-fp32"]
    assert all(row["size"] == "64x64" and row["median_ms"] > 0 for row in timed)
    assert len(data["results"]) > len(timed)
    assert "--quick on the CPU" in (tmp_path / "q.md").read_text()


def test_onnxruntime_is_the_cpu_peer(tmp_path, capsys):
    """The CPU run times ONNX Runtime on the exported graph beside the reference, and --check shows
    it computes the same image (the export's own tolerance, 1e-3 on 0–255)."""
    from helpers import require_module

    require_module("onnxruntime")
    latency = load_latency()
    assert latency.main(["--models", "msfin-s-x4", "--sizes", "8x12", "--batch", "2", "--device", "cpu",
                         "--backends", "ref-fp32", "onnxruntime-cpu-fp32", "--iters", "2", "--warmup", "1",
                         "--check", "--out-dir", str(tmp_path), "--name", "o"]) == 0
    rows = {r["backend"]: r for r in json.loads((tmp_path / "o.json").read_text())["results"]}
    assert "skipped" not in rows["onnxruntime-cpu-fp32"], rows["onnxruntime-cpu-fp32"]
    assert rows["onnxruntime-cpu-fp32"]["median_ms"] > 0 and rows["onnxruntime-cpu-fp32"]["max_abs_err"] <= 1e-3
    assert rows["ref-fp32"]["max_abs_err"] == 0


def failing_build(latency, fails: dict):
    """``latency.build`` where the backends named in ``fails`` run a callable that raises that error."""
    real = latency.build

    def build(backend, model, *shape):
        if backend in fails:
            def call(x):
                raise fails[backend]
            return call, __import__("torch").float32
        return real(backend, model, *shape)
    return build


def test_an_entry_that_raises_keeps_the_rows_before_it_and_the_run_goes_on(tmp_path, monkeypatch):
    """A Triton or Inductor error in one backend is that row's result, in both files at once, not the
    end of the table; torch.compile entries run last."""
    latency = load_latency()
    seen = {}
    real = failing_build(latency, {"cpu-fp32": RuntimeError("Triton compile failed | in rrcab_conv1\nline 2")})

    def build(backend, model, *shape):
        if backend == "onnxruntime-cpu-fp32":  # the entry after the failure looks at the files
            seen["json"] = json.loads((tmp_path / "e.json").read_text())
            seen["md"] = (tmp_path / "e.md").read_text()
            return "looked at the files", None
        return real(backend, model, *shape)

    monkeypatch.setattr(latency, "build", build)
    rc = latency.main(["--models", "msfin-s-x4", "--sizes", "4x6", "--batch", "1", "--device", "cpu",
                       "--backends", "compile", "ref-fp32", "cpu-fp32", "onnxruntime-cpu-fp32",
                       "--iters", "2", "--warmup", "0", "--out-dir", str(tmp_path), "--name", "e", "--no-interleave"])
    assert rc == 1
    ref, failed = seen["json"]["results"]
    assert ref["backend"] == "ref-fp32" and ref["median_ms"] > 0
    assert failed["backend"] == "cpu-fp32" and failed["error"] == "RuntimeError: Triton compile failed | in rrcab_conv1"
    assert seen["json"]["progress"] == {"done": 2, "total": 4, "state": "running",
                                        "current": "msfin-s-x4 4x6 b1 onnxruntime-cpu-fp32"}
    assert "| ref-fp32 |" in seen["md"] and "error: RuntimeError: Triton compile failed \\| in rrcab_conv1" in seen["md"]
    assert "2 of 4 entries done; running msfin-s-x4 4x6 b1 onnxruntime-cpu-fp32" in seen["md"]
    final = json.loads((tmp_path / "e.json").read_text())
    assert [r["backend"] for r in final["results"]] == ["ref-fp32", "cpu-fp32", "onnxruntime-cpu-fp32", "compile"]
    assert final["progress"]["state"] == "finished" and "All 4 entries done." in (tmp_path / "e.md").read_text()


def test_after_the_cuda_context_fails_the_remaining_rows_say_so(tmp_path, monkeypatch):
    latency = load_latency()
    monkeypatch.setattr(latency, "build", failing_build(latency, {
        "cpu-fp32": RuntimeError("CUDA error: an illegal memory access was encountered")}))
    probes = []

    def context_error(cuda):
        probes.append(cuda)
        return "AcceleratorError: CUDA error: an illegal memory access was encountered"

    monkeypatch.setattr(latency, "context_error", context_error)
    rc = latency.main(["--models", "msfin-s-x4", "--sizes", "4x6", "3x3", "--batch", "1", "--device", "cpu",
                       "--backends", "cpu-fp32", "ref-fp32", "--iters", "1", "--warmup", "0",
                       "--out-dir", str(tmp_path), "--name", "p", "--no-interleave"])
    assert rc == 1 and len(probes) == 1  # probed once, after the error; nothing ran after it
    first, *rest = json.loads((tmp_path / "p.json").read_text())["results"]
    assert first["error"].startswith("RuntimeError: CUDA error: an illegal memory access")
    assert len(rest) == 3 and all(r["skipped"].startswith("not run: the CUDA context failed earlier") for r in rest)


def test_a_run_stopped_or_killed_part_way_leaves_valid_files(tmp_path):
    """The GPU script stops a stage at its limit with SIGTERM (then SIGKILL): either way the files
    hold every row done and say where the run was."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import importlib.util, sys, time, torch
        spec = importlib.util.spec_from_file_location("latency", {str(ROOT / 'benchmarks' / 'latency.py')!r})
        latency = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(latency)
        real = latency.build
        def build(backend, model, *shape):
            if backend == "cpu-fp32":
                return (lambda x: time.sleep(120)), torch.float32
            return real(backend, model, *shape)
        latency.build = build
        sys.exit(latency.main(["--models", "msfin-s-x4", "--sizes", "4x6", "--batch", "1", "--device", "cpu",
                               "--backends", "ref-fp32", "cpu-fp32", "--iters", "1", "--warmup", "0", "--no-interleave",
                               "--out-dir", {str(tmp_path)!r}, "--name", sys.argv[1]]))
    """))

    def start_and_wait(name):
        proc = subprocess.Popen([sys.executable, str(driver), name], cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                data = json.loads((tmp_path / f"{name}.json").read_text())
            except (OSError, ValueError):
                data = None
            if data and data["progress"]["current"] == "msfin-s-x4 4x6 b1 cpu-fp32":
                return proc
            assert proc.poll() is None, f"the run ended early (rc {proc.returncode})"
            time.sleep(0.1)
        proc.kill()
        raise AssertionError("the second entry never started")

    killed = start_and_wait("k")
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    data = json.loads((tmp_path / "k.json").read_text())
    assert [r["backend"] for r in data["results"]] == ["ref-fp32"] and data["results"][0]["median_ms"] > 0
    assert data["progress"]["state"] == "running"
    assert "1 of 2 entries done; running msfin-s-x4 4x6 b1 cpu-fp32" in (tmp_path / "k.md").read_text()

    stopped = start_and_wait("s")
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=60) == 128 + signal.SIGTERM
    data = json.loads((tmp_path / "s.json").read_text())
    ref, cut = data["results"]
    assert ref["median_ms"] > 0 and cut["error"] == "stopped by signal 15 during this entry"
    assert data["progress"]["state"] == "stopped by signal 15 during msfin-s-x4 4x6 b1 cpu-fp32"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written file left


def test_the_floor_uses_the_bandwidth_given_or_written_by_the_environment_stage(tmp_path):
    latency = load_latency()
    (tmp_path / "bandwidth.txt").write_text("4.3e12 bytes/s\n")
    assert latency.resolve_bandwidth(str(tmp_path / "bandwidth.txt"), cuda=False)[0] == 4.3e12
    assert latency.resolve_bandwidth("3e12", cuda=False) == (3e12, "given")
    assert latency.resolve_bandwidth(str(tmp_path / "missing.txt"), cuda=False)[0] == latency.DEFAULT_BANDWIDTH
    args = ["--models", "msfin-s-x4", "--sizes", "8x8", "--batch", "1", "--backends", "ref-fp32", "--device", "cpu",
            "--iters", "1", "--warmup", "0", "--out-dir", str(tmp_path)]
    assert latency.main(args + ["--name", "a", "--bandwidth", "1e12"]) == 0
    assert latency.main(args + ["--name", "b", "--bandwidth", str(tmp_path / "bandwidth.txt")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["results"][0]["floor_ms"] == pytest.approx(4.3 * b["results"][0]["floor_ms"])
    assert b["environment"]["bandwidth_source"].startswith("measured by the environment stage")
    assert "Floor at 4.30 TB/s" in (tmp_path / "b.md").read_text()


def test_on_a_cpu_the_backends_of_a_shape_are_timed_interleaved(tmp_path, monkeypatch):
    """One (model, size, batch) at a time, every backend built and warmed up first, then rounds of
    one untimed and one timed call each; a backend that fails is its row's error and the others are
    still timed; each row says its settings, the files say the protocol and the load."""

    latency = load_latency()
    calls = []
    real = failing_build(latency, {"cpu-fp32": RuntimeError("broken on purpose")})

    def build(backend, model, *shape):
        fn, dtype = real(backend, model, *shape)
        if dtype is None:
            return fn, dtype

        def call(x):
            calls.append(backend)
            return fn(x)
        return (latency.Peer(call, f"{backend} as built") if backend == "native-fp32" else call), dtype

    monkeypatch.setattr(latency, "build", build)
    rc = latency.main(["--models", "msfin-s-x4", "--sizes", "4x6", "--batch", "1", "--device", "cpu",
                       "--backends", "ref-fp32", "native-fp32", "cpu-fp32", "--iters", "3", "--warmup", "1",
                       "--busy", "1", "--out-dir", str(tmp_path), "--name", "i"])
    assert rc == 1
    data = json.loads((tmp_path / "i.json").read_text())
    ref, nat, broken = data["results"]
    assert ref["median_ms"] > 0 and nat["median_ms"] > 0 and nat["gflops"] > 0
    assert broken["error"] == "RuntimeError: broken on purpose"
    assert nat["settings"] == "native-fp32 as built"
    # warm-up of each (the broken one fails there), then 3 rounds of (untimed + timed) of the two
    # that work, alternating
    assert calls == ["ref-fp32", "native-fp32", "cpu-fp32"] + ["ref-fp32", "ref-fp32", "native-fp32", "native-fp32"] * 3, calls
    env = data["environment"]
    assert env["protocol"].startswith("interleaved") and env["load"] == "1 busy-looping processes beside the run"
    assert env["flops_per_pixel"]["msfin-s-x4"] == pytest.approx(99620, rel=0.01)
    md = (tmp_path / "i.md").read_text()
    assert "Protocol: interleaved" in md and "- native-fp32: native-fp32 as built" in md


def test_the_cpu_peers_record_their_settings(tmp_path):
    """ONNX Runtime and OpenVINO (where installed) say the threads, shapes and precision they ran with."""
    from helpers import require_module

    require_module("onnxruntime")
    latency = load_latency()
    import msfin_fast

    model = msfin_fast.MSFIN("msfin-s-x4").eval()
    fn, dtype = latency.build("onnxruntime-cpu-fp32", model, (1, 3, 4, 6))
    assert "intra-op threads" in fn.settings and "dynamic shapes" in fn.settings
    try:
        import openvino  # noqa: F401
    except ImportError:
        return
    fn, dtype = latency.build("openvino-cpu-fp32", model, (1, 3, 4, 6))
    assert "static shape 1x3x4x6" in fn.settings and "precision hint f32" in fn.settings
