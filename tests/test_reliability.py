"""What a hostile user found in the folder, memory, export and weights doors, each pinned down: a
folder run records what made each output and ``--skip-existing`` redoes what another model, option or
input would change; the CPU memory budget reads MemAvailable and the cgroup; unwritable outputs,
impossible opsets and fixed shapes are one-line errors before any work; ``--max-pixels`` bounds an
input from its header; a file that is not a checkpoint says so; a newline in a name keeps the progress
on one line. (Ray jobs: test_cluster.py; videos: test_video.py.)"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, require_module

from msfin_fast import DeviceError, Upscaler, WeightsError
from msfin_fast.cli import main
from msfin_fast.console import Progress
from msfin_fast.resume import MANIFEST_NAME, Manifest

MODEL = "msfin-s-x4"


def write(folder: Path, name: str, size=(13, 11), seed=0, fmt=None) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def summary_line(capsys) -> str:
    """The resume line and the summary of the last run, as one string."""
    lines = capsys.readouterr().out.splitlines()
    resumed = [line for line in lines if line.startswith("resuming:")]
    return " | ".join(resumed[-1:] + [line for line in lines if line.startswith("upscaled")][-1:])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("in")
    write(src, "a.png", seed=1)
    write(src, "b.tif", (17, 9), seed=2)
    write(src, "sub/c.png", (9, 14), seed=3)
    return src


# ---------------------------------------------------------------------------------------------
# 1. Resume: what made each output


def run(src, dst, *extra) -> int:
    return main(["upscale", "-i", str(src), "-o", str(dst), "-r", "--model", MODEL, "--skip-existing", *extra])


def test_a_folder_run_records_what_made_each_output(folder, tmp_path, capsys):
    dst = tmp_path / "out"
    assert run(folder, dst) == 0
    manifest = Manifest(dst)
    assert sorted(manifest.entries) == ["a.png", "b.tif", "sub/c.png"]
    entry = manifest.entries["sub/c.png"]
    assert entry["recipe"]["model"] == MODEL and entry["recipe"]["weights"].startswith("ddf9b187")
    assert entry["recipe"]["self_ensemble"] is False and entry["recipe"]["tile_mode"] == "plain"
    st = (dst / "sub" / "c.png").stat()
    assert entry["file"] == [st.st_size, st.st_mtime_ns]
    assert entry["input"] == [(folder / "sub" / "c.png").stat().st_size, (folder / "sub" / "c.png").stat().st_mtime_ns]
    # The same run again skips everything, and says so.
    made = outputs(dst)
    capsys.readouterr()
    assert run(folder, dst) == 0
    line = summary_line(capsys)
    assert line == "resuming: 0 to do, 3 already done (skipped)"
    assert outputs(dst) == made


def test_another_model_or_option_redoes_every_output(folder, tmp_path, capsys):
    dst = tmp_path / "out"
    assert run(folder, dst) == 0
    small = outputs(dst)
    capsys.readouterr()
    # Today's rule (size and trailer) took these for done: msfin-x4 after msfin-s-x4 did nothing.
    assert main(["upscale", "-i", str(folder), "-o", str(dst), "-r", "--model", "msfin-x4", "--skip-existing"]) == 0
    line = summary_line(capsys)
    assert "upscaled 3 images" in line and "3 redone: 3 made with other settings (model msfin-s-x4 → msfin-x4" in line
    big = outputs(dst)
    assert all(big[name] != small[name] for name in small)
    reference = Upscaler("msfin-x4", device="cpu")
    expected = tmp_path / "a.png"
    reference.upscale_file(folder / "a.png", expected)
    assert big["a.png"] == expected.read_bytes()
    for option, what in ((["--self-ensemble"], "self_ensemble False → True"), (["--tile", "8"], "tile None → 8"),
                         (["--tile", "8", "--tile-pad", "4"], "tile None → 8, tile_pad 10 → 4"), (["--bf16"], "dtype fp32 → bf16")):
        assert run(folder, dst) == 0, option  # back to the defaults
        capsys.readouterr()
        assert run(folder, dst, *option) == 0, option
        assert f"3 redone: 3 made with other settings ({what})" in summary_line(capsys), option


def test_a_changed_input_or_a_damaged_output_is_redone(folder, tmp_path, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    shutil.copytree(folder, src)
    assert run(src, dst) == 0
    good = outputs(dst)
    # An input edited after its output was made (same size: only its time tells).
    write(src, "a.png", seed=9)
    # A TIFF cut to half its length: its header still reads (the trailer rule cannot tell).
    tif = dst / "b.tif"
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])
    # An output replaced by something of the right size and form that this package did not write.
    c = dst / "sub" / "c.png"
    Image.open(c).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(c)
    capsys.readouterr()
    assert run(src, dst) == 0
    line = summary_line(capsys)
    assert "upscaled 3 images" in line
    assert "1 input changed since its output was made" in line and "2 output changed since it was written" in line
    after = outputs(dst)
    assert after["b.tif"] == good["b.tif"] and after["sub/c.png"] == good["sub/c.png"]
    assert after["a.png"] != good["a.png"]
    # Outputs that no recorded run made (another tool's, an older version's) are redone.
    (dst / MANIFEST_NAME).unlink()
    assert run(src, dst) == 0
    assert "3 redone: 3 not made by a recorded run of this package" in summary_line(capsys)


def test_a_torn_manifest_line_is_ignored_and_the_file_compacts(tmp_path):
    src = write(tmp_path / "in", "a.png")
    out = tmp_path / "out" / "a.png"
    out.parent.mkdir()
    shutil.copy(src, out)
    manifest = Manifest(out.parent)
    made = {"model": MODEL}
    for _ in range(100):
        manifest.record(src, out, made)
    (out.parent / MANIFEST_NAME).open("a").write('{"output": "a.png", "reci')  # a killed writer's half line
    again = Manifest(out.parent)
    assert list(again.entries) == ["a.png"] and again.lines == 101
    assert again.reason(src, out, made, None) is None
    assert again.reason(src, out, {"model": "msfin-x4"}, None).startswith("made with other settings")
    again.compact()
    assert len((out.parent / MANIFEST_NAME).read_text().splitlines()) == 1
    assert Manifest(out.parent).reason(src, out, made, None) is None


def test_skip_existing_is_refused_where_it_means_nothing(folder, tmp_path, one_line_error):
    assert main(["upscale", "-i", str(folder / "a.png"), "-o", str(tmp_path / "a.png"), "--skip-existing"]) == 1
    one_line_error("--skip-existing applies to a folder run")
    assert main(["upscale", "-i", str(folder), "-o", str(tmp_path / "o"), "--skip-existing", "--ray",
                 "--overwrite"]) == 1
    one_line_error("--skip-existing and --overwrite contradict each other")


# ---------------------------------------------------------------------------------------------
# 3. The CPU memory budget


def test_the_cpu_budget_reads_mem_available_and_the_cgroup(tmp_path, monkeypatch):
    from msfin_fast import tiling

    gib = 1 << 30
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {32 * gib // 1024} kB\nMemFree: {1 * gib // 1024} kB\n"
                       f"MemAvailable: {20 * gib // 1024} kB\n")
    monkeypatch.setattr(tiling, "PROC_MEMINFO", str(meminfo))
    monkeypatch.setattr(tiling, "PROC_CGROUP", str(tmp_path / "none"))
    # 1 GiB free and 20 GiB available (the page cache): the budget is half the available.
    assert tiling.available_memory(torch.device("cpu")) == 10 * gib
    # cgroup v2: the tightest limit on the path counts, less what is charged, plus inactive files.
    root = tmp_path / "cgroup"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "memory.max").write_text(str(8 * gib))
    (root / "a" / "memory.current").write_text(str(3 * gib))
    (root / "a" / "memory.stat").write_text(f"anon {2 * gib}\ninactive_file {1 * gib}\n")
    (root / "a" / "b" / "memory.max").write_text("max")
    (root / "a" / "b" / "memory.current").write_text(str(3 * gib))
    cgroup = tmp_path / "self_cgroup"
    cgroup.write_text("0::/a/b\n")
    monkeypatch.setattr(tiling, "PROC_CGROUP", str(cgroup))
    monkeypatch.setattr(tiling, "CGROUP_ROOT", str(root))
    assert tiling.host_available_memory() == 6 * gib
    # cgroup v1
    v1 = root / "memory" / "job"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(4 * gib))
    (v1 / "memory.usage_in_bytes").write_text(str(1 * gib))
    (root / "memory" / "memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "no limit"
    (root / "memory" / "memory.usage_in_bytes").write_text(str(9 * gib))
    cgroup.write_text("4:memory:/job\n1:cpu:/\n")
    assert tiling.host_available_memory() == 3 * gib


def test_the_budget_on_this_machine_is_at_least_half_of_mem_available():
    from msfin_fast.tiling import available_memory

    with open("/proc/meminfo") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    budget = available_memory(torch.device("cpu"))
    assert budget is not None and budget <= fields["MemAvailable"] // 2 + (64 << 20)


# ---------------------------------------------------------------------------------------------
# 6, 7. Export: unwritable outputs, opsets, fixed shapes


def test_export_refuses_bad_opsets_and_huge_fixed_shapes_before_any_work(tmp_path, one_line_error):
    require_module("onnx")
    out = tmp_path / "m.onnx"
    assert main(["export", str(out), "--model", MODEL, "--opset", "99"]) == 1
    one_line_error("opset 99 is beyond what the installed onnx", "opsets 18 to")
    assert main(["export", str(out), "--model", MODEL, "--opset", "17"]) == 1
    one_line_error("opset must be an int >= 18")
    assert main(["export", str(out), "--model", MODEL, "--static", "1x100000x100000"]) == 1
    one_line_error("a fixed 1×100000×100000 graph is 10,000,000,000 LR pixels", "GiB", "dynamic shapes")
    assert not out.exists()


@pytest.mark.parametrize("target", ["/proc/x.onnx", "/sys/x.onnx"])
def test_export_to_an_unwritable_place_is_one_line(target, one_line_error):
    require_module("onnxscript")
    assert main(["export", target, "--model", MODEL]) == 1
    one_line_error(f"{target}: cannot write")


def test_export_over_an_immutable_file_is_one_line(locked, one_line_error):
    require_module("onnxscript")
    target = locked("m.onnx")
    assert main(["export", str(target), "--model", MODEL]) == 1
    one_line_error(f"{target}: cannot write")
    assert target.read_bytes() == b"old" and not list(target.parent.glob(".*.part"))


def test_an_image_over_an_immutable_file_is_one_line(folder, locked, one_line_error):
    target = locked("x.png")
    assert main(["upscale", "-i", str(folder / "a.png"), "-o", str(target), "--model", MODEL]) == 1
    one_line_error(f"{target}: cannot write")


# ---------------------------------------------------------------------------------------------
# 9. --max-pixels


def test_max_pixels_refuses_from_the_header(tmp_path, capsys, one_line_error):
    # A 10000×10000 PNG of one colour is a few hundred KB; nothing of it is decoded.
    big = tmp_path / "in" / "big.png"
    big.parent.mkdir()
    Image.new("RGB", (10000, 10000)).save(big, optimize=False, compress_level=9)
    assert big.stat().st_size < 1_000_000
    small = write(tmp_path / "in", "small.png")
    assert main(["upscale", "-i", str(big), "-o", str(tmp_path / "big4.png"), "--model", MODEL]) == 1
    one_line_error(f"{big}: 10000×10000 is 100,000,000 pixels, over the limit of 25,000,000", "--max-pixels")
    # A folder run: that file's error, the rest done.
    assert main(["upscale", "-i", str(big.parent), "-o", str(tmp_path / "out"), "--model", MODEL,
                 "--max-pixels", "200"]) == 1
    err = capsys.readouterr().err
    assert "big.png: 10000×10000 is 100,000,000 pixels, over the limit of 200" in err
    assert (tmp_path / "out" / "small.png").is_file() and not (tmp_path / "out" / "big.png").exists()
    assert main(["upscale", "-i", str(small), "-o", str(tmp_path / "s.png"), "--model", MODEL,
                 "--max-pixels", "100"]) == 1
    one_line_error("13×11 is 143 pixels, over the limit of 100")
    assert "default 25,000,000" in " ".join(main_help(capsys).split())


def main_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 11. Smaller


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    for name, data in (("random.pt", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
                       ("text.pt", b"\x80not really a pickle, just text"),):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(WeightsError) as info:
            Upscaler(MODEL, weights=path, device="cpu")
        message = str(info.value)
        assert "Python objects other than tensors" not in message, message
        assert "is not a PyTorch checkpoint" in message or "cannot be loaded as a PyTorch checkpoint" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_hub_on_cuda_without_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        torch.hub.load(str(ROOT), "msfin_s_x4", source="local", trust_repo=True, device="cuda")
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        __import__("msfin_fast").load_pretrained(MODEL, device="cuda")


def test_a_newline_in_a_file_name_keeps_progress_on_one_line(tmp_path, capsys):
    for tty in (True, False):
        stream = io.StringIO()
        stream.isatty = lambda tty=tty: tty
        progress = Progress(2, stream=stream)
        progress.step("a\nb.png")
        progress.step("c\rd.png")
        text = stream.getvalue()
        lines = text.strip("\n").split("\n")
        assert len(lines) == (1 if tty else 2), repr(text)
        assert "a\\nb.png" in text and "c\\rd.png" in text
    # The folder run of such a file: its progress line is one line.
    src = tmp_path / "in"
    write(src, "x\ny.png")
    write(src, "z.png")
    assert main(["upscale", "-i", str(src), "-o", str(tmp_path / "out"), "--model", MODEL]) == 0
    err = capsys.readouterr().err
    assert "[1/2] x\\ny.png" in err and (tmp_path / "out" / "x\ny.png").is_file()
