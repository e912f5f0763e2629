"""The msfin-fast CLI: the main job, folders, and one-line errors with a non-zero exit."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msfin_fast.cli import main
from msfin_fast.errors import InvalidInputError

RNG = np.random.default_rng(0)


def _png(path, shape=(12, 10, 3), mode=None):
    arr = RNG.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return path


def test_sample_then_upscale(tmp_path, weights_dir, capsys):
    lr = tmp_path / "lr.png"
    assert main(["sample", str(lr), "--size", "24"]) == 0
    assert Image.open(lr).size == (24, 24)
    assert main(["upscale", "-i", str(lr), "-o", str(tmp_path / "sr.png"), "--model", "msfin-s-x4"]) == 0
    assert Image.open(tmp_path / "sr.png").size == (96, 96)
    summary = capsys.readouterr().out
    assert "upscaled 1 image ×4 with msfin-s-x4 on cpu (fp32)" in summary and "Mpx/s" in summary


def test_folder_with_every_kind_and_one_bad_file(tmp_path, weights_dir, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _png(src / "rgb.png")
    _png(src / "grey.bmp", (9, 7), "L")
    _png(src / "alpha.webp", (8, 8, 4), "RGBA")
    Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / "photo.jpg")
    (src / "broken.png").write_bytes(b"garbage")
    (src / "notes.txt").write_text("skipped")
    rc = main(["upscale", "-i", str(src), "-o", str(dst), "--model", "msfin-s-x4"])
    assert rc == 1  # one image failed; the rest were written
    captured = capsys.readouterr()
    assert "broken.png: not an image file" in captured.err
    assert "[5/5]" in captured.err  # progress
    assert "upscaled 4 images" in captured.out and "1 failed" in captured.out
    # The four outputs, and the manifest that records what made them (for --skip-existing).
    assert sorted(p.name for p in dst.iterdir()) == [".msfin-fast-manifest.jsonl", "alpha.webp", "grey.bmp",
                                                     "photo.jpg", "rgb.png"]
    assert Image.open(dst / "grey.bmp").mode == "L" and Image.open(dst / "grey.bmp").size == (28, 36)
    assert Image.open(dst / "alpha.webp").mode == "RGBA"
    assert Image.open(dst / "rgb.png").size == (40, 48)


@pytest.mark.parametrize(
    "setup, args, fragments",
    [
        (lambda d: None, ["-i", "{d}/none.png", "-o", "{d}/o.png"], ["none.png", "no such file"]),
        (lambda d: (d / "x.png").write_bytes(b"no"), ["-i", "{d}/x.png", "-o", "{d}/o.png"], ["not an image"]),
        (lambda d: _png(d / "x.png"), ["-i", "{d}/x.png", "-o", "{d}/o.gif"], ["unsupported output type"]),
        (lambda d: (_png(d / "x.png"), (d / "f").write_text("")), ["-i", "{d}/x.png", "-o", "{d}/f/o.png"],
         ["is not a folder"]),
        (lambda d: _png(d / "x.png"), ["-i", "{d}/x.png", "-o", "{d}/x.png"], ["would overwrite the input"]),
        (lambda d: _png(d / "x.png"), ["-i", "{d}/x.png", "-o", "{d}/o.png", "--weights", "{d}/w.pt"],
         ["w.pt not found"]),
        (lambda d: _png(d / "x.png"), ["-i", "{d}/x.png", "-o", "{d}/o.png", "--device", "tpu"],
         ["unknown device"]),
        (lambda d: (d / "empty").mkdir(), ["-i", "{d}/empty", "-o", "{d}/out"], ["no images"]),
    ],
    ids=["missing", "not-image", "bad-suffix", "parent-is-file", "overwrite-input", "no-weights",
         "bad-device", "empty-folder"],
)
def test_bad_input_gives_one_line_and_exit_1(tmp_path, weights_dir, capsys, setup, args, fragments, one_line_error):
    setup(tmp_path)
    argv = ["upscale", "--model", "msfin-s-x4"] + [a.format(d=tmp_path) for a in args]
    assert main(argv) == 1
    one_line_error(*fragments)
    assert not (tmp_path / "o.png").exists()


def test_missing_released_weights(tmp_path, capsys, monkeypatch, one_line_error):
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(tmp_path / "nothing"))
    _png(tmp_path / "x.png")
    assert main(["upscale", "-i", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png")]) == 1
    one_line_error("msfin-x4", "MSFIN_X4.pt", "MSFIN_WEIGHTS_DIR")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_corrupt_released_weights(tmp_path, weights_dir, capsys, monkeypatch, one_line_error):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "MSFIN_X4.pt").write_bytes((weights_dir / "MSFIN_X4.pt").read_bytes()[:5000])
    monkeypatch.setenv("MSFIN_WEIGHTS_DIR", str(tmp_path / "w"))
    _png(tmp_path / "x.png")
    assert main(["upscale", "-i", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png")]) == 1
    one_line_error("not the released msfin-x4 checkpoint")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["upscale", "-o", "x.png"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["upscale", "-i", "x", "-o", "y", "--model", "edsr"])
    assert info.value.code == 2


def test_eval_prints_a_table(tmp_path, weights_dir, data_dir, capsys):
    folder = tmp_path / "Mini"
    folder.mkdir()
    Image.open(data_dir / "Set5" / "butterfly.png").save(folder / "butterfly.png")
    rc = main(["eval", "--model", "msfin-s-x4", "bicubic", "--data", str(folder), "--per-image"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "butterfly" in out and "PSNR (dB)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("msfin-s-x4 ", "bicubic "))]
    scores = {row[0]: float(row[3]) for row in rows}
    assert scores["msfin-s-x4"] > scores["bicubic"] + 2  # SR must beat bicubic clearly


def test_eval_on_a_missing_folder(tmp_path, capsys, one_line_error):
    assert main(["eval", "--model", "bicubic", "--data", str(tmp_path / "nope")]) == 1
    one_line_error("not a folder")


def test_info(weights_dir, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "682,159 parameters" in out and "351,851 parameters" in out
    assert f"{weights_dir / 'MSFIN_X4.pt'} (SHA-256 ok)" in out
    assert "reference (PyTorch)" in out and "triton" in out
    onnx_line = next(line for line in out.splitlines() if line.startswith("onnx export: "))
    try:
        import onnx, onnxruntime, onnxscript  # noqa: E401, F401

        assert f"onnx {onnx.__version__}" in onnx_line
    except ImportError:
        assert "pip install 'msfin_fast[onnx]'" in onnx_line


def test_console_entry_point_runs_without_traceback(tmp_path):
    # A real process: the module entry point, a bad input, one line on stderr, exit 1.
    proc = subprocess.run(
        [sys.executable, "-m", "msfin_fast", "upscale", "-i", str(tmp_path / "x.png"), "-o", str(tmp_path / "y.png")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"msfin-fast: error: {tmp_path / 'x.png'}: no such file or folder"]


def _upscale_with_altered_weights(tmp_path, weights_dir, alter) -> int:
    """``upscale`` of a small picture to o.png with MSFIN-S weights changed in place by ``alter``."""
    import torch

    state = torch.load(weights_dir / "MSFIN-S_X4.pt", map_location="cpu", weights_only=True)
    alter(state)
    torch.save(state, tmp_path / "altered.pt")
    _png(tmp_path / "x.png")
    return main(["upscale", "-i", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"),
                 "--model", "msfin-s-x4", "--weights", str(tmp_path / "altered.pt")])


def test_weights_with_nan_fail_before_any_image_is_written(tmp_path, weights_dir, capsys, one_line_error):
    def damage(state):
        state["block_re2.body.0.bias"][3] = float("nan")

    assert _upscale_with_altered_weights(tmp_path, weights_dir, damage) == 1
    one_line_error("block_re2.body.0.bias", "NaN")
    assert not (tmp_path / "o.png").exists()


def _folder_job(tmp_path, count=40, size=48):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(count):
        _png(src / f"{i:03d}.png", (size, size, 3))
    return src, dst


def _parts(folder):
    return sorted(p.name for p in folder.glob(".*.part")) if folder.exists() else []


@pytest.mark.parametrize("sig, status, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signalled_folder_run_stops_cleanly(tmp_path, weights_dir, sig, status, word):
    """SIGTERM is handled like Ctrl-C: the run stops, no temporary file is left, the exit status
    says which signal, and every output that exists is a complete image."""
    import os
    import signal
    import time

    src, dst = _folder_job(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "msfin_fast", "upscale", "-i", str(src), "-o", str(dst),
                             "--model", "msfin-s-x4", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MSFIN_WEIGHTS_DIR": str(weights_dir)})
    deadline = time.monotonic() + 120
    while not (dst.exists() and any(dst.glob("*.png"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert f"msfin-fast: {word}" in err and "Traceback" not in err
    written = sorted(dst.glob("*.png"))
    assert 0 < len(written) < 40, "the signal did not stop the run"
    assert _parts(dst) == []
    for path in written:
        assert Image.open(path).size == (192, 192)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path, weights_dir, capsys):
    """A SIGKILLed run cannot clean up; the next run into the same folder removes what it left,
    but never the temporary file of a writer that is still running."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    src, dst = _folder_job(tmp_path, count=2, size=8)
    dst.mkdir()
    stale = dst / f".000.png.{dead.pid}.abcd_123.part"
    live = dst / f".001.png.{os.getpid()}.zz99aa11.part"
    unrelated = dst / ".notes.part"
    for p in (stale, live, unrelated):
        p.write_bytes(b"partial")
    assert main(["upscale", "-i", str(src), "-o", str(dst), "--model", "msfin-s-x4"]) == 0
    assert _parts(dst) == sorted([live.name, unrelated.name])
    assert "removed 1 temporary file(s) left by an interrupted earlier run" in capsys.readouterr().err


