"""The HTTP service on 127.0.0.1: concurrent clients all get the right PNG, bad uploads are refused
with the right status, a full queue answers 503, and /metrics counts what happened."""

import io
import os
import re
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


# ---------------------------------------------------------------------------------------------
# multipart/form-data uploads (curl -F, browsers)

BOUNDARY = "----msfinFormBoundary7MA4YWxkTrZu0gW"


def form(*parts, boundary=BOUNDARY):
    """A multipart/form-data body built by hand, as browsers and curl write it, and its Content-Type.
    ``parts``: (name, value, filename or None); a part with a filename is a file part."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            body += b"Content-Type: image/png\r\n"
        body += b"\r\n" + (value.encode() if isinstance(value, str) else value) + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(port, path, body, content_type):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_a_form_upload_gets_the_same_png_as_the_raw_body(model):
    """The image as the field ``image`` (file or text), or as the one file field of another name:
    the same PNG as the raw body. Options as form fields act as the same query parameters do."""
    image = RNG.integers(0, 256, (10, 9, 3), dtype=np.uint8)
    data = png(image)
    up = ServingUpscaler(model, device="cpu", backend="reference")  # exact tiles are served
    with Running(up) as srv:
        raw = request(srv.port, "/upscale", data)
        forms = {
            "image file": post(srv.port, "/upscale", *form(("image", data, "photo.png"))),
            "image text field": post(srv.port, "/upscale", *form(("image", data, None))),
            "one file, another name": post(srv.port, "/upscale", *form(("upload", data, "фото.png"))),
            "after a text field": post(srv.port, "/upscale", *form(("tile_mode", "plain", None),
                                                                     ("file", data, "p.png"))),
        }
        options = "self_ensemble=1&tile=8&tile_mode=exact"
        by_query = request(srv.port, f"/upscale?{options}", data)
        by_fields = post(srv.port, "/upscale", *form(("self_ensemble", "1", None), ("image", data, "a.png"),
                                                     ("tile", "8", None), ("tile_mode", "exact", None)))
        mixed = post(srv.port, "/upscale?tile=8&self_ensemble=true",
                     *form(("image", data, "a.png"), ("tile", "8", None), ("tile_mode", "exact", None)))
        conflict = post(srv.port, "/upscale?tile=8", *form(("image", data, "a.png"), ("tile", "16", None)))
    assert raw[0] == 200 and raw[1]["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(raw[2])).size == (36, 40)
    for name, (status, headers, body) in forms.items():
        assert status == 200 and headers["Content-Type"] == "image/png", (name, status, body[:200])
        assert body == raw[2], f"{name}: the form upload's PNG differs from the raw body's"
    assert by_query[0] == 200 and by_query[2] != raw[2]  # the options change the result...
    assert by_fields[0] == 200 and by_fields[2] == by_query[2]  # ...and as fields, the same way
    assert mixed[0] == 200 and mixed[2] == by_query[2]
    assert conflict[0] == 400 and b"tile is '16' in the form but '8' in the query" in conflict[2]


def test_bad_forms_are_refused_with_clear_messages(model):
    up = ServingUpscaler(model, device="cpu")
    small = png(np.zeros((8, 8, 3), np.uint8))
    body, content_type = form(("image", small, "a.png"))
    with Running(up, Limits(max_body=4000, max_pixels=600)) as srv:
        cases = {
            "no file": post(srv.port, "/upscale", *form(("tile", "8", None))),
            "two files": post(srv.port, "/upscale", *form(("a", small, "a.png"), ("b", small, "b.png"))),
            "image twice": post(srv.port, "/upscale", *form(("image", small, None), ("b", small, "b.png"))),
            "no boundary": post(srv.port, "/upscale", body, "multipart/form-data"),
            "truncated": post(srv.port, "/upscale", body[:-40], content_type),
            "not its boundary": post(srv.port, "/upscale", small, content_type),
            "unknown field": post(srv.port, "/upscale", *form(("image", small, "a.png"), ("scale", "2", None))),
            "repeated field": post(srv.port, "/upscale", *form(("image", small, "a.png"), ("tile", "8", None),
                                                                 ("tile", "8", None))),
            "bad option": post(srv.port, "/upscale", *form(("image", small, "a.png"), ("tile", "-3", None))),
            "empty file": post(srv.port, "/upscale", *form(("image", b"", ""))),
            "not an image": post(srv.port, "/upscale", *form(("image", b"this is text", "a.png"))),
            "too many pixels": post(srv.port, "/upscale", *form(("image", png(np.zeros((30, 30, 3), np.uint8)),
                                                                  "a.png"))),
            "too large": post(srv.port, "/upscale", *form(("image", os.urandom(5000), "a.png"))),
        }
        raw_too_large = request(srv.port, "/upscale", os.urandom(5000))
        still_serving = post(srv.port, "/upscale", body, content_type)
        metrics = request(srv.port, "/metrics")[2].decode()
    expected = {
        "no file": (400, "no image: send it as a file field named 'image'"),
        "two files": (400, "2 image parts ('a', 'b'); send exactly one image"),
        "image twice": (400, "2 image parts ('image', 'b')"),
        "no boundary": (400, "the Content-Type has no boundary parameter"),
        "truncated": (400, "truncated: its closing boundary is missing"),
        "not its boundary": (400, "the body does not contain the boundary its Content-Type names"),
        "unknown field": (400, "unknown form field(s) 'scale'"),
        "repeated field": (400, "the field 'tile' is given twice"),
        "bad option": (400, "tile='-3' must be an integer"),
        "empty file": (400, "the form's file field 'image' is empty"),
        "not an image": (400, "the form's file field 'image': not an image file"),
        "too many pixels": (400, "at most 600 pixels"),
        "too large": (413, "the limit is 4000 bytes"),
    }
    for name, (status, message) in expected.items():
        got_status, _, reply = cases[name]
        assert got_status == status and message in reply.decode(), (name, got_status, reply)
    assert cases["too large"][1]["Connection"] == "close"
    def sizeless(reply):  # the message names the body's declared size
        return re.sub(rb"body is \d+ bytes", b"body is N bytes", reply)

    assert raw_too_large[0] == 413 and sizeless(raw_too_large[2]) == sizeless(cases["too large"][2])  # as raw
    assert still_serving[0] == 200 and Image.open(io.BytesIO(still_serving[2])).size == (32, 32)
    assert 'msfin_refused_total{reason="bad_request"} 11.0' in metrics
    assert 'msfin_refused_total{reason="body_too_large"} 2.0' in metrics


def test_curl_form_upload(model, tmp_path):
    """A real ``curl -F image=@file.png`` (over 1 KiB, so curl sends ``Expect: 100-continue``), with an
    option as a field: the same PNG as the raw body with the option in the query."""
    import shutil

    from helpers import missing

    if shutil.which("curl") is None:
        missing("curl is not on PATH")
    data = png(RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    assert len(data) > 1024
    (tmp_path / "photo.png").write_bytes(data)
    up = ServingUpscaler(model, device="cpu")
    with Running(up) as srv:
        raw = request(srv.port, "/upscale?self_ensemble=1", data)
        done = subprocess.run(["curl", "-sS", "-F", "image=@photo.png", "-F", "self_ensemble=1",
                               "-o", "out.png", "-w", "%{http_code}", f"http://127.0.0.1:{srv.port}/upscale"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == "200", (done.stdout, done.stderr)
    assert raw[0] == 200 and (tmp_path / "out.png").read_bytes() == raw[2]
