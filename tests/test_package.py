"""The installed package: layout, entry point, and the README's main command."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_kernels_ship_inside_the_package(tmp_path):
    # Run outside the checkout so only installed modules are visible.
    out = _run(
        "import importlib.util, msfin_fast.kernels as k; "
        "print(k.__name__, importlib.util.find_spec('kernels') is None)",
        tmp_path,
    )
    assert out.split() == ["msfin_fast.kernels", "True"]


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("msfin-fast") == "msfin_fast.cli:main"


def test_readme_main_command(tmp_path, weights_dir):
    # The README's first command, run as a user would: sample picture in, upscaled picture out.
    env = dict(os.environ, MSFIN_WEIGHTS_DIR=str(weights_dir))
    cli = [sys.executable, "-m", "msfin_fast"]
    subprocess.run(cli + ["sample", "lr.png"], cwd=tmp_path, env=env, check=True, capture_output=True)
    proc = subprocess.run(cli + ["upscale", "-i", "lr.png", "-o", "sr.png"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "lr.png").size == (128, 128)
    assert Image.open(tmp_path / "sr.png").size == (512, 512)
    readme = (ROOT / "README.md").read_text()
    assert "msfin-fast sample lr.png && msfin-fast upscale -i lr.png -o sr.png" in readme