def test_an_output_that_overflows_is_an_error_not_a_black_image(tmp_path, weights_dir, capsys, one_line_error):
    """Finite weights that overflow fp32 (the tail scaled by 1e38) used to write a black or white image
    and exit 0."""
    def scale_tail(state):
        state["tail2.weight"] *= 1e38

    assert _upscale_with_altered_weights(tmp_path, weights_dir, scale_tail) == 1
    one_line_error("NaN/Inf", "No image was made")
    assert not (tmp_path / "o.png").exists() and _parts(tmp_path) == []


def test_every_door_takes_its_default_backend_from_one_function(monkeypatch, weights_dir):
    """engine.default_backend decides the backend where none is named: auto on a CPU (the native
    kernels, else the cpu backend), the reference for exact tiles, on a GPU and for a custom module.
    Replaced, every door follows it: Upscaler, ServingUpscaler, the CLI, Ray jobs and services."""
    import torch

    import msfin_fast.engine as engine
    from msfin_fast import ServingUpscaler, Upscaler
    from msfin_fast.cli import _make_upscaler, build_parser
    from msfin_fast.engine import default_backend
    from msfin_fast.cluster import JobOptions, ServiceOptions

    assert default_backend("cpu") == "auto"
    assert default_backend("cpu", "exact") == "reference"
    assert default_backend("cuda") == "reference"
    assert default_backend("cpu", "plain", torch.nn.Identity()) == "reference"

    asked = []

    def decided(device, tile_mode="plain", model=None):
        asked.append((torch.device(device).type, tile_mode))
        return "cpu"

    monkeypatch.setattr(engine, "default_backend", decided)
    up = Upscaler("msfin-s-x4", device="cpu")
    assert (up.requested_backend, up.backend) == ("cpu", "cpu")
    serving = ServingUpscaler("msfin-s-x4", device="cpu")
    try:
        assert serving.backend == "cpu"
    finally:
        serving.close()
    args = build_parser().parse_args(["upscale", "-i", "a.png", "-o", "b.png", "--model", "msfin-s-x4",
                                      "--device", "cpu", "--tile", "16", "--tile-mode", "exact"])
    with pytest.raises(InvalidInputError, match="exact tiles"):  # the default was asked, and said cpu
        _make_upscaler(args.model, args)
    assert JobOptions(device="cpu").worker_backend == "cpu"
    assert ServiceOptions(device="cpu").upscaler_kwargs()["backend"] == "cpu"
    assert asked == [("cpu", "plain")] * 2 + [("cpu", "exact")] + [("cpu", "plain")] * 2
    # an explicit backend always wins
    assert Upscaler("msfin-s-x4", device="cpu", backend="reference").backend == "reference"
    assert JobOptions(device="cpu", backend="reference").worker_backend == "reference"
    assert len(asked) == 5


