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


class _Recorder:
    """Stands in for ``module`` while one of its methods is recorded.

    Reading an attribute gives the module's own value, except that a child module becomes a callable
    that appends a ``call_module`` node. ``torch.fx``'s ``Tracer`` instead patches
    ``nn.Module.__call__`` for the whole process while it traces, so a model running in another
    thread at that moment is recorded into the wrong graph (or fails); recording through this stand-in
    changes nothing outside it, and any number of threads may record at once.
    """

    def __init__(self, module: nn.Module, tracer: fx.proxy.TracerBase):
        self._module, self._tracer = module, tracer

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        if isinstance(value, nn.Module):
            tracer = self._tracer
            return lambda *args, **kwargs: tracer.create_proxy("call_module", name, args, kwargs)
        return value


def record(module: nn.Module, method, inputs: tuple[str, ...] = ("x",)) -> fx.Graph:
    """The graph of ``method(module, *inputs)`` with ``module``'s direct children as leaves.

    ``method`` is the unbound function (``type(m).forward``, ``MSFIN.features``). Tensor operations
    between the leaves are recorded through :class:`torch.fx.Proxy` (``+``, ``torch.cat``, …); data-
    dependent control flow raises ``torch.fx.proxy.TraceError`` as it does under ``fx``.
    """
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    args = [tracer.create_proxy("placeholder", name, (), {}) for name in inputs]
    result = method(_Recorder(module, tracer), *args)
    graph.output(tracer.create_arg(result))
    return graph


def trace_features(model: MSFIN) -> fx.Graph:
    """The graph of ``model.features`` with the model's direct children as leaves.

    Module targets are the attribute names (``"head"``). Recorded without patching torch, so it is
    safe while other threads run models; every call returns a new graph.
    """
    graph = record(model, type(model).features, ("y",))
    for node in graph.nodes:
        if node.op == "call_function" and node.target not in (operator.add, torch.cat):
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
