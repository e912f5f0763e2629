"""Scale-out on Ray, on a local cluster started in this process on the CPU (2 CPUs).

The batch job (Ray Data): every output is byte-identical to ``Upscaler.upscale_file`` at the same
number of torch threads (oneDNN's fp32 convolutions round a few values the other way at another
thread count: 13 of 590k by one grey level, 1 against 2 threads; so every worker here gets one CPU,
hence one thread, and the references are made with one thread). Names and
folders are mirrored, unreadable files are error rows naming them (with the CLI's message), and a
rerun, even of a job killed with SIGKILL, does only what is left. The service (Ray Serve): a
replica answers, in local testing mode and over HTTP on 127.0.0.1 with 2 CPU replicas, as
``msfin-fast serve`` answers, byte for byte.
"""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, require_module

ray = require_module("ray")
require_module("ray.data")
require_module("ray.serve")
require_module("starlette")

from msfin_fast import Upscaler  # noqa: E402
from msfin_fast.cli import main  # noqa: E402
from msfin_fast.errors import InvalidInputError, MSFINError  # noqa: E402
from msfin_fast.cluster import (  # noqa: E402
    JobOptions,
    ServiceOptions,
    UpscaleWorker,
    build_app,
    plan_job,
    service,
    run_job,
)
from msfin_fast.cluster.jobs import plan_batches  # noqa: E402
from msfin_fast.resume import MANIFEST_NAME  # noqa: E402
from msfin_fast.run import RunOptions  # noqa: E402
from msfin_fast.server import Limits  # noqa: E402

from helpers import Running, free_port, request  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
MODEL = "msfin-s-x4"
# name → (size w×h, Pillow mode); 12 images over three folder levels, odd sizes, every form a file
# can take (RGB, RGBA, grey, grey + alpha), five formats, and three of one shape (one batch).
IMAGES = {
    "a.png": ((23, 17), "RGB"),
    "b.png": ((19, 21), "RGB"),
    "c.png": ((31, 9), "RGB"),
    "same1.png": ((24, 20), "RGB"),
    "same2.bmp": ((24, 20), "RGB"),
    "sub/same3.jpg": ((24, 20), "RGB"),
    "sub/rgba.png": ((22, 18), "RGBA"),
    "sub/grey.png": ((21, 19), "L"),
    "sub/grey_alpha.png": ((16, 16), "LA"),
    "sub/deeper/d.webp": ((15, 13), "RGB"),
    "sub/deeper/e.tif": ((14, 18), "RGB"),
    "sub/deeper/f.png": ((33, 15), "RGB"),
}
BAD = ["corrupt.png", "sub/empty.jpg"]