def test_bf16_on_a_cpu_runs_the_native_kernels_within_a_grey_level(tmp_path, weights_dir, capsys):
    """--bf16: the native kernels with the addends stored in bf16, the image taken in fp32 and
    rounded once: at most one grey level from the --fp32 picture."""
    lr = tmp_path / "lr.png"
    assert main(["sample", str(lr), "--size", "20"]) == 0
    for flag in ("--fp32", "--bf16"):
        assert main(["upscale", "-i", str(lr), "-o", str(tmp_path / f"sr{flag}.png"), "--model", "msfin-s-x4",
                     "--device", "cpu", "--backend", "native", flag]) == 0
    assert "(bf16)" in capsys.readouterr().out
    a, b = (np.asarray(Image.open(tmp_path / f"sr{flag}.png"), dtype=int) for flag in ("--fp32", "--bf16"))
    assert a.shape == b.shape == (80, 80, 3)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.05


# --- The conventions users bring from Real-ESRGAN's inference script ---------------------------------


def test_real_esrgan_flags_are_the_same_options_as_ours():
    from msfin_fast.cli import parse

    short = parse(["upscale", "-i", "a.png", "-n", "msfin-s-x4", "-t", "32", "--half", "-s", "2.5",
                   "--suffix", "out", "--ext", "jpg"])
    long = parse(["upscale", "-i", "a.png", "--model", "msfin-s-x4", "--tile", "32", "--fp16", "--outscale", "2.5",
                  "--suffix", "out", "--ext", "jpg"])
    assert vars(short) == vars(long)
    assert (short.model, short.tile, short.precision, short.outscale) == ("msfin-s-x4", 32, "fp16", 2.5)
    assert parse(["upscale", "-i", "a.png", "--model-name", "msfin-s-x4"]).model == "msfin-s-x4"
    assert parse(["upscale", "-i", "a.png"]).output is None  # -o is optional
    assert parse(["upscale", "-i", "a.png", "-o", "out.d/"]).output == "out.d/"  # the / is kept: a folder


