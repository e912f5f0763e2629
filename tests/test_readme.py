"""Every command in the README is run by a test: the shell lines here (``msfin-fast …``), the
Python block here, the install lines by ``.ci/install_check`` (which reads them from the README),
the main command by ``test_package`` and ``.ci/wheel_check``, the test command by ``.ci/run``. A
command added to the README that none of them runs fails ``test_no_readme_command_goes_untested``.
The before/after picture is remade and compared."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

MAIN_COMMAND = "msfin-fast sample lr.png && msfin-fast upscale -i lr.png -o sr.png"
TEST_COMMAND = "python -m pytest"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_lines() -> list[str]:
    """Each command of the README's bash blocks, its comment cut off."""
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def install_lines() -> list[str]:
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from readme_install import install_commands
    finally:
        sys.path.pop(0)
    return install_commands(README)


def test_no_readme_command_goes_untested():
    lines = shell_lines()
    assert MAIN_COMMAND in lines and TEST_COMMAND in lines
    run_here = [line for line in lines if line.startswith("msfin-fast ") and line != MAIN_COMMAND]
    assert len(run_here) >= 4
    installs = install_lines()
    assert installs and all(line.startswith("pip install") for line in installs)
    untested = set(lines) - set(run_here) - set(installs) - {MAIN_COMMAND, TEST_COMMAND}
    assert not untested, f"README commands no test runs: {untested}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith(TEST_COMMAND) and ".ci/install_check" in ci
    assert MAIN_COMMAND in (ROOT / ".ci" / "wheel_check").read_text()
    assert len(blocks("python")) == 1


def _inputs(folder: Path) -> None:
    from msfin_fast.sample import sample_lr

    Image.fromarray(sample_lr(24)).save(folder / "lr.png")
    (folder / "photos" / "trip").mkdir(parents=True)
    Image.fromarray(sample_lr(16)).save(folder / "photos" / "a.png")
    Image.fromarray(sample_lr(12)).save(folder / "photos" / "trip" / "b.jpg")


def test_the_readme_shell_commands_run_and_do_what_their_comments_say(tmp_path, weights_dir):
    from msfin_fast.cli import main

    _inputs(tmp_path)
    lines = [line for line in shell_lines() if line.startswith("msfin-fast ") and line != MAIN_COMMAND]
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for line in lines:
            assert main(shlex.split(line)[1:]) == 0, line
    finally:
        os.chdir(cwd)
    assert Image.open(tmp_path / "results" / "lr.png").size == (96, 96)
    assert Image.open(tmp_path / "results" / "lr_x2.png").size == (48, 48)
    assert Image.open(tmp_path / "photos_x4" / "a.png").size == (64, 64)
    assert Image.open(tmp_path / "photos_x4" / "trip" / "b.jpg").size == (48, 48)
    assert Image.open(tmp_path / "big.png").size == (96, 96)


def test_the_readme_python_block_runs(tmp_path, weights_dir):
    _inputs(tmp_path)
    code = blocks("python")[0]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp_path / "lr_x4.png").size == (96, 96)
    assert proc.stdout.startswith("upscaled 1 image ×4 with msfin-x4")  # a.png; trip/ needs recursive=True
    assert Image.open(tmp_path / "photos_x4" / "a.png").size == (64, 64)


def test_the_before_after_picture_is_what_its_script_makes(weights_dir):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from before_after import before_after
    finally:
        sys.path.pop(0)
    committed = np.asarray(Image.open(ROOT / "docs" / "images" / "before_after.png").convert("RGB")).astype(int)
    made = np.asarray(before_after()).astype(int)
    assert made.shape == committed.shape == (256, 520, 3)
    assert np.abs(made - committed).max() <= 1  # the CPU kernels may round a value the other way
    assert "docs/images/before_after.png" in README


@pytest.mark.parametrize("page", sorted(set(re.findall(r"\]\((docs/[\w./-]+\.md)", README))))
def test_every_linked_page_exists_and_links_back(page):
    text = (ROOT / page).read_text()
    assert "../README.md" in text
    for target in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", text):
        assert (ROOT / page).parent.joinpath(target).resolve().exists(), f"{page} links to missing {target}"
