"""The reference network's dataflow, traced once from ``MSFIN.features``.

Faster backends (the Triton engine, exact tiling) walk this graph instead of keeping a second
hand-written copy of the forward that could drift from the reference. Every layer the engines
treat as one unit is a leaf: RRCAB blocks, the down/up-sampling blocks, plain convs and
transposed convs. What remains between them is ``torch.cat`` and ``+``.

Each node of the returned :class:`torch.fx.Graph` is one of
  * ``placeholder``   the mean-subtracted full-resolution image ``y``,
  * ``call_module``   a leaf (``node.target`` is the attribute name, e.g. ``"ds4_rcab1"``),
  * ``call_function`` ``operator.add`` (two operands) or ``torch.cat`` (a list, ``dim=1``),
  * ``output``        the features before ``tail2``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .model import MSFIN


class _FeaturesOnly(nn.Module):
    """Wraps a model so that tracing sees ``features`` (forward also validates and pads)."""

    def __init__(self, model: MSFIN):
        super().__init__()
        self.model = model

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.features(y)


class _LeafTracer(fx.Tracer):
    """Stops at the model's direct children: each is one layer or block of the network."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname.startswith("model.") and qualname.count(".") == 1


def trace_features(model: MSFIN) -> fx.Graph:
    """The graph of ``model.features`` with the model's direct children as leaves.

    Module targets are returned relative to ``model`` (``"head"``, not ``"model.head"``).
    """
    graph = _LeafTracer().trace(_FeaturesOnly(model))
    for node in graph.nodes:
        if node.op == "call_module":
            node.target = node.target.removeprefix("model.")
        elif node.op == "call_function" and node.target not in (operator.add, torch.cat):
            raise NotImplementedError(f"unexpected op {node.target} in MSFIN.features")
        elif node.op in ("call_method", "get_attr"):
            raise NotImplementedError(f"unexpected {node.op} {node.target} in MSFIN.features")
    return graph


def run_graph(graph: fx.Graph, model: MSFIN, y: torch.Tensor) -> torch.Tensor:
    """Interpret the traced graph with the reference modules (used to check the trace itself)."""
    env: dict[fx.Node, torch.Tensor] = {}

    def value(arg):
        return fx.node.map_arg(arg, lambda n: env[n])

    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = y
        elif node.op == "call_module":
            env[node] = model.get_submodule(node.target)(*value(node.args))
        elif node.op == "call_function":
            env[node] = node.target(*value(node.args), **value(node.kwargs))
        elif node.op == "output":
            return value(node.args[0])
    raise RuntimeError("graph has no output node")
