"""ServingUpscaler: concurrent requests come back right, same-shape requests share a batch, a full
queue refuses instead of growing, and a failing batch fails only its own requests."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from msfin_fast import MSFIN, InvalidInputError, QueueFullError, ServingUpscaler, Upscaler
from msfin_fast.run import RunOptions

from helpers import Gate, HalfBroken, close_enough

RNG = np.random.default_rng(0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def direct(pretrained):
    return Upscaler(pretrained("msfin-s-x4"), device="cpu")


def test_concurrent_requests_match_direct_calls_and_share_batches(pretrained, direct):
    images = [RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(12)]
    images += [RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    with ServingUpscaler(pretrained("msfin-s-x4"), device="cpu", max_batch=4, batch_window=0.05) as up:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda im: up.upscale(im, timeout=60), images))
        stats = up.snapshot()
    for image, result in zip(images, results):
        assert close_enough(result, direct.upscale(image))
    assert stats.images == 16 and stats.failed == 0
    assert sum(size * n for size, n in stats.batch_sizes.items()) == 16
    assert max(stats.batch_sizes) > 1 and max(stats.batch_sizes) <= 4


def test_batches_hold_one_shape_and_one_set_of_options():
    gate = Gate()
    with ServingUpscaler(gate, device="cpu", max_batch=8, batch_window=0.0) as up:
        first = up.submit(np.zeros((4, 4, 3), np.uint8))
        assert gate.entered.wait(10)  # the worker is busy with the first request
        a = [up.submit(np.full((4, 4, 3), i, np.uint8)) for i in range(3)]
        b = up.submit(np.zeros((4, 6, 3), np.uint8))
        c = up.submit(np.zeros((4, 4, 3), np.uint8), up.options(self_ensemble=True))
        gate.release.set()
        outs = [f.result(10) for f in [first, *a, b, c]]
        stats = up.snapshot()
    assert stats.batch_sizes == {1: 3, 3: 1}  # the 3 same-shape requests were taken together
    assert [o[0, 0, 0] for o in outs[1:4]] == [0, 1, 2] and outs[4].shape == (16, 24, 3)
    # On a CPU a batch runs image by image (byte-identical to the API); self-ensemble: 8 variants.
    assert gate.batches == [1, 1, 1, 1, 1, 8]


def test_full_queue_refuses_and_close_finishes_the_queue():
    gate = Gate()
    up = ServingUpscaler(gate, device="cpu", max_batch=1, max_queue=2, batch_window=0.0)
    running = up.submit(np.zeros((4, 4, 3), np.uint8))
    assert gate.entered.wait(10)
    queued = [up.submit(np.zeros((4, 4, 3), np.uint8)) for _ in range(2)]
    assert up.queue_depth == 2
    with pytest.raises(QueueFullError, match="max_queue=2"):
        up.submit(np.zeros((4, 4, 3), np.uint8))
    gate.release.set()
    up.close()
    assert all(f.result(10).shape == (16, 16, 3) for f in [running, *queued])
    with pytest.raises(QueueFullError, match="closed"):
        up.submit(np.zeros((4, 4, 3), np.uint8))


def test_a_failing_batch_fails_only_its_requests():
    gate = Gate()
    gate.release.set()
    with ServingUpscaler(gate, device="cpu", batch_window=0.0) as up:
        with pytest.raises(RuntimeError, match="white images"):
            up.upscale(np.full((4, 4, 3), 255, np.uint8), timeout=10)
        assert up.upscale(np.zeros((4, 4, 3), np.uint8), timeout=10).shape == (16, 16, 3)
        assert up.snapshot().failed == 1


@pytest.mark.parametrize("image", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                   np.zeros((0, 4, 3), np.uint8)])
def test_bad_requests_are_refused_at_submit(image):
    gate = Gate()
    with ServingUpscaler(gate, device="cpu") as up:
        with pytest.raises(InvalidInputError, match="uint8 or uint16 H×W×3"):
            up.submit(image)


@pytest.mark.parametrize("kwargs, message", [(dict(max_batch=0), "max_batch"), (dict(max_queue=0), "max_queue"),
                                             (dict(batch_window=-1), "batch_window"),
                                             (dict(graph_cache=-1), "graph_cache")])
def test_bad_settings(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        ServingUpscaler(Gate(), device="cpu", **kwargs)


@pytest.mark.gpu
@pytest.mark.gpu
def test_cuda_graphs_match_eager_and_the_cache_is_bounded():
    torch.manual_seed(0)
    from msfin_fast.model import MSFIN

    model = MSFIN("msfin-s-x4").eval()
    direct = Upscaler(model, device="cuda")
    with ServingUpscaler(model, device="cuda", graph_cache=2, batch_window=0.0) as up:
        for size in (8, 12, 16, 8):
            image = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for _ in range(2):
                assert close_enough(up.upscale(image, timeout=60), direct.upscale(image))
        stats = up.snapshot()
        assert len(up._runner.graphs) == 2
        assert stats.graph_captures == 4 and stats.graph_hits == 4  # 8 evicted by 16, captured again
        ensemble = up.upscale(image, up.options(self_ensemble=True), timeout=60)
        assert close_enough(ensemble, Upscaler(model, device="cuda", self_ensemble=True).upscale(image))


def test_every_cached_graph_keeps_alive_the_arenas_it_replays_into(monkeypatch):
    """Serving captures the engine's eager call, so its graph replays into the engine's arena of that
    shape and the engine's packed weights. The engine keeps 4 arenas, serving 8 graphs, and a
    self-ensemble batch runs 2 shapes: past 4 shapes the engine drops an arena a cached graph still
    replays into (on a GPU: an illegal address, or another tensor overwritten). Here on the CPU, with
    a stand-in capture: after 7 shapes every arena that any cached graph's capture ran over is alive."""
    import gc
    import weakref

    from helpers import EagerGraph

    from msfin_fast import run as run_layer
    from msfin_fast.engine.executor import Executor

    recording: list | None = None
    real_run = Executor.run

    def run(self, x, arena, out):
        if recording is not None:
            recording.append(weakref.ref(arena))
        return real_run(self, x, arena, out)

    class Recording(EagerGraph):
        def _record(self, fn, stream):
            nonlocal recording
            recording = []
            try:
                return super()._record(fn, stream)
            finally:
                self.arenas_run_over, recording = recording, None

    monkeypatch.setattr(Executor, "run", run)
    monkeypatch.setattr(run_layer, "CapturedGraph", Recording)
    torch.manual_seed(0)
    model = MSFIN("msfin-s-x4").eval()
    upscaler = Upscaler(model, device="cpu", backend="emulate")
    runner = run_layer.BatchRunner(upscaler, graph_cache=8)
    runner._graph_cache = 8  # as on CUDA (the CPU path runs no graphs)
    plain, ensemble = RunOptions(), RunOptions(self_ensemble=True)
    requests = [((1, 4, 5, 3), plain), ((1, 5, 6, 3), ensemble), ((2, 4, 5, 3), plain),
                ((1, 6, 7, 3), ensemble), ((1, 3, 4, 3), plain)]  # 7 arena shapes, 5 graphs
    for shape, options in requests:
        assert runner._graph_for(shape, torch.uint8, options) is not None
    gc.collect()
    graphs = list(runner.graphs.values())
    assert len(graphs) == len(requests) and len(upscaler.model._arenas) == 4
    assert sum(len(g.arenas_run_over) for g in graphs) == 7
    dead = [i for i, g in enumerate(graphs) for ref in g.arenas_run_over if ref() is None]
    assert not dead, f"graphs {dead} would replay into freed arenas"
    for (shape, options), graph in zip(requests, graphs):  # and what they replay is still right
        images = RNG.integers(0, 256, shape, dtype=np.uint8)
        out, _ = graph.replay(torch.from_numpy(images))
        reference = Upscaler(model, device="cpu", self_ensemble=options.self_ensemble)
        for image, got in zip(images, out.numpy()):
            assert close_enough(got, reference.upscale(image))


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_engine_graphs_replay_after_many_shapes(dtype):
    """The same on a GPU for real: more shapes than the engine keeps arenas, then replay the first."""
    torch.manual_seed(0)
    model = MSFIN("msfin-s-x4").eval()
    direct = Upscaler(model, device="cuda", dtype=dtype, backend="triton")
    with ServingUpscaler(model, device="cuda", dtype=dtype, backend="triton", batch_window=0.0) as up:
        images = [RNG.integers(0, 256, (8 + i, 12 - i, 3), dtype=np.uint8) for i in range(6)]
        for image in images + images[:2]:
            assert close_enough(up.upscale(image, timeout=120), direct.upscale(image))
        ensemble = up.upscale(images[0], up.options(self_ensemble=True), timeout=120)
        assert close_enough(ensemble, Upscaler(model, device="cuda", dtype=dtype, backend="triton",
                                               self_ensemble=True).upscale(images[0]))
        stats = up.snapshot()
    assert stats.graph_captures == 7 and stats.graph_hits == 2



