"""The HTTP service under abuse, on 127.0.0.1 with its limits lowered so each case runs in seconds:
slow heads and bodies are cut off, bodies over the limit close the connection, uploads held in memory
are bounded, every refusal is the app's own (counted, with Retry-After on 503), costly requests are
refused before they run, and a client that leaves takes its queued work with it."""

import io
import socket
import time

import numpy as np
import pytest
from PIL import Image

from helpers import require_module  # noqa: E402

require_module("starlette")  # the serve extra: a failure where it may not be missing (CI)
require_module("uvicorn")

from msfin_fast import ServingUpscaler, Upscaler  # noqa: E402
from msfin_fast.server import Limits  # noqa: E402

from helpers import Running, png, request  # noqa: E402
from helpers import Gate  # noqa: E402

RNG = np.random.default_rng(3)
FAST = dict(header_timeout=1.0, body_timeout=1.0, slot_wait=0.2)


def connect(port) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_reply(s: socket.socket, timeout: float = 10) -> tuple[int, dict, bytes, bool]:
    """(status, headers, body, closed): reads one response, then whether the server closed the
    connection within 2 s (less than uvicorn's 5 s keep-alive timeout, which would close it too)."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk
        rest += chunk
    s.settimeout(2)
    try:
        closed = s.recv(1) == b""
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        closed = False
    return status, headers, rest[:length], closed


def metric(port, line_start: str) -> float:
    for line in request(port, "/metrics")[2].decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not in /metrics")


@pytest.fixture(scope="module")
def model(pretrained):
    return pretrained("msfin-s-x4")


def test_slow_heads_do_not_shut_out_the_service(model):
    """90 connections dribbling one header line at a time (and one sending nothing): /healthz and
    /upscale still answer while they are open, and each of them gets 408 and is closed when its
    head deadline passes. The 91 connections used to take every slot and answer 503 for as long as
    they lasted."""
    up = ServingUpscaler(model, device="cpu")
    with Running(up, Limits(**FAST)) as srv:
        slow = [connect(srv.port) for _ in range(90)]
        silent = connect(srv.port)
        for s in slow:
            s.sendall(b"POST /upscale HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert request(srv.port, "/healthz", timeout=5)[0] == 200
        image = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        assert request(srv.port, "/upscale", png(image), timeout=20)[0] == 200
        for s in slow[:45]:
            s.sendall(b"X-Slow: 1\r\n")  # still no end of head
        replies = [read_reply(s, timeout=5) for s in slow + [silent]]
        took = time.monotonic() - started
        timeouts = metric(srv.port, 'msfin_refused_total{reason="header_timeout"}')
    for s in slow + [silent]:
        s.close()
    assert all(status == 408 and closed and headers["connection"] == "close"
               for status, headers, _, closed in replies), replies[:2]
    assert took < 5, f"slow heads were cut off after {took:.1f} s; the deadline is 1 s"
    assert timeouts == 91


def test_a_body_over_the_limit_is_refused_and_its_connection_closed(model):
    up = ServingUpscaler(model, device="cpu")
    limit = 64 * 1024
    with Running(up, Limits(max_body=limit, **FAST)) as srv:
        # Declared too large: 413 before a byte of the body is read, then the connection closes.
        s = connect(srv.port)
        s.sendall(b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        status, headers, body, closed = read_reply(s)
        assert (status, headers["connection"], closed) == (413, "close", True)
        s.close()

        # Chunked, no length: the server stops at the limit, answers 413 and closes; a client that
        # keeps sending is cut off instead of being read for as long as it likes (14.5 GiB in 12 s).
        s = connect(srv.port)
        s.sendall(b"POST /upscale HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (8192, b"\0" * 8192)
        for _ in range(limit // 8192 + 1):
            s.sendall(chunk)
        status, headers, body, closed = read_reply(s)
        assert status == 413 and headers["connection"] == "close" and b"exceeds the limit" in body and closed
        sent, started = 0, time.monotonic()
        with pytest.raises(OSError):  # BrokenPipe or ConnectionReset
            s.settimeout(5)
            while sent < 256 * 2**20:
                s.sendall(chunk)
                sent += len(chunk)
        s.close()
        assert sent < 64 * 2**20 and time.monotonic() - started < 5
        assert metric(srv.port, 'msfin_refused_total{reason="body_too_large"}') == 2
        assert metric(srv.port, 'msfin_requests_total{status="413"}') == 2


def test_a_body_that_does_not_arrive_in_time_gets_408(model):
    up = ServingUpscaler(model, device="cpu")
    with Running(up, Limits(**FAST)) as srv:
        s = connect(srv.port)
        s.sendall(b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\0" * 10)
        started = time.monotonic()
        status, headers, body, closed = read_reply(s)
        s.close()
        assert status == 408 and closed and b"within 1 s (10 bytes received)" in body
        assert time.monotonic() - started < 3
        assert metric(srv.port, 'msfin_requests_total{status="408"}') == 1


def test_uploads_held_at_once_are_bounded(model):
    """With one body slot taken by a slow upload, the next upload gets 503 with Retry-After."""
    up = ServingUpscaler(model, device="cpu")
    with Running(up, Limits(max_bodies=1, header_timeout=5, body_timeout=5, slot_wait=0.2)) as srv:
        slow = connect(srv.port)
        slow.sendall(b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\0" * 10)
        time.sleep(0.3)
        status, headers, body = request(srv.port, "/upscale", png(np.zeros((8, 8, 3), np.uint8)))
        assert status == 503 and headers["Retry-After"] == "1" and b"1 uploads are already being received" in body
        assert request(srv.port, "/healthz")[0] == 200
        slow.close()
        time.sleep(0.3)
        assert request(srv.port, "/upscale", png(np.zeros((8, 8, 3), np.uint8)))[0] == 200
        assert metric(srv.port, 'msfin_refused_total{reason="no_body_slot"}') == 1


def test_connections_beyond_the_cap_get_the_apps_503(model):
    up = ServingUpscaler(model, device="cpu")
    with Running(up, Limits(max_connections=4, header_timeout=5)) as srv:
        idle = [connect(srv.port) for _ in range(4)]
        time.sleep(0.2)
        s = connect(srv.port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body, closed = read_reply(s)
        assert status == 503 and headers["retry-after"] == "1" and closed and b"4 connections are open" in body
        for c in idle + [s]:
            c.close()
        time.sleep(0.2)
        assert request(srv.port, "/healthz")[0] == 200
        assert metric(srv.port, 'msfin_refused_total{reason="too_many_connections"}') == 1


@pytest.mark.parametrize("query, image_shape, message", [
    ("tile=1", (16, 16, 3), "must be an integer of at least 8"),
    ("tile=%C2%B2", (16, 16, 3), "must be an integer of at least 8"),  # "²": isdigit() but not int()
    ("tile=99999999999999999999", (16, 16, 3), "must be an integer of at least 8"),
    ("self_ensemble=1", (40, 30, 3), "too much work: 30×40 px with self_ensemble (×8) costs 0.0 M"),
    ("tile=8&self_ensemble=1", (30, 30, 3), "with plain tiles of 8 costs"),
])
def test_costly_or_malformed_requests_are_400_before_any_work(model, query, image_shape, message):
    """tile=1 on a 16×16 image used to take 11 s of the single worker (99 s with self-ensemble)."""
    up = ServingUpscaler(model, device="cpu")
    with Running(up, Limits(max_work=8000)) as srv:
        started = time.monotonic()
        status, headers, body = request(srv.port, f"/upscale?{query}",
                                        png(RNG.integers(0, 256, image_shape, dtype=np.uint8)))
        assert status == 400 and message in body.decode(), body
        assert time.monotonic() - started < 2 and up.snapshot().images == 0


@pytest.mark.parametrize("make, message", [
    (lambda b: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(b, format="GIF"), "not one of PNG, JPEG"),
    (lambda b: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(b, format="PPM"), "not one of PNG, JPEG"),
    (lambda b: Image.fromarray(np.zeros((8, 8), np.float32)).save(b, format="TIFF"), "floating-point samples"),
    (lambda b: Image.fromarray(np.full((8, 8), -3, np.int32)).save(b, format="TIFF"), "32-bit grey samples"),
])
def test_undocumented_formats_and_sample_types_are_400(model, make, message):
    """Float and int32 TIFFs were decoded outside the error handling and answered 500."""
    up = ServingUpscaler(model, device="cpu")
    with Running(up) as srv:
        buffer = io.BytesIO()
        make(buffer)
        status, _, body = request(srv.port, "/upscale", buffer.getvalue())
    assert status == 400 and message in body.decode(), body


def test_a_client_that_leaves_takes_its_queued_work_with_it():
    gate = Gate()
    up = ServingUpscaler(gate, device="cpu", max_batch=1, batch_window=0.0)
    image = png(np.zeros((4, 4, 3), np.uint8))
    head = b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(image)
    with Running(up) as srv:
        first = connect(srv.port)
        first.sendall(head + image)
        assert gate.entered.wait(20)  # the worker holds the first request
        leaver = connect(srv.port)
        leaver.sendall(head + image)
        deadline = time.monotonic() + 10
        while up.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        leaver.close()
        while up.queue_depth > 0:  # dropped from the queue at once, not when the worker gets to it
            assert time.monotonic() < deadline, "the departed client's request stayed queued"
            time.sleep(0.01)
        gate.release.set()
        assert read_reply(first)[0] == 200
        first.close()
        stats = up.snapshot()
        assert stats.images == 1 and stats.cancelled == 1 and gate.batches == [1]
        assert metric(srv.port, 'msfin_requests_total{status="499"}') == 1
        assert metric(srv.port, 'msfin_requests_total{status="200"}') == 1
        assert metric(srv.port, "msfin_cancelled_total") == 1


def test_the_service_the_api_and_the_cli_give_the_same_pixels(model, tmp_path, weights_dir):
    """The same file through the CLI, Upscaler.upscale_file, Upscaler.upscale and the service (with
    concurrent requests, so that they share batches) decodes to identical pixels. The service used
    to differ by ±1 on some pixels: its input had another memory layout, and batches round
    differently from single images in oneDNN."""
    from concurrent.futures import ThreadPoolExecutor

    from msfin_fast.cli import main

    files = []
    for i, (shape, fmt) in enumerate([((23, 17, 3), "PNG"), ((23, 17, 4), "PNG"), ((23, 17), "PNG"),
                                      ((23, 17, 3), "JPEG"), ((23, 17, 3), "PNG"), ((23, 17, 3), "PNG")]):
        path = tmp_path / f"in{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)
        files.append(path)
    direct = Upscaler(model, device="cpu")
    up = ServingUpscaler(model, device="cpu", max_batch=4, batch_window=0.2)
    with Running(up) as srv, ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda p: request(srv.port, "/upscale", p.read_bytes()), files))
        assert max(up.snapshot().batch_sizes) > 1
    for path, (status, _, body) in zip(files, served):
        assert status == 200
        via_service = np.asarray(Image.open(io.BytesIO(body)))
        assert main(["upscale", "-i", str(path), "-o", str(tmp_path / f"cli_{path.stem}.png"),
                     "--model", "msfin-s-x4", "-q"]) == 0
        via_cli = np.asarray(Image.open(tmp_path / f"cli_{path.stem}.png"))
        direct.upscale_file(path, tmp_path / f"api_{path.stem}.png")
        via_file = np.asarray(Image.open(tmp_path / f"api_{path.stem}.png"))
        via_pil = np.asarray(direct.upscale(Image.open(path)))
        for name, other in (("CLI", via_cli), ("upscale_file", via_file), ("upscale(PIL)", via_pil)):
            assert other.shape == via_service.shape and np.array_equal(other, via_service), \
                f"{path.name}: {name} and the service differ in {(other != via_service).sum()} values"


def test_nan_output_is_a_500_with_its_reason_not_a_black_png():
    from helpers import HalfBroken

    up = ServingUpscaler(HalfBroken(), device="cpu")
    with Running(up) as srv:
        status, _, body = request(srv.port, "/upscale", png(np.full((4, 4, 3), 7, np.uint8)))
        assert status == 500 and b"NaN/Inf" in body and b"No image was made" in body
        assert request(srv.port, "/upscale", png(np.full((4, 4, 3), 9, np.uint8)))[0] == 200
