"""ONNX export of the reference MSFIN, for ONNX Runtime, TensorRT and the tools built on them.

The graph is the reference forward (``torch.onnx.export`` with the dynamo exporter, opset 20 by
default): bilinear ×s pre-upsampling as ``Resize``, the grouped convolutions, pixel shuffles as
``DepthToSpace``, and each channel attention as ``ReduceMean`` over H and W, so its global mean is
right at every input size. With ``dynamic=True`` batch, height and width are symbolic.

``dtype=torch.float16`` exports an fp16 graph (fp16 input and output) whose channel-attention
means and squeeze layers run in fp32: every ``ReduceMean`` reads a ``Cast`` to float. A mean taken
in fp16 over a full-resolution map of 0–255 features overflows in runtimes that accumulate in the
input type (a known cause of black images in fp16 SR exports); the cast costs one extra read of
each pre-attention map.

``value_range`` is the pixel scale of the graph's input and output: 255 (the model's own, default)
or 1 (0–1 images, as chaiNNer and most ONNX front-ends feed). The output is not clamped, like the
reference's; clamp and round when converting to pixels. Metadata in the file records the preset,
scale, value range, dtype and package version.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .config import PRESETS
from .devices import resolve_dtype
from .errors import ConfigError, InvalidInputError, MSFINError
from .fileio import commit, temporary_beside
from .model import MSFIN, ChannelAttention

DEFAULT_OPSET = 20
# The exporter translates at opset 18 and converts up from there; beyond what the installed onnx
# knows it cannot go (and would write an opset-18 file instead).
MIN_OPSET = 18
# A fixed-shape graph is traced from a real example input, and running it holds the whole image's
# activations: 64 Mi LR pixels (batch·h·w, e.g. 8192×8192) is far beyond any use of a fixed shape.
MAX_STATIC_PIXELS = 1 << 26
INPUT_NAME, OUTPUT_NAME = "input", "output"
VALUE_RANGES = (255.0, 1.0)


class ExportError(MSFINError):
    """The ONNX export could not be made (missing package, unsupported model or option)."""


class _ChannelAttentionFp32(nn.Module):
    """Channel attention whose mean and squeeze run in fp32 inside an fp16 graph."""

    def __init__(self, ca: ChannelAttention):
        super().__init__()
        self.conv_du = copy.deepcopy(ca.conv_du).float()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        s = self.conv_du(u.float().mean(dim=(2, 3), keepdim=True))
        return u * s.to(u.dtype)


class ExportGraph(nn.Module):
    """What is exported: the reference forward (input checks left out: they are host-side tests
    that a graph cannot hold), with the pixel scale of ``value_range`` at input and output."""

    def __init__(self, model: MSFIN, value_range: float):
        super().__init__()
        self.model = model
        self.factor = float(model.config.rgb_range) / float(value_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor != 1.0:
            x = x * self.factor
        y = self.model(x, check_finite=False)
        return y / self.factor if self.factor != 1.0 else y


def export_graph(model: MSFIN, dtype: torch.dtype, value_range: float) -> ExportGraph:
    """A copy of ``model`` in ``dtype``, ready to export (fp16: channel attention in fp32)."""
    graph_model = copy.deepcopy(model).float().cpu().eval()  # the caller's model is left as it is
    if dtype == torch.float16:
        graph_model = graph_model.half()
        parents = dict(graph_model.named_modules())
        for name, module in list(graph_model.named_modules()):
            if isinstance(module, ChannelAttention):
                parent_name, _, child = name.rpartition(".")
                setattr(parents[parent_name], child, _ChannelAttentionFp32(module))
    return ExportGraph(graph_model, value_range).eval()


def _resolve_model(model) -> MSFIN:
    if isinstance(model, str):
        from .weights import load_pretrained

        return load_pretrained(model)
    reference = getattr(model, "model", model)  # an Upscaler holds its model in .model
    if isinstance(reference, MSFIN):
        return reference
    raise InvalidInputError(
        f"export_onnx exports the reference MSFIN (a preset name, an MSFIN or an Upscaler with "
        f"backend='reference'), not {type(reference).__name__}: the engines' Triton and CUDA kernels "
        "have no ONNX form"
    )


def _preset_of(model: MSFIN) -> str:
    return next((name for name, cfg in PRESETS.items() if cfg == model.config), "custom")


def export_onnx(
    model="msfin-x4",
    path: str | Path = "msfin_x4.onnx",
    *,
    dynamic: bool = True,
    dtype: str | torch.dtype = torch.float32,
    value_range: float = 255.0,
    input_size: tuple[int, int] = (64, 64),
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> Path:
    """Export ``model`` (a preset name, whose released weights are loaded, an ``MSFIN`` or an
    ``Upscaler`` on the reference backend) to an ONNX file at ``path``, written atomically.

    dynamic:     symbolic batch, height and width; otherwise the graph is fixed at
                 ``batch`` × 3 × ``input_size`` (h, w).
    dtype:       float32 or float16 (fp16 graph with the channel attention in fp32).
    value_range: 255 (0–255 pixels in and out) or 1 (0–1).
    check:       run the ONNX checker on the written file (needs the ``onnx`` package).

    Returns the path. The input is named ``input``, the output ``output``, both NCHW RGB.
    """
    dtype = resolve_dtype(dtype)
    if dtype not in (torch.float32, torch.float16):
        raise ConfigError(f"ONNX export supports float32 and float16, not {dtype}")
    if float(value_range) not in VALUE_RANGES:
        raise ConfigError(f"value_range must be 255 or 1, got {value_range!r}")
    h, w = input_size
    if not (isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1 and isinstance(batch, int) and batch >= 1):
        raise ConfigError(f"input_size must be two ints >= 1 and batch an int >= 1, got {input_size!r}, {batch!r}")
    if not dynamic and batch * h * w > MAX_STATIC_PIXELS:
        from .tiling import bytes_per_output_pixel

        reference = _resolve_model(model)
        run = batch * h * w * reference.config.scale ** 2 * bytes_per_output_pixel(reference.config, dtype)
        example = batch * 3 * h * w * torch.finfo(dtype).bits // 8
        raise ConfigError(
            f"a fixed {batch}×{h}×{w} graph is {batch * h * w:,} LR pixels: tracing it allocates "
            f"{example / 2**30:,.1f} GiB and running it about {run / 2**30:,.0f} GiB; fixed shapes go up to "
            f"{MAX_STATIC_PIXELS:,} LR pixels (batch·h·w). Export with dynamic shapes for larger images")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ConfigError(f"opset must be an int >= {MIN_OPSET} (the dynamo exporter's lowest), got {opset!r}")
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter translates through it)
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'msfin_fast[onnx]'") from None
    highest = onnx.defs.onnx_opset_version()
    if opset > highest:
        raise ConfigError(f"opset {opset} is beyond what the installed onnx {onnx.__version__} knows "
                          f"(opsets {MIN_OPSET} to {highest})")
    reference = _resolve_model(model)

    graph = export_graph(reference, dtype, float(value_range))
    # Dynamic sizes are traced from a 2-image example so that no dimension specialises to 1.
    example = torch.rand(2 if dynamic else batch, 3, h, w, dtype=dtype) * float(value_range)
    dynamic_shapes = None
    if dynamic:
        dims = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
        dynamic_shapes = {"x": {0: dims[0], 2: dims[1], 3: dims[2]}}

    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{path}: is a folder; give a file name for the ONNX model")
    try:
        tmp = temporary_beside(path)
    except OSError as exc:
        raise ExportError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        # The exporter prints its progress on stdout; a library keeps stdout for its caller.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph, (example,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
                verbose=False,
            )
        proto = program.model_proto
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if written != opset:
            raise ExportError(f"the exporter could not convert the graph to opset {opset} (it gave {written}); "
                              f"nothing was written. Opset {DEFAULT_OPSET} is the default and tested")
        metadata = {
            "msfin_fast.version": __version__,
            "msfin_fast.preset": _preset_of(reference),
            "msfin_fast.scale": str(reference.config.scale),
            "msfin_fast.value_range": f"{float(value_range):g}",
            "msfin_fast.dtype": str(dtype).removeprefix("torch."),
            "msfin_fast.layout": "NCHW RGB, output unclamped",
        }
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(proto, str(tmp))
        if check:
            onnx.checker.check_model(str(tmp), full_check=True)
        commit(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