def test_nan_output_fails_only_its_own_image_and_is_never_an_image():
    """A NaN would be written as black by the uint8 conversion; it is an error for that image only,
    even inside a shared batch."""
    from msfin_fast import NonFiniteOutputError

    with ServingUpscaler(HalfBroken(), device="cpu", max_batch=4, batch_window=0.2) as up:
        futures = [up.submit(np.full((4, 4, 3), v, np.uint8)) for v in (1, 7, 2)]
        assert futures[0].result(10)[0, 0, 0] == 1 and futures[2].result(10)[0, 0, 0] == 2
        with pytest.raises(NonFiniteOutputError, match="NaN/Inf .*No image was made"):
            futures[1].result(10)
        stats = up.snapshot()
    assert stats.images == 2 and stats.failed == 1 and stats.batch_sizes == {3: 1}


def test_a_cpu_backend_service_refuses_exact_tiles_by_name():
    torch.manual_seed(0)
    with ServingUpscaler(MSFIN("msfin-s-x4").eval(), device="cpu", backend="cpu") as up:
        assert up.backend == "cpu"
        rgb = np.zeros((8, 8, 3), np.uint8)
        assert up.upscale(rgb).shape == (32, 32, 3)
        with pytest.raises(InvalidInputError, match="--backend reference"):
            up.submit(rgb, up.options(tile=8, tile_mode="exact"))