@pytest.mark.parametrize("flag", ["-s", "--outscale"])
@pytest.mark.parametrize("bad", ["0", "-2", "nan", "inf", "x"])
def test_outscale_must_be_a_number_above_0(capsys, flag, bad):
    from msfin_fast.cli import parse

    with pytest.raises(SystemExit) as info:
        parse(["upscale", "-i", "a.png", flag, bad])
    assert info.value.code == 2
    assert "usage: msfin-fast upscale" in capsys.readouterr().err


def test_an_unknown_flag_shows_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["upscale", "-i", "a.png", "--out-scale", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: msfin-fast upscale ") and "[-s S]" in err
    assert "msfin-fast upscale: error: unrecognized arguments: --out-scale 2" in err
    with pytest.raises(SystemExit):
        main(["eval", "--data", "x", "--bogus"])
    assert "usage: msfin-fast eval " in capsys.readouterr().err


def test_the_model_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "-n MODEL, --model-name MODEL, --model MODEL" in out
    assert "msfin-x4: MSFIN ×4, the default" in out and "msfin-s-x4: MSFIN-S ×4" in out
    for flag in ("-s S, --outscale S", "--suffix TEXT", "--ext EXT", "-t N, --tile N", "--fp16, --half",
                 "(default results/)"):
        assert flag in out, flag


def test_output_defaults_to_results_and_takes_suffix_ext_and_outscale(tmp_path, weights_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "photo.png", (10, 12, 3))
    assert main(["upscale", "-i", "photo.png", "-n", "msfin-s-x4"]) == 0
    assert Image.open(tmp_path / "results" / "photo.png").size == (48, 40)  # results/, the input's name
    assert main(["upscale", "-i", "photo.png", "-n", "msfin-s-x4", "-s", "2.5", "--suffix", "x2.5",
                 "--ext", "jpg"]) == 0
    out = Image.open(tmp_path / "results" / "photo_x2.5.jpg")
    assert out.format == "JPEG" and out.size == (30, 25)  # round(12·2.5) × round(10·2.5)
    assert "upscaled 1 image ×2.5 with msfin-s-x4" in capsys.readouterr().out


@pytest.mark.parametrize("output", ["existing", "slash.d/", "nosuffix"])
def test_o_may_name_a_folder_for_a_single_input(tmp_path, weights_dir, output):
    _png(tmp_path / "photo.png")
    (tmp_path / "existing").mkdir()
    target = f"{tmp_path}/{output}"  # a Path would drop the trailing /
    assert main(["upscale", "-i", str(tmp_path / "photo.png"), "-o", target, "-n", "msfin-s-x4"]) == 0
    assert Image.open(tmp_path / output.rstrip("/") / "photo.png").size == (40, 48)


def test_outscale_resizes_the_x4_result_with_lanczos(weights_dir):
    from msfin_fast import Upscaler

    # A smooth picture: on noise Pillow's 8-bit Lanczos clips between its two passes, ours does not
    yy, xx = np.mgrid[0:14, 0:11]
    smooth = np.stack([60 + 8 * yy + 5 * xx, 200 - 6 * xx, 90 + 40 * np.sin(yy / 3.0)], axis=-1)
    img = Image.fromarray(smooth.astype(np.uint8))
    x4 = Upscaler("msfin-s-x4").upscale(img)
    assert np.array_equal(np.asarray(Upscaler("msfin-s-x4", outscale=4).upscale(img)), np.asarray(x4))
    for outscale, size in ((2, (22, 28)), (1.5, (16, 21)), (6, (66, 84))):
        got = np.asarray(Upscaler("msfin-s-x4", outscale=outscale).upscale(img)).astype(int)
        want = np.asarray(x4.resize(size, Image.Resampling.LANCZOS)).astype(int)
        assert got.shape == (size[1], size[0], 3)
        assert np.abs(got - want).max() <= 1  # Pillow's 8-bit Lanczos rounds per pass; ours in float
    rgba = Image.fromarray(RNG.integers(0, 256, (9, 9, 4), dtype=np.uint8), "RGBA")
    assert Upscaler("msfin-s-x4", outscale=2).upscale(rgba).size == (18, 18)
    with pytest.raises(InvalidInputError, match="outscale must be a number above 0"):
        Upscaler("msfin-s-x4", outscale=0)


def test_a_folder_run_with_suffix_ext_and_outscale_resumes(tmp_path, weights_dir, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _png(src / "a.png", (8, 10, 3))
    _png(src / "b.bmp", (6, 6, 3))
    argv = ["upscale", "-i", str(src), "-o", str(dst), "-n", "msfin-s-x4", "-s", "3", "--suffix", "big",
            "--ext", "webp"]
    assert main(argv) == 0
    assert Image.open(dst / "a_big.webp").size == (30, 24) and Image.open(dst / "b_big.webp").size == (18, 18)
    capsys.readouterr()
    assert main(argv + ["--skip-existing"]) == 0
    assert "2 already done (skipped)" in capsys.readouterr().out  # the manifest knows -s 3 and the names
    assert main(argv[:-6] + ["-s", "2", "--suffix", "big", "--ext", "webp", "--skip-existing"]) == 0
    assert "0 already done (skipped); 2 redone: 2 made with other settings (outscale 3.0 → 2.0)" in \
        capsys.readouterr().out  # another outscale redoes them, saying why
    assert Image.open(dst / "a_big.webp").size == (20, 16)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-o", "{d}/o.png", "--suffix", "x4"], "--suffix names outputs in a folder"),
        (["-o", "{d}/o.png", "--ext", "jpg"], "--ext jpg contradicts -o"),
        (["-o", "{d}/out", "--ext", "gif"], "--ext 'gif': not an image format"),
        (["-o", "{d}/out", "--ray", "-s", "2"], "-s/--outscale does not apply with --ray"),
    ],
    ids=["suffix-with-file", "ext-contradicts", "bad-ext", "outscale-ray"],
)
def test_naming_flags_that_cannot_work_are_one_line_errors(tmp_path, weights_dir, capsys, one_line_error, args,
                                                           fragment):
    _png(tmp_path / "x.png")
    (tmp_path / "folder").mkdir()
    _png(tmp_path / "folder" / "x.png")
    source = "folder" if "--ray" in args else "x.png"
    assert main(["upscale", "-i", str(tmp_path / source)] + [a.format(d=tmp_path) for a in args]) == 1
    one_line_error(fragment)


