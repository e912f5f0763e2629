"""msfin_fast.upscale_folder: the folder run of the API, which the CLI runs and the Ray planner lists
with (msfin_fast/folders.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import msfin_fast
from msfin_fast import InvalidInputError, Upscaler, upscale_folder
from msfin_fast.cli import main
from msfin_fast.folders import plan_folder
from msfin_fast.resume import MANIFEST_NAME

RNG = np.random.default_rng(7)


def _image(path: Path, shape, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    src = tmp_path / "in"
    _image(src / "a.png", (11, 13, 3))
    _image(src / "grey.bmp", (9, 7), "L")
    _image(src / "sub" / "alpha.png", (8, 10, 4), "RGBA")
    _image(src / ".hidden" / "never.png", (8, 8, 3))  # a tree walk leaves hidden folders out
    (src / "broken.png").write_bytes(b"not a picture")
    (src / "notes.txt").write_text("not an image")
    return src


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def test_upscale_folder_gives_the_cli_outputs_byte_for_byte(tree, tmp_path, weights_dir, capsys):
    up = Upscaler("msfin-s-x4", device="cpu")
    seen = []
    summary = upscale_folder(up, tree, tmp_path / "api", recursive=True, on_start=lambda s: seen.append(s.todo),
                             on_file=lambda r: seen.append(r.src.name))
    assert seen == [4, "a.png", "broken.png", "grey.bmp", "alpha.png"]  # sorted by path, sub/ after the top
    assert [r.ok for r in summary.results] == [True, False, True, True]
    bad = summary.failures[0]
    assert bad.src.name == "broken.png" and "not an image file" in bad.error and not bad.dst.exists()
    a = summary.results[0]
    assert (a.in_pixels, a.out_pixels) == (13 * 11, 52 * 44) and a.seconds > 0
    assert summary.line().startswith("upscaled 3 images ×4 with msfin-s-x4 on cpu (fp32): ")
    assert summary.line().endswith("; 1 failed")

    assert main(["upscale", "-i", str(tree), "-o", str(tmp_path / "cli"), "-r", "--model", "msfin-s-x4",
                 "--device", "cpu"]) == 1
    api, cli = _files(tmp_path / "api"), _files(tmp_path / "cli")
    assert sorted(api) == ["a.png", "grey.bmp", "sub/alpha.png"]
    assert api == cli
    assert Image.open(tmp_path / "api" / "sub" / "alpha.png").mode == "RGBA"
    assert Image.open(tmp_path / "api" / "grey.bmp").mode == "L"
    # Both recorded what made their outputs, alike: a resumed CLI run skips what the API made.
    assert main(["upscale", "-i", str(tree), "-o", str(tmp_path / "api"), "-r", "--model", "msfin-s-x4",
                 "--device", "cpu", "--skip-existing"]) == 1
    out = capsys.readouterr().out
    assert "resuming: 1 to do, 3 already done (skipped)" in out


def test_skip_existing_resumes_and_says_why_the_rest_are_redone(tree, tmp_path, weights_dir):
    dst = tmp_path / "out"
    first = upscale_folder(Upscaler("msfin-s-x4", device="cpu"), tree, dst)
    assert [r.src.name for r in first.results] == ["a.png", "broken.png", "grey.bmp"]  # not the tree
    again = upscale_folder(Upscaler("msfin-s-x4", device="cpu"), tree, dst, skip_existing=True)
    assert again.skipped == 2 and [r.src.name for r in again.results] == ["broken.png"]
    other = upscale_folder(Upscaler("msfin-s-x4", device="cpu", self_ensemble=True), tree, dst, skip_existing=True)
    assert other.skipped == 0 and other.resumed.why().startswith("2 redone: 2 made with other settings")
    assert other.line().startswith("upscaled 2 images ×4 with msfin-s-x4+ on cpu (fp32)")


def test_a_custom_module_is_recorded_by_its_parameters(tmp_path, weights_dir):
    """A module's outputs are recorded with a hash of its parameters: changed weights redo them."""
    src = tmp_path / "in"
    _image(src / "a.png", (6, 5, 3))
    model = msfin_fast.load_pretrained("msfin-s-x4")
    first = Upscaler(model, device="cpu", backend="reference")
    upscale_folder(first, src, tmp_path / "out")
    assert upscale_folder(Upscaler(model, device="cpu", backend="reference"), src, tmp_path / "out",
                          skip_existing=True).skipped == 1
    with torch.no_grad():
        model.tail2.bias.add_(1.0)
    changed = Upscaler(model, device="cpu", backend="reference")
    assert changed.recipe["weights"] != first.recipe["weights"]
    assert upscale_folder(changed, src, tmp_path / "out", skip_existing=True).skipped == 0


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("empty", "no images"),
    ("same", "output folder is the input folder"),
    ("inside", "is inside the input folder"),
    ("file", "the output must be a folder"),
    ("option", "unknown video option"),
])
def test_plan_folder_refuses_before_any_work(tmp_path, case, message):
    src = tmp_path / "in"
    _image(src / "a.png", (4, 4, 3))
    (src / "clip.mp4").write_bytes(b"")  # a video: its options are checked
    kwargs = {"recursive": True}
    dst = tmp_path / "out"
    if case == "missing":
        src = tmp_path / "nothing"
    elif case == "empty":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "same":
        dst = src
    elif case == "inside":
        dst = src / "x4"
    elif case == "file":
        dst.write_text("")
    else:
        kwargs["video"] = {"speed": 2}
    with pytest.raises(InvalidInputError, match=message):
        plan_folder(src, dst, **kwargs)
    assert not (tmp_path / "out").is_dir()


def test_plan_folder_lists_the_ray_jobs_files_and_cleans_stale_parts(tree, tmp_path):
    """Ray's planner lists through plan_folder (images only, paths resolved); a temporary file of a
    writer that is gone is removed, with a warning."""
    from msfin_fast.cluster import JobOptions, plan_job

    dst = tmp_path / "out"
    (dst / "sub").mkdir(parents=True)
    stale = dst / "sub" / ".alpha.png.999999999.abcdefgh.part"
    stale.write_bytes(b"half")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_folder(tree, dst, recursive=True)
    assert not stale.exists() and any("removed 1 temporary file" in str(w.message) for w in caught)
    job = plan_job(tree, dst, JobOptions(model="msfin-s-x4"), recursive=True)
    assert [(f.resolve(), o.resolve()) for f, o in plan.pairs] == job.todo
