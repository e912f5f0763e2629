"""ONNX export, checked the way a user meets it: the ONNX checker, then ONNX Runtime on the CPU
against the reference. Each graph is exported once per module (10–25 s each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import require_module

onnx = require_module("onnx")
ort = require_module("onnxruntime")
require_module("onnxscript")

from msfin_fast import ConfigError, InvalidInputError, export_onnx  # noqa: E402
from msfin_fast.cli import main  # noqa: E402

# ONNX Runtime's fp32 convolutions sum in another order than PyTorch's: max |Δ| on 0–255 measured
# 5e-4 at these sizes and up to 9e-4 at 64×64 (MSFIN, benchmarks/results/2026-11-29-cpu); the issue's
# 1e-3 is the tolerance.
FP32_TOL = 1e-3
# Three sizes (one odd) and a batch of 2, on one dynamic graph.
SHAPES = [(1, 16, 20), (1, 13, 17), (2, 24, 12)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pretrained):
    cache = {}

    def get(preset: str):
        if preset not in cache:
            path = tmp_path_factory.mktemp("onnx") / f"{preset}.onnx"
            cache[preset] = export_onnx(pretrained(preset), path)
        return cache[preset]

    return get


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("preset", ["msfin-s-x4", "msfin-x4"])
def test_fp32_graph_passes_the_checker_and_matches_the_reference(exported, pretrained, preset):
    path = exported(preset)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    (inp,), (out,) = proto.graph.input, proto.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(inp) == ["batch", 3, "height", "width"]
    assert dims(out) == ["batch", 3, "4*height", "4*width"]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["msfin_fast.preset"] == preset and meta["msfin_fast.scale"] == "4"
    assert meta["msfin_fast.value_range"] == "255"

    model, sess = pretrained(preset), session(path)
    gen = torch.Generator().manual_seed(1)
    for n, h, w in SHAPES:
        x = torch.rand(n, 3, h, w, generator=gen) * 255
        y = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert y.shape == ref.shape == (n, 3, 4 * h, 4 * w)
        err = float(np.abs(y - ref).max())
        assert err <= FP32_TOL, f"{preset} {n}×{h}×{w}: max |Δ| {err:.2e} > {FP32_TOL}"


def test_channel_attention_mean_follows_the_size(exported, pretrained):
    """The global mean is a ReduceMean over the runtime H and W, not a constant divisor traced at
    the example's size: a picture whose right half is black must give the reference's output."""
    path = exported("msfin-s-x4")
    proto = onnx.load(str(path))
    means = [n for n in proto.graph.node if n.op_type == "ReduceMean"]
    assert len(means) == 24  # one per RRCAB application of MSFIN-S
    x = torch.full((1, 3, 8, 40), 200.0)
    x[..., 20:] = 0
    with torch.no_grad():
        ref = pretrained("msfin-s-x4")(x).numpy()
    y = session(path).run(None, {"input": x.numpy()})[0]
    assert float(np.abs(y - ref).max()) <= FP32_TOL


def test_fp16_graph_keeps_channel_attention_in_fp32(tmp_path, pretrained, capsys):
    """Through the CLI: a static fp16 graph for 0–1 pixels. Every ReduceMean reads a Cast to fp32,
    the input and output are fp16, and ONNX Runtime's result is within 2 grey levels of the fp32
    reference once both are rounded to 8 bits."""
    path = tmp_path / "s16.onnx"
    assert main(["export", str(path), "--model", "msfin-s-x4", "--fp16", "--range", "1",
                 "--static", "1x20x28"]) == 0
    assert "checker passed" in capsys.readouterr().out
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    producer = {o: n for n in proto.graph.node for o in n.output}
    means = [n for n in proto.graph.node if n.op_type == "ReduceMean"]
    assert means
    for node in means:
        cast = producer[node.input[0]]
        assert cast.op_type == "Cast", f"{node.name} reads {cast.op_type}, not a Cast to fp32"
        assert onnx.helper.get_attribute_value(next(a for a in cast.attribute if a.name == "to")) == onnx.TensorProto.FLOAT
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, 20, 28]

    x = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(2))
    y = session(path).run(None, {"input": x.half().numpy()})[0].astype(np.float32)
    with torch.no_grad():
        ref = pretrained("msfin-s-x4")(x * 255).numpy()
    to8 = lambda v: np.clip(np.round(v), 0, 255)  # noqa: E731
    assert np.isfinite(y).all()
    assert float(np.abs(to8(y * 255) - to8(ref)).max()) <= 2


def test_export_refuses_what_it_cannot_export(tmp_path, pretrained):
    with pytest.raises(ConfigError, match="float32 and float16"):
        export_onnx(pretrained("msfin-s-x4"), tmp_path / "m.onnx", dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="value_range"):
        export_onnx(pretrained("msfin-s-x4"), tmp_path / "m.onnx", value_range=65535)
    with pytest.raises(InvalidInputError, match="reference MSFIN"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "m.onnx")
    with pytest.raises(InvalidInputError, match="is a folder"):
        export_onnx(pretrained("msfin-s-x4"), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cli_export_checks_its_arguments(tmp_path, one_line_error):
    assert main(["export", str(tmp_path / "m.png")]) == 1
    one_line_error("ONNX file", "*.onnx")
    assert main(["export", str(tmp_path / "m.onnx"), "--static", "1x20"]) == 1
    one_line_error("--static", "NxHxW")
    assert not (tmp_path / "m.onnx").exists()
