"""Many threads calling one or two Upscalers at once, from their very first call.

The memory estimate and exact tiles walk the network's graph. Built with ``torch.fx``'s tracer, that
graph patched ``nn.Module.__call__`` for the whole process while it was traced, so a model called in
another thread at that moment was recorded into the wrong graph (``NameError: module is not
installed as a submodule``) and could leave the process broken. These tests start every thread at
the same instant (a barrier) on fresh Upscalers and fresh caches, and require the outputs to equal
the single-threaded ones bit for bit and the process to stay healthy afterwards.
"""

import threading

import numpy as np
import pytest
import torch
from torch import nn

from msfin_fast import Upscaler
from msfin_fast import tiling

THREADS = 8
RNG = np.random.default_rng(7)
IMAGES = [RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(THREADS)]


def _in_threads(calls):
    """Run each zero-argument call in its own thread, all released together; results in order."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 — every failure is reported below
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a thread hung"
    assert not errors, "\n".join(errors)
    return results


def _fresh_caches():
    tiling.bytes_per_output_pixel.cache_clear()
    tiling.clear_graph_caches()


def _process_is_healthy():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        assert conv(torch.ones(1, 3, 5, 5)).shape == (1, 4, 5, 5)
    assert type(nn.Module.__call__) is type(lambda: None) and nn.Module.__call__.__name__ == "_wrapped_call_impl"


@pytest.mark.parametrize("tile_mode", ["whole", "exact"])
@pytest.mark.parametrize("upscalers", [1, 2])
def test_first_calls_from_eight_threads(model_for, tile_mode, upscalers):
    model = model_for("msfin-s-x4", "cpu")
    options = {"tile": 8, "tile_mode": "exact"} if tile_mode == "exact" else {}
    expected = [Upscaler(model, device="cpu", **options).upscale(im) for im in IMAGES]

    _fresh_caches()
    ups = [Upscaler(model, device="cpu", **options) for _ in range(upscalers)]
    got = _in_threads([lambda i=i: ups[i % upscalers].upscale(IMAGES[i]) for i in range(THREADS)])
    for i, (a, b) in enumerate(zip(got, expected)):
        assert np.array_equal(a, b), f"thread {i}: output differs from the single-threaded run"
    _process_is_healthy()


def test_inference_in_other_threads_while_an_upscaler_is_built(model_for):
    """Building Upscalers (and the engine's plan, which walks the same graph) never disturbs models
    running in other threads: nothing patches torch process-wide."""
    model = model_for("msfin-s-x4", "cpu")
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = plain(x)

    builders_done = []

    def build():
        try:
            for _ in range(3):
                _fresh_caches()
                Upscaler(model, device="cpu", tile=8, tile_mode="exact").upscale(IMAGES[0])
        finally:
            builders_done.append(True)

    def infer():  # runs for as long as any builder does
        outs = []
        with torch.no_grad():
            while len(builders_done) < 3 or not outs:
                outs.append(plain(x))
        return outs

    results = _in_threads([build, infer, build, infer, build, infer])
    for outs in results[1::2]:
        assert all(torch.equal(o, want) for o in outs)
    _process_is_healthy()
