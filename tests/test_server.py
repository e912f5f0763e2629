"""The HTTP service on 127.0.0.1: concurrent clients all get the right PNG, bad uploads are refused
with the right status, a full queue answers 503, and /metrics counts what happened."""

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from helpers import require_module  # noqa: E402

require_module("starlette")  # the serve extra: a failure where it may not be missing (CI)
require_module("uvicorn")

from msfin_fast import ServingUpscaler, Upscaler  # noqa: E402
from msfin_fast.server import Limits  # noqa: E402

from helpers import Gate, Running, close_enough, free_port, png, request, wait_until_serving  # noqa: E402

RNG = np.random.default_rng(0)



@pytest.fixture(scope="module")
def model(pretrained):
    return pretrained("msfin-s-x4")


def test_concurrent_clients_all_get_their_image(model):
    """16 requests from 8 threads (two shapes, one greyscale): about 2 s on two CPU cores."""
    images = [RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    images += [RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(3)]
    grey = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    direct = Upscaler(model, device="cpu")
    up = ServingUpscaler(model, device="cpu", max_batch=4, batch_window=0.01)
    with Running(up) as srv:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda im: request(srv.port, "/upscale", png(im)), images + [grey]))
        health = request(srv.port, "/healthz")
        metrics = request(srv.port, "/metrics")[2].decode()
    for image, (status, headers, body) in zip(images + [grey], answers):
        assert status == 200 and headers["Content-Type"] == "image/png"
        out = Image.open(io.BytesIO(body))
        assert out.mode == ("L" if image.ndim == 2 else "RGB")
        assert close_enough(np.asarray(out), direct.upscale(image))
    assert health[0] == 200 and b'"status":"ok"' in health[2]
    assert 'msfin_requests_total{status="200"} 16' in metrics
    assert "msfin_images_total 16" in metrics and "msfin_batch_size_count" in metrics
    assert 'msfin_batch_size_bucket{le="+Inf"}' in metrics
    # Parsed as Prometheus does: the latency is a histogram (replicas' buckets add up), one
    # observation per request, and every family keeps its name.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert families["msfin_request_latency_seconds"].type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in families["msfin_request_latency_seconds"].samples}
    assert samples["msfin_request_latency_seconds_count", None] == 16
    assert samples["msfin_request_latency_seconds_bucket", "+Inf"] == 16
    assert samples["msfin_request_latency_seconds_bucket", "60.0"] == 16
    assert families["msfin_batch_size"].type == "histogram"
    assert {"msfin_requests", "msfin_refused", "msfin_images", "msfin_cancelled", "msfin_cuda_graph_hits",
            "msfin_queue_depth"} <= families.keys()


def test_bad_uploads_are_refused_with_clear_messages(model):
    up = ServingUpscaler(model, device="cpu", backend="reference")  # requests for exact tiles are served
    with Running(up, Limits(max_body=4000, max_pixels=600)) as srv:
        cases = {
            "not an image": request(srv.port, "/upscale", b"this is text, not a picture"),
            "empty": request(srv.port, "/upscale", b""),
            "too large": request(srv.port, "/upscale", os.urandom(5000)),
            "too many pixels": request(srv.port, "/upscale", png(np.zeros((30, 30, 3), np.uint8))),
            "bad tile": request(srv.port, "/upscale?tile=-3", png(np.zeros((8, 8, 3), np.uint8))),
            "unknown param": request(srv.port, "/upscale?scale=2", png(np.zeros((8, 8, 3), np.uint8))),
            "truncated": request(srv.port, "/upscale", png(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8))[:200]),
        }
        ok = request(srv.port, "/upscale?self_ensemble=1&tile=8&tile_mode=exact",
                     png(RNG.integers(0, 256, (10, 9, 3), dtype=np.uint8)))
        metrics = request(srv.port, "/metrics")[2].decode()
    expected = {"not an image": (400, "not an image"), "empty": (400, "empty body"),
                "too large": (413, "limit is 4000 bytes"), "too many pixels": (400, "at most 600 pixels"),
                "bad tile": (400, "tile='-3'"), "unknown param": (400, "unknown query parameter"),
                "truncated": (400, "cannot read image")}
    for name, (status, message) in expected.items():
        got_status, _, body = cases[name]
        assert got_status == status and message in body.decode(), (name, got_status, body)
    assert ok[0] == 200 and Image.open(io.BytesIO(ok[2])).size == (36, 40)
    assert 'msfin_requests_total{status="400"} 6' in metrics
    assert 'msfin_requests_total{status="413"} 1' in metrics


def test_full_queue_answers_503():
    gate = Gate()
    up = ServingUpscaler(gate, device="cpu", max_batch=1, max_queue=1, batch_window=0.0)
    image = png(np.zeros((4, 4, 3), np.uint8))
    with Running(up) as srv, ThreadPoolExecutor(2) as pool:
        first = pool.submit(request, srv.port, "/upscale", image)
        assert gate.entered.wait(20)  # the worker holds the first request
        second = pool.submit(request, srv.port, "/upscale", image)
        deadline = time.monotonic() + 20
        while up.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, headers, body = request(srv.port, "/upscale", image)
        assert status == 503 and headers["Retry-After"] == "1" and b"max_queue=1" in body
        gate.release.set()
        assert first.result(20)[0] == 200 and second.result(20)[0] == 200


def test_msfin_fast_serve_command(weights_dir, tmp_path):
    """The real command in a subprocess: starts, answers, and stops on SIGTERM (about 5 s)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "msfin_fast", "serve", "--model", "msfin-s-x4", "--device", "cpu",
         "--port", str(port), "--max-pixels", "10000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until_serving(proc, port)
        image = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        status, _, body = request(port, "/upscale", png(image))
        assert status == 200 and Image.open(io.BytesIO(body)).size == (64, 64)
        assert request(port, "/upscale", png(np.zeros((101, 100, 3), np.uint8)))[0] == 400
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert f"at http://127.0.0.1:{port}" in out