def test_submit_many_queues_together_so_one_shape_runs_as_one_batch():
    gate = Gate()
    gate.release.set()
    with ServingUpscaler(gate, device="cuda" if torch.cuda.is_available() else "cpu", max_batch=3,
                         max_queue=6, batch_window=0.0) as up:
        same = [np.full((4, 4, 3), i, np.uint8) for i in range(5)]
        futures = up.submit_many([*same, np.zeros((4, 6, 3), np.uint8)])
        outs = [f.result(10) for f in futures]
        stats = up.snapshot()
        with pytest.raises(QueueFullError, match="max_queue=6"):
            up.submit_many([np.zeros((4, 4, 3), np.uint8)] * 7)
        with pytest.raises(InvalidInputError, match="uint8"):
            up.submit_many([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)])
        assert up.queue_depth == 0  # all or none
    assert [int(o[0, 0, 0]) for o in outs[:5]] == [0, 1, 2, 3, 4] and outs[5].shape == (16, 24, 3)
    # Five of one shape in batches of at most 3, the other shape on its own, whichever order.
    assert stats.batch_sizes == {3: 1, 2: 1, 1: 1}


def test_serving_takes_an_upscaler_whose_options_are_the_requests_default(weights_dir):
    """ServingUpscaler serves a built Upscaler (no second list of its arguments): its options are
    what a request without options runs, and the bytes are the Upscaler's."""
    up = Upscaler("msfin-s-x4", device="cpu", tile=8, tile_pad=2)
    rgb = RNG.integers(0, 256, (13, 11, 3), dtype=np.uint8)
    with ServingUpscaler(up, max_batch=2, batch_window=0) as service:
        assert service.upscaler is up and service.default_options == up.options
        assert service.options(self_ensemble=True).tile_pad == 2
        assert np.array_equal(service.upscale(rgb, timeout=60), up.upscale(rgb))
    with pytest.raises(InvalidInputError, match="give these to the Upscaler"):
        ServingUpscaler(up, device="cpu")
    with ServingUpscaler("msfin-s-x4", device="cpu", tile_pad=3) as built:  # or its model and arguments
        assert isinstance(built.upscaler, Upscaler) and built.default_options.tile_pad == 3


def test_a_batch_is_graphed_only_when_the_engines_own_arena_fits(monkeypatch):
    """The fit check before a capture is the one before a run (run.fits_whole): an engine's own
    arena with its headroom, not the reference's estimate."""
    from helpers import EagerGraph

    from msfin_fast import run as run_layer

    torch.manual_seed(0)
    upscaler = Upscaler(MSFIN("msfin-s-x4").eval(), device="cpu", backend="emulate")
    runner = run_layer.BatchRunner(upscaler, graph_cache=8)
    runner._graph_cache = 8  # as on CUDA
    monkeypatch.setattr(run_layer, "CapturedGraph", EagerGraph)
    need = upscaler.model.arena_bytes(1, 24, 20) * run_layer.ENGINE_HEADROOM
    monkeypatch.setattr(run_layer, "available_memory", lambda device: int(need * 0.97))
    assert runner._graph_for((1, 24, 20, 3), torch.uint8, RunOptions()) is None
    monkeypatch.setattr(run_layer, "available_memory", lambda device: int(need * 1.03))
    assert runner._graph_for((1, 24, 20, 3), torch.uint8, RunOptions()) is not None
