"""The engine under torch.compile: custom ops with fake implementations, one graph, same output."""

from __future__ import annotations

import pytest
import torch

from msfin_fast import MSFIN, optimize
from msfin_fast.engine import ops


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


def test_custom_ops_pass_opcheck(engine):
    x = torch.rand(1, 3, 4, 6) * 255
    keys = engine.runner.keys
    feats = ops.head(x, keys["head"])
    torch.library.opcheck(ops.head, (x, keys["head"]))
    block = "ds0_body"
    args = (feats, None, None, None, None, -1, keys[block], False)
    torch.library.opcheck(ops.rrcab_pass, args)
    _, u, sums = ops.rrcab_pass(*args)
    deferred = (feats, u, sums, feats, None, keys[block])
    torch.library.opcheck(ops.rrcab_pass, deferred + (keys["block_re1"], True))
    torch.library.opcheck(ops.materialize, deferred + (keys["ops"],))
    torch.library.opcheck(ops.tail, deferred + (keys["tail"],))