def synthesise(folder: Path, images=IMAGES, seed=0) -> None:
    rng = np.random.default_rng(seed)
    for name, ((w, h), mode) in images.items():
        channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        # Smooth it a little, so the JPEG and WebP files are pictures rather than noise.
        pixels = ((pixels.astype(np.uint16) + np.roll(pixels, 1, 0) + np.roll(pixels, 1, 1)) // 3).astype(np.uint8)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the run's Ray tests (they are all in this file), shut down after
    them so that the tests that follow do not share the two CPUs with Ray's daemons."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    synthesise(folder)
    good = (folder / "a.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good[: len(good) // 2])  # a PNG cut in half
    (folder / "sub" / "empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory, weights_dir) -> dict[str, bytes | str]:
    """name → what Upscaler.upscale_file writes for it with one torch thread (bytes), or the
    message it raises (str)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:  # a module fixture runs before the per-test environment
        mp.setenv("MSFIN_WEIGHTS_DIR", str(weights_dir))
        upscaler = Upscaler(MODEL, device="cpu")
    out = tmp_path_factory.mktemp("reference")
    expected = {}
    for name in [*IMAGES, *BAD]:
        src, dst = (archive / name).resolve(), out / name
        try:
            upscaler.upscale_file(src, dst)
            expected[name] = dst.read_bytes()
        except MSFINError as exc:
            expected[name] = str(exc)
    torch.set_num_threads(threads)
    return expected


def outputs(folder: Path) -> dict[str, bytes]:
    """The images under ``folder`` (not the resume manifest)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME}


def run(archive, out, rows=None, **options) -> object:
    options = {"model": MODEL, "cpus_per_worker": 1, **options}
    return run_job(archive, out, JobOptions(**options), recursive=True, progress=False,
                          on_row=None if rows is None else rows.append)


def test_batch_job_writes_what_upscale_file_writes(ray_cluster, archive, reference, tmp_path):
    rows = []
    summary = run(archive, tmp_path / "out", rows, workers=2, batch_size=4)
    by_name = {Path(r["path"]).relative_to(archive.resolve()).as_posix(): r for r in rows}
    assert sorted(by_name) == sorted([*IMAGES, *BAD]) and len(rows) == len(by_name)
    assert set(rows[0]) == {"path", "ok", "error", "seconds", "out_pixels", "worker"}
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()
    for name, ((w, h), _) in IMAGES.items():
        row = by_name[name]
        assert row["ok"] and row["error"] == "", row
        assert row["out_pixels"] == 16 * w * h and row["seconds"] > 0
    for name in BAD:
        row = by_name[name]
        assert not row["ok"] and row["out_pixels"] == 0
        assert row["error"] == reference[name]  # the CLI's message, naming the file
        assert str(archive.resolve() / name) in row["error"]
    # Names and folders mirrored, every output the API's bytes, nothing else written.
    assert outputs(tmp_path / "out") == {name: reference[name] for name in IMAGES}
    assert (summary.images, summary.failed, summary.skipped) == (12, 2, 0)
    assert summary.out_pixels == sum(16 * w * h for (w, h), _ in IMAGES.values())
    assert "upscaled 12 images ×4 with msfin-s-x4 on Ray (2 workers, cpu, fp32)" in summary.line()
    assert "2 failed" in summary.line()


def test_rerun_does_only_what_is_missing_or_incomplete(ray_cluster, archive, reference, tmp_path):
    out = tmp_path / "out"
    run(archive, out, batch_size=5)
    # Damage two outputs the ways a crash or a copy might: one cut short, one gone. Leave a
    # temporary file of a writer that no longer exists.
    cut = out / "sub" / "rgba.png"
    cut.write_bytes(cut.read_bytes()[:-20])
    (out / "sub" / "deeper" / "d.webp").unlink()
    stale = out / "sub" / ".grey.png.999999.AbCdEfGh.part"
    stale.write_bytes(b"half")
    job = plan_job(archive, out, JobOptions(model=MODEL, cpus_per_worker=1), recursive=True)
    assert job.skipped == 10 and len(job.todo) == 4  # the two damaged ones and the two unreadable ones
    assert job.why() == "1 redone: 1 output changed since it was written"
    rows = []
    summary = run(archive, out, rows)
    redone = sorted(Path(r["path"]).relative_to(archive.resolve()).as_posix() for r in rows)
    assert redone == sorted(["sub/rgba.png", "sub/deeper/d.webp", *BAD])
    assert (summary.images, summary.failed, summary.skipped) == (2, 2, 10)
    assert "10 already done (skipped)" in summary.line()
    assert outputs(out) == {name: reference[name] for name in IMAGES}  # the stale part is gone too
    rows.clear()
    assert run(archive, out, rows, workers=1).skipped == 12 and len(rows) == 2  # only the unreadable two
    rows.clear()
    summary = run_job(archive, out, JobOptions(model=MODEL, cpus_per_worker=1), recursive=True, overwrite=True,
                             progress=False, on_row=rows.append)
    assert len(rows) == 14 and summary.images == 12
    assert outputs(out) == {name: reference[name] for name in IMAGES}


def test_a_killed_job_resumes_where_it_stopped(ray_cluster, tmp_path, weights_dir):
    src, out = tmp_path / "in", tmp_path / "out"
    names = {f"{i:02d}.png": ((128, 96), "RGB") for i in range(24)}
    synthesise(src, names, seed=1)
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "msfin_fast", "upscale", "-i", str(src), "-o", str(out), "--model", MODEL,
           "--ray", address, "--workers", "1", "--cpus-per-worker", "1", "--batch-size", "1", "-q"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while len(list(out.glob("*.png"))) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the job wrote nothing in 240 s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, at once
        proc.wait()
    # Ray ends the dead driver's worker; wait until nothing more is written (an image takes 0.1 s).
    done, still = set(), time.monotonic()
    while time.monotonic() - still < 3:
        now = set(p.name for p in out.glob("*.png"))
        if now != done:
            done, still = now, time.monotonic()
        time.sleep(0.1)
    assert 3 <= len(done) < len(names), f"the job was not stopped half-way ({len(done)} of {len(names)})"
    rows = []
    summary = run_job(src, out, JobOptions(model=MODEL, workers=2, cpus_per_worker=1, batch_size=3),
                             progress=False,
                             on_row=rows.append)
    assert summary.skipped == len(done) and summary.images == len(names) - len(done) and not summary.failures
    assert {Path(r["path"]).name for r in rows} == set(names) - done
    assert not [p for p in out.iterdir() if p.suffix == ".part"]
    upscaler = Upscaler(MODEL, device="cpu")
    for name in names:
        expected = tmp_path / "ref" / name
        upscaler.upscale_file(src / name, expected)
        assert (out / name).read_bytes() == expected.read_bytes(), name


def test_cli_ray_upscale(ray_cluster, archive, reference, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["upscale", "-i", str(archive), "-o", str(out), "--model", MODEL, "--ray", "-r",
                 "--workers", "2", "--batch-size", "3", "-q"])
    err = capsys.readouterr().err
    assert code == 1  # two files failed
    for name in BAD:
        assert f"msfin-fast: error: {archive.resolve() / name}:" in err
    assert outputs(out) == {name: reference[name] for name in IMAGES}
    code = main(["upscale", "-i", str(archive), "-o", str(out), "--model", MODEL, "--ray", "-r"])
    printed = capsys.readouterr().out
    assert code == 1 and "upscaled 0 images" in printed and "12 already done (skipped)" in printed


def test_batches_are_sized_to_spread_the_images_over_the_workers():
    # (images, workers, batch_size) → (images per call, blocks of the dataset)
    assert plan_batches(5, 2, 8) == (3, 5)  # not one batch of 5 for one worker of two
    assert plan_batches(5, 1, 8) == (5, 5)
    assert plan_batches(1, 4, 8) == (1, 1)
    assert plan_batches(7, 4, 8) == (2, 7)
    assert plan_batches(100, 2, 8) == (8, 100)
    assert plan_batches(1000, 2, 8) == (8, 125)  # above ROW_BLOCKS: blocks of at least a batch
    assert plan_batches(1003, 2, 8) == (8, 125)
    assert plan_batches(300, 100, 8) == (3, 100)
    for images, workers, batch_size in [(5, 2, 8), (7, 4, 8), (1, 4, 8), (1000, 2, 8), (300, 100, 8), (9, 3, 2)]:
        batch, blocks = plan_batches(images, workers, batch_size)
        assert 1 <= batch <= batch_size and blocks <= images
        assert math.ceil(images / batch) >= min(workers, math.ceil(images / batch_size))  # enough for the workers
    with pytest.raises(InvalidInputError, match="workers must be an integer >= 1"):
        plan_batches(5, 0, 8)


def test_a_small_job_runs_on_every_worker_and_keeps_ray_quiet(ray_cluster, tmp_path, capfd, monkeypatch):
    """5 images, 2 workers, --batch-size 8: batches of 3 and 2, one for each worker (the job waits
    for both to be up). On the terminal: the line naming Ray's logs, not Ray's own lines."""
    from msfin_fast.cluster.common import ray_logs_dir

    src = tmp_path / "in"
    synthesise(src, {f"{i}.png": ((12, 10), "RGB") for i in range(5)}, seed=6)
    monkeypatch.setattr(ray.data.context, "_default_context", None)  # made anew in the job, as in a CLI run
    rows = []
    capfd.readouterr()
    summary = run_job(src, tmp_path / "out", JobOptions(model=MODEL, workers=2, batch_size=8, cpus_per_worker=1),
                      progress=True, on_row=rows.append)
    out, err = capfd.readouterr()
    assert summary.images == 5 and not summary.failures
    per_worker = {}
    for row in rows:
        per_worker.setdefault(row["worker"], []).append(Path(row["path"]).name)
    assert sorted(len(names) for names in per_worker.values()) == [2, 3], per_worker
    assert out == "" and err == f"msfin-fast: Ray logs: {ray_logs_dir(ray)}\n", err


def test_workers_that_cannot_start_are_one_line_not_ray_tracebacks(ray_cluster, tmp_path, capfd, monkeypatch):
    """No weights where the workers look: the CLI says so in one line; none of the workers'
    tracebacks that Ray's error listener prints reaches the terminal."""
    src = tmp_path / "in"
    synthesise(src, {"a.png": ((12, 10), "RGB")}, seed=7)
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setenv("MSFIN_OFFLINE", "1")
    monkeypatch.setattr(ray.data.context, "_default_context", None)
    capfd.readouterr()
    assert main(["upscale", "-i", str(src), "-o", str(tmp_path / "out"), "--ray", "-n", MODEL, "--device", "cpu"]) == 1
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "(raylet)" not in out + err, out + err
    lines = err.strip().splitlines()
    assert lines[0].startswith("msfin-fast: Ray logs: ") and len(lines) == 2, err
    assert lines[1].startswith("msfin-fast: error: the Ray workers could not start: msfin-s-x4: weights")


def test_worker_failure_finds_the_packages_message():
    from msfin_fast.cluster.jobs import worker_failure

    text = ("ActorDiedError: the actor died\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
            "msfin_fast.errors.WeightsError: msfin-x4: weights MSFIN_X4.pt not found\n\nAnother: x\n")
    assert worker_failure(RuntimeError(text)) == "msfin-x4: weights MSFIN_X4.pt not found"
    assert worker_failure(RuntimeError("boom\n  torch.OutOfMemoryError: CUDA out of memory\n")) == \
        "OutOfMemoryError: CUDA out of memory"
    assert worker_failure(RuntimeError("just this")) == "just this"


def _ray_talks(quiet: bool) -> None:
    """Inside ray_session (Ray already up), with the CLI's warnings: Ray Data's own
    DeprecationWarnings, a warning of this package, a line Ray's C++ core writes to stderr, Ray's
    log lines."""
    from msfin_fast import cli
    from msfin_fast.cluster.common import ray_session

    # Ray's console handlers write to the stream sys.stderr was when they were made: in a CLI run
    # the terminal, here pytest's; for this test, to what sys.stderr is now.
    consoles = [(h, h.stream) for name in ("ray", "ray.data") for h in logging.getLogger(name).handlers
                if type(h).__name__ == "PlainRayHandler"]
    assert len(consoles) == 2
    for handler, _ in consoles:
        handler.setStream(sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = cli._show_warning
            with ray_session(quiet=quiet):
                ray.data.DataContext()  # `use_push_based_shuffle` is deprecated! (and two more)
                warnings.warn_explicit("a warning of this package", UserWarning, cli.__file__, 1)
                os.write(2, b"[E 1 1] core_worker.cc:1: a line of Ray's C++ core\n")
                logging.getLogger("ray.data.spam").info("an INFO line of Ray Data")
                logging.getLogger("ray.spam").warning("a WARNING line of Ray")
    finally:
        for handler, stream in consoles:
            handler.setStream(stream)


def test_ray_s_own_output_goes_to_its_logs_unless_verbose(ray_cluster, capfd, monkeypatch):
    from msfin_fast.cluster.common import DRIVER_LOG, ray_logs_dir

    logs = Path(ray_logs_dir(ray))
    driver_log = logs / DRIVER_LOG.format(pid=os.getpid())
    before = driver_log.read_text() if driver_log.exists() else ""
    # sys.stderr on descriptor 2, as in a terminal: descriptor 2 goes to the file, Python's stderr
    # still to the terminal.
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    capfd.readouterr()
    _ray_talks(quiet=True)
    monkeypatch.undo()
    err = capfd.readouterr().err
    assert err.splitlines() == [f"msfin-fast: Ray logs: {logs}", "msfin-fast: warning: a warning of this package"]
    written = driver_log.read_text()[len(before):]
    assert "DeprecationWarning: `use_push_based_shuffle` is deprecated" in written
    assert "a line of Ray's C++ core" in written and "a WARNING line of Ray" in written
    assert "an INFO line of Ray Data" in (logs / "ray-data" / "ray-data.log").read_text()
    # Verbose: all of it on the terminal, as Ray prints it; Ray's warnings in Python's form, not
    # labelled as this package's.
    _ray_talks(quiet=False)
    err = capfd.readouterr().err
    assert "msfin-fast: warning: a warning of this package" in err
    assert "DeprecationWarning: `use_push_based_shuffle` is deprecated" in err
    assert "msfin-fast: warning: `use_push_based_shuffle`" not in err and "Ray logs" not in err
    for line in ("a line of Ray's C++ core", "INFO", "an INFO line of Ray Data", "a WARNING line of Ray"):
        assert line in err, (line, err)


def test_a_quiet_session_starts_ray_quietly(ray_cluster, monkeypatch, capfd):
    """What ray_session passes to ray.init when it starts Ray (here a stand-in, on the running
    cluster): workers' output not sent to the driver while quiet; Ray's own way with -v."""
    from msfin_fast.cluster.common import ray_session

    calls, up = [], [False]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: up[0])
    monkeypatch.setattr(ray, "init", lambda **kw: (calls.append(kw), up.__setitem__(0, True)))
    monkeypatch.setattr(ray, "shutdown", lambda: (calls.append("shutdown"), up.__setitem__(0, False)))
    for quiet in (True, False):
        with ray_session(quiet=quiet):
            pass
    assert calls == [{"address": None, "logging_level": logging.WARNING, "log_to_driver": False,
                      "include_dashboard": False}, "shutdown",
                     {"address": None, "logging_level": logging.WARNING, "include_dashboard": False}, "shutdown"]


def test_bad_job_options_are_refused_before_any_work(archive, tmp_path, capsys):
    for options, message in [
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"batch_size": 1.5}, "batch_size must be an integer"),
        ({"gpus_per_worker": -1}, "gpus_per_worker must be a number >= 0"),
        ({"device": "cuda"}, "needs GPUs per worker > 0"),
        ({"device": "cuda:1", "gpus_per_worker": 1}, "device must be auto, cpu or cuda"),
        ({"run": {"tile": 16, "tile_mode": "exact"}, "backend": "cpu"}, "use backend='reference'"),
        ({"run": {"tile": 2}}, "tile=2 is too small"),
        ({"model": "msfin-x2"}, "model must be one of"),
        ({"dtype": "int8"}, "dtype must be fp32, fp16 or bf16"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            JobOptions(**{k: RunOptions(**v) if k == "run" else v for k, v in options.items()})
    with pytest.raises(InvalidInputError, match="run must be a RunOptions"):
        JobOptions(run={"tile": 16})
    assert JobOptions(run=RunOptions(tile=16, tile_mode="exact")).worker_backend == "reference"  # the default
    with pytest.raises(InvalidInputError, match="is inside the input folder"):
        plan_job(archive, archive / "out", recursive=True)
    with pytest.raises(InvalidInputError, match="output folder is the input folder"):
        plan_job(archive, archive)
    with pytest.raises(InvalidInputError, match="no images in this folder"):
        plan_job(tmp_path, tmp_path / "out")
    assert main(["upscale", "-i", str(archive), "-o", str(tmp_path / "o"), "--workers", "2"]) == 1
    assert "--workers only apply with --ray" in capsys.readouterr().err
    assert main(["upscale", "-i", str(archive / "a.png"), "-o", str(tmp_path / "a.png"), "--ray"]) == 1
    assert "--ray upscales a folder" in capsys.readouterr().err
    assert main(["serve", "--replicas", "2"]) == 1
    assert "--replicas only apply with --ray" in capsys.readouterr().err


def test_plan_job_keeps_a_linked_file_at_its_link(tmp_path):
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    synthesise(elsewhere, {"x.png": ((9, 9), "RGB")})
    synthesise(src, {"a.png": ((9, 9), "RGB")})
    (src / "sub").mkdir()
    (src / "sub" / "link.png").symlink_to(elsewhere / "x.png")
    job = plan_job(src, tmp_path / "out", recursive=True)
    files = [f for f, _ in job.todo]
    assert files == [src.resolve() / "a.png", src.resolve() / "sub" / "link.png"] and job.skipped == 0


def test_a_job_names_its_outputs_with_suffix_and_ext_as_the_cli(tmp_path):
    from msfin_fast.folders import plan_folder

    src = tmp_path / "in"
    synthesise(src, {"a.png": ((9, 9), "RGB"), "b.jpg": ((9, 9), "RGB")})
    options = JobOptions(model=MODEL, suffix="x4", ext="webp")
    job = plan_job(src, tmp_path / "out", options)
    assert [out.name for _, out in job.todo] == ["a_x4.webp", "b_x4.webp"]
    cli_plan = plan_folder(src, tmp_path / "out", suffix="x4", ext="webp")
    assert [out.resolve() for _, out in cli_plan.pairs] == [out for _, out in job.todo]
    # and the workers write where the plan says (the manifest and resume check look there)
    from msfin_fast.cluster.jobs import output_path

    root_in, root_out = src.resolve(), (tmp_path / "out").resolve()
    assert [output_path(root_in, root_out, str(f), options) for f, _ in job.todo] == [out for _, out in job.todo]
    with pytest.raises(InvalidInputError, match="--ext 'gif'"):
        JobOptions(model=MODEL, ext="gif")


def test_plain_cli_folder_walks_the_tree_with_recursive(archive, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["upscale", "-i", str(archive), "-o", str(out), "--model", MODEL, "-r", "-q"]) == 1
    assert outputs(out) == {name: reference[name] for name in IMAGES}
    flat = tmp_path / "flat"
    assert main(["upscale", "-i", str(archive), "-o", str(flat), "--model", MODEL, "-q"]) == 1
    assert sorted(outputs(flat)) == sorted(n for n in IMAGES if "/" not in n)


def test_a_job_redoes_what_other_settings_or_a_changed_input_made(ray_cluster, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    synthesise(src, {"a.png": ((23, 17), "RGB"), "b.tif": ((14, 18), "RGB"), "c.jpg": ((19, 21), "RGB")}, seed=3)
    assert run(src, out).images == 3
    first = outputs(out)
    # Another model: every output is redone (the size-and-trailer rule took them for done).
    summary = run(src, out, model="msfin-x4")
    assert (summary.images, summary.skipped) == (3, 0)
    assert "3 redone: 3 made with other settings (model msfin-s-x4 → msfin-x4" in summary.line()
    assert all(outputs(out)[name] != first[name] for name in first)
    assert run(src, out, model="msfin-x4").skipped == 3
    # An option, an input edited since, a TIFF cut in half: each is redone, and the line says why.
    summary = run(src, out, model="msfin-x4", run=RunOptions(self_ensemble=True))
    assert summary.images == 3 and "(self_ensemble False → True)" in summary.line()
    synthesise(src, {"a.png": ((23, 17), "RGB")}, seed=4)
    tif = out / "b.tif"
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])
    rows = []
    summary = run(src, out, rows, model="msfin-x4", run=RunOptions(self_ensemble=True))
    assert sorted(Path(r["path"]).name for r in rows) == ["a.png", "b.tif"] and summary.skipped == 1
    assert "1 input changed since its output was made" in summary.line()
    assert "1 output changed since it was written" in summary.line()
    # The plain CLI folder run reads the same manifest: nothing left to do with these settings.
    assert main(["upscale", "-i", str(src), "-o", str(out), "--model", "msfin-x4", "--self-ensemble",
                 "--skip-existing", "-q"]) == 0
    assert {n: p.stat().st_mtime_ns for n, p in ((n, out / n) for n in first)} == \
        {n: (out / n).stat().st_mtime_ns for n in first}


def test_a_newline_in_a_name_a_vanished_file_and_a_huge_one_are_error_rows(ray_cluster, tmp_path, weights_dir):
    src, out = tmp_path / "in", tmp_path / "out"
    synthesise(src, {"ok.png": ((23, 17), "RGB"), "new\nline.png": ((19, 21), "RGB"),
                     "huge.png": ((90, 80), "RGB")}, seed=5)
    rows = []
    summary = run(src, out, rows)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["ok.png"]["ok"] and by_name["new\nline.png"]["ok"], rows
    assert (out / "new\nline.png").is_file() and (summary.images, summary.failed) == (3, 0)
    # An image over max_pixels (read from its header): its row, the rest done.
    rows.clear()
    summary = run(src, tmp_path / "small", rows, max_pixels=5000)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert (summary.images, summary.failed) == (2, 1) and not (tmp_path / "small" / "huge.png").exists()
    assert "90×80 is 7,200 pixels, over the limit of 5,000" in by_name["huge.png"]["error"]
    # A file that goes between the listing and its read: that file's row, the rest complete.
    worker = UpscaleWorker(str(src.resolve()), str(tmp_path / "w"), JobOptions(model=MODEL, cpus_per_worker=1))
    gone = src.resolve() / "gone.png"
    result = worker({"path": np.array([str(gone), str(src.resolve() / "ok.png")], dtype=object)})
    assert list(result["ok"]) == [False, True]
    assert result["error"][0] == f"{gone}: no such file (gone since the job listed it)"
    assert (tmp_path / "w" / "ok.png").is_file()


def test_an_address_that_does_not_answer_is_a_one_line_error(tmp_path):
    synthesise(tmp_path / "in", {"a.png": ((9, 9), "RGB")})
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "msfin_fast", "upscale", "-i", str(tmp_path / "in"), "-o",
                           str(tmp_path / "out"), "--ray", f"127.0.0.1:{port}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - started < 60, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"msfin-fast: error: cannot reach the Ray cluster at 127.0.0.1:{port} (Connection refused); "
                     "is it running, and is the address host:port of its head node?"], proc.stderr
    # A host that does not answer at all: the wait is bounded.
    from msfin_fast.cluster import check_reachable

    started = time.monotonic()
    with pytest.raises(MSFINError, match="cannot reach the Ray cluster at 192.0.2.1:6379"):
        check_reachable("192.0.2.1:6379", timeout=1.0)  # TEST-NET-1: never routed
    assert time.monotonic() - started < 10
    with pytest.raises(InvalidInputError, match="expected auto, host:port or ray://host:port"):
        check_reachable("nohost")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_hangup_shuts_the_local_cluster_down(tmp_path):
    """The terminal closing (SIGHUP) unwinds the driver like Ctrl-C: the local cluster it started
    stops with it, instead of Ray's processes lingering for a minute."""
    src, out = tmp_path / "in", tmp_path / "out"
    synthesise(src, {f"{i:02d}.png": ((128, 96), "RGB") for i in range(40)}, seed=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "msfin_fast", "upscale", "-i", str(src), "-o", str(out),
                             "--model", MODEL, "--ray", "--cpus-per-worker", "1", "--batch-size", "1", "-q"],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not list(out.glob("*.png")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the job wrote nothing in 240 s"
            time.sleep(0.05)
        started = descendants(proc.pid)
        assert started, "the driver started no cluster processes"
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 129, err
        assert "msfin-fast: terminated" in err
        left = {pid for pid in started if alive(pid)}
        wait = time.monotonic() + 20
        while left and time.monotonic() < wait:
            time.sleep(0.2)
            left = {pid for pid in left if alive(pid)}
        assert not left, f"Ray processes still running after the driver ended: {sorted(left)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Ray Serve


def png_bytes(name: str, archive: Path) -> bytes:
    """The file as an upload (PNG, or re-encoded as PNG for the other formats)."""
    buffer = io.BytesIO()
    with Image.open(archive / name) as img:
        img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_service_in_local_testing_mode(archive, weights_dir):
    from ray import serve

    from msfin_fast import ServingUpscaler
    from msfin_fast.server import decode_upload, encode_png

    handle = serve.run(service(ServiceOptions(model=MODEL)), name="msfin-local", _local_testing_mode=True)
    direct = ServingUpscaler(MODEL, device="cpu")
    try:
        for name in ["a.png", "sub/rgba.png", "sub/grey_alpha.png"]:
            body = png_bytes(name, archive)
            picture = decode_upload(body, Limits())
            expected = encode_png(picture, direct.upscale(picture.rgb), 4)
            assert handle.upscale.remote(body).result(timeout_s=120) == expected, name
        with pytest.raises(InvalidInputError, match="not an image file"):
            handle.upscale.remote(b"not an image").result(timeout_s=60)
    finally:
        direct.close()


def test_service_over_http_with_two_replicas_answers_like_msfin_fast_serve(ray_cluster, archive, weights_dir):
    from ray import serve

    from msfin_fast import ServingUpscaler
    from msfin_fast.cluster import run_service

    limits = Limits(max_body=200_000, max_pixels=600)
    port = free_port()
    run_service(ServiceOptions(model=MODEL, replicas=2), limits, port=port, blocking=False)
    try:
        status = serve.status().applications["msfin"].deployments["msfin"]
        assert status.replica_states.get("RUNNING") == 2, status
        uploads = [png_bytes(n, archive) for n in ["a.png", "b.png", "sub/rgba.png", "sub/grey.png",
                                                   "sub/grey_alpha.png", "same1.png"]]
        uploads += [b"not an image", b"", png_bytes("sub/deeper/f.png", archive)[:40],
                    np.zeros(300_000, np.uint8).tobytes()]
        big = io.BytesIO()
        Image.new("RGB", (30, 30)).save(big, format="PNG")  # 900 px > max_pixels
        uploads.append(big.getvalue())
        with ThreadPoolExecutor(6) as pool:
            via_ray = list(pool.map(lambda body: request(port, "/upscale", body, timeout=120), uploads))
        with ServingUpscaler(MODEL, device="cpu") as local, Running(local, limits) as server:
            plain = [request(server.port, "/upscale", body, timeout=120) for body in uploads]
            health_plain = request(server.port, "/healthz")
        for (s1, h1, b1), (s2, h2, b2) in zip(via_ray, plain):
            assert (s1, h1["content-type"], b1) == (s2, h2["content-type"], b2)
        assert [s for s, _, _ in via_ray] == [200] * 6 + [400, 400, 400, 413, 400]
        health = request(port, "/healthz")
        assert health[0] == 200 and health[2] == health_plain[2]
        assert b"msfin_requests_total" in request(port, "/metrics")[2]
    finally:
        serve.shutdown()


def test_msfin_fast_serve_ray_command(ray_cluster, archive, reference, weights_dir):
    """``msfin-fast serve --ray ADDRESS`` in its own process, on this cluster: once it says it is
    serving it answers, and Ctrl-C takes its application down and exits 0."""
    import threading

    from ray import serve

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "msfin_fast", "serve", "--model", MODEL, "--port", str(port),
                             "--ray", ray.get_runtime_context().gcs_address, "--replicas", "1",
                             "--cpus-per-replica", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("from 1 Ray Serve replica" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        status, headers, body = request(port, "/upscale", (archive / "a.png").read_bytes(), timeout=120)
        assert status == 200
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))),
                              np.asarray(Image.open(io.BytesIO(reference["a.png"]))))  # the API's pixels
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(30)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "stopping the service" in output
    assert "msfin" not in serve.status().applications
    serve.shutdown()


def test_build_app_for_serve_run_takes_string_arguments():
    from ray.serve.deployment import Application

    assert isinstance(build_app({"model": MODEL, "replicas": "2", "gpus_per_replica": "0.5",
                                 "batch_window": "0.004"}), Application)
    with pytest.raises(InvalidInputError, match="unknown argument"):
        build_app({"replica": "2"})
    with pytest.raises(InvalidInputError, match="replicas='two' must be a number"):
        build_app({"replicas": "two"})
    with pytest.raises(InvalidInputError, match="needs GPUs per replica > 0"):
        build_app({"device": "cuda"})


def test_a_replica_fails_its_health_check_once_its_model_thread_stops(weights_dir):
    from msfin_fast.cluster import MSFINReplica

    replica = MSFINReplica(ServiceOptions(model=MODEL))
    replica.check_health()
    replica.upscaler.close()
    with pytest.raises(MSFINError, match="model thread has stopped"):
        replica.check_health()
