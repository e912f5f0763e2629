"""The engine under torch.compile: one custom op with a fake implementation, one graph, same output."""

from __future__ import annotations

import pytest
import torch

from msfin_fast import MSFIN, optimize
from msfin_fast.engine import custom_op


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return optimize(MSFIN("msfin-s-x4").eval(), dtype=torch.float32, backend="emulate")


def test_compiled_engine_is_one_graph_with_the_eager_output(engine):
    torch._dynamo.reset()
    x = torch.rand(2, 3, 5, 7) * 255
    want = engine(x)
    explanation = torch._dynamo.explain(engine)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(engine, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), want)


def test_the_functional_run_equals_the_eager_one(engine):
    x = torch.rand(2, 3, 4, 6) * 255
    assert torch.equal(engine.executor.run_functional(x, engine._key), engine(x))


def test_custom_op_passes_opcheck_on_every_kind_of_launch(engine):
    """opcheck (schema, fake vs real outputs, autograd registration) on the first launch of each
    kind in the plan: head, two-launch and deferred passes, conv, materialize, tail."""
    x = torch.rand(1, 3, 4, 6) * 255
    calls = []
    engine.executor.run_functional(x, engine._key, record=calls)
    launches = engine.plan.launches
    assert len(calls) == len(launches)  # every launch of an emulate plan goes through the op
    seen = {}
    for index, inputs in calls:
        launch = launches[index]
        kind = (type(launch).__name__, getattr(launch, "src", None) is not None and launch.src.u is not None)
        seen.setdefault(kind, (index, inputs))
    kinds = {name for name, _ in seen}
    assert {"Head", "RRCABPass", "Conv", "Materialize", "Tail"} <= kinds
    assert ("RRCABPass", True) in seen and ("RRCABPass", False) in seen
    for index, inputs in seen.values():
        torch.library.opcheck(custom_op.launch, (engine._key, index, inputs))


def test_whole_network_backends_compile_without_graph_breaks():
    """The reference and cpu backends, and MSFIN itself: the input's finiteness test is left out
    under torch.compile instead of breaking the graph."""
    torch.manual_seed(0)
    model = MSFIN("msfin-s-x4").eval()
    x = torch.rand(1, 3, 5, 6) * 255
    for module in (model, optimize(model, dtype=torch.float32, backend="cpu"),
                   optimize(model, dtype=torch.float32, backend="reference")):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(module)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