def test_two_inputs_that_would_write_one_output_are_refused(tmp_path, weights_dir, capsys, one_line_error):
    src = tmp_path / "in"
    src.mkdir()
    _png(src / "a.png")
    _png(src / "a.bmp")
    assert main(["upscale", "-i", str(src), "-o", str(tmp_path / "out"), "--ext", "png"]) == 1
    one_line_error("would both be written to", "a.png")
    assert not (tmp_path / "out").exists()


def test_only_the_packages_warnings_carry_its_name(capsys):
    import warnings

    from msfin_fast import cli

    cli._show_warning(UserWarning("ours"), UserWarning, cli.__file__, 1)
    cli._show_warning(DeprecationWarning("theirs"), DeprecationWarning, "/somewhere/ray/_private/worker.py", 7)
    err = capsys.readouterr().err
    assert "msfin-fast: warning: ours" in err
    assert "msfin-fast: warning: theirs" not in err
    assert "/somewhere/ray/_private/worker.py:7: DeprecationWarning: theirs" in err
    assert warnings.showwarning is not cli._show_warning  # only main() installs it, for its run


def test_outscale_is_refused_where_it_cannot_apply_never_ignored(weights_dir):
    from msfin_fast import ServingUpscaler, Upscaler

    with pytest.raises(InvalidInputError, match="outscale=2: a ServingUpscaler answers at the network's ×4"):
        ServingUpscaler(Upscaler("msfin-s-x4", outscale=2))
    with pytest.raises(InvalidInputError, match="outscale must be a number above 0"):
        ServingUpscaler("msfin-s-x4", outscale=-1)
