import operator

import pytest
import torch

from msfin_fast.trace import run_graph, trace_features
from msfin_fast.model import MSFIN, RRCAB


@pytest.mark.parametrize("preset", ["msfin-x4", "msfin-s-x4"])
def test_traced_graph_reproduces_features(preset):
    torch.manual_seed(0)
    model = MSFIN(preset).eval()
    graph = trace_features(model)
    y = torch.randn(2, 3, 12, 20) * 50
    with torch.no_grad():
        assert torch.equal(run_graph(graph, model, y), model.features(y))


def test_graph_leaves_are_the_models_children():
    model = MSFIN("msfin-s-x4")
    graph = trace_features(model)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    children = dict(model.named_children())
    assert all(t in children for t in targets)
    rrcabs = [t for t in targets if isinstance(children[t], RRCAB)]
    assert len(rrcabs) == len(set(rrcabs)) == 24
    ops = {n.target for n in graph.nodes if n.op == "call_function"}
    assert ops == {operator.add, torch.cat}
