"""backend="auto": per shape class, the variant measured fastest; the choice is kept and shown."""

from __future__ import annotations

import json

import pytest
import torch

from msfin_fast import MSFIN, optimize
from msfin_fast.engine import auto as choice


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MSFIN("msfin-s-x4").eval()


def fake_timer(times: dict):
    """Pretends each engine takes a fixed time; records which ones were timed."""
    seen = []

    def timer(fn):
        engine = fn.__defaults__[0]
        seen.append(engine.tag)
        fn()
        return times[engine.tag]

    return timer, seen


def engines(model, tags):
    out = {}
    for tag in tags:
        e = optimize(model, dtype=torch.float32, backend="emulate", fuse_rrcab=tag.endswith("fused"))
        e.tag = tag
        out[tag] = e
    return out


def test_auto_runs_the_fastest_per_shape_class_and_remembers(model, tmp_path, monkeypatch):
    monkeypatch.setenv("MSFIN_CACHE_DIR", str(tmp_path))
    timer, seen = fake_timer({"triton": 2.0, "triton-fused": 1.0})
    auto = choice.AutoEngine(model, engines(model, ["triton", "triton-fused"]), torch.float32, timer=timer)
    x = torch.rand(1, 3, 4, 6) * 255
    with torch.no_grad():
        want = model(x)
    assert (auto(x) - want).abs().max().item() <= 1e-3
    assert auto.choices["small, batch 1"]["backend"] == "triton-fused"
    assert sorted(seen) == ["triton", "triton-fused"]
    auto(torch.rand(1, 3, 5, 5) * 255)  # same class: no new measurement
    assert len(seen) == 2
    auto(torch.rand(2, 3, 4, 6) * 255)  # batch > 1 is its own class
    assert len(seen) == 4 and set(auto.choices) == {"small, batch 1", "small, batch >1"}

    saved = json.loads((tmp_path / "backend_choices.json").read_text())
    assert len(saved) == 2 and all(e["backend"] == "triton-fused" for e in saved.values())
    again_timer, again_seen = fake_timer({"triton": 0.1, "triton-fused": 9.0})
    again = choice.AutoEngine(model, engines(model, ["triton", "triton-fused"]), torch.float32, timer=again_timer)
    again(x)  # a new process reuses the stored choice instead of measuring
    assert again_seen == [] and again.choices["small, batch 1"]["backend"] == "triton-fused"


def test_shape_classes():
    assert choice.shape_class(1, 256, 256) == "small, batch 1"
    assert choice.shape_class(8, 720, 1280) == "720p, batch >1"
    assert choice.shape_class(1, 1080, 1920) == "large, batch 1"


def test_auto_on_a_cpu_takes_the_first_candidate_without_measuring(model, monkeypatch):
    """On a CPU auto takes the native kernels (else the cpu backend) as they are: no AutoEngine and
    nothing measured, even with the interpreter on."""
    import msfin_fast.engine
    from msfin_fast.engine.backends import native

    monkeypatch.setattr(msfin_fast.engine, "_warned", set())
    first = "native" if native.available() else "cpu"
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        engine = optimize(model, dtype=torch.float32)
        assert isinstance(engine, msfin_fast.engine.Engine) and engine.backend == first
    assert list(msfin_fast.engine.variants(model)) == (["native", "cpu"] if native.available() else ["cpu"])


def test_auto_measures_every_candidate_that_can_run(model, monkeypatch, tmp_path):
    """Where several candidates can run (on a GPU: the kernel variants), optimize() returns an
    AutoEngine over all of them."""
    from msfin_fast.engine import backends

    monkeypatch.setenv("MSFIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backends, "measures", lambda device: True)  # as on a GPU
    monkeypatch.setattr(backends, "candidates", lambda device: {
        "emulate": dict(name="emulate"), "emulate-fused": dict(name="emulate", fuse_rrcab=True),
        "cpu-channels-last": dict(name="cpu")})
    auto = optimize(model, dtype=torch.float32)
    assert isinstance(auto, choice.AutoEngine) and sorted(auto.engines) == ["cpu-channels-last", "emulate", "emulate-fused"]
    x = torch.rand(1, 3, 4, 5) * 255
    with torch.no_grad():
        assert (auto(x) - model(x)).abs().max().item() <= 1e-3
    assert set(auto.choices["small, batch 1"]["ms"]) == {"cpu-channels-last", "emulate", "emulate-fused"}
