import importlib.util
import json
from pathlib import Path

import pytest

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


def test_bad_size_is_rejected():
    latency = load_latency()
    with pytest.raises(SystemExit):
        latency.main(["--sizes", "12by4"])
