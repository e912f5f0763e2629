"""Soak: ``msfin-fast serve`` in its own process, on 127.0.0.1, under a bounded mix of valid, invalid
and oversized requests from many concurrent clients, plus connections that never send a head.

Checks: every 200 decodes and equals the direct Upscaler's result byte for byte; every refusal has
the status its kind calls for; /metrics counts exactly what was sent; the server's RSS after the run
is within ``RSS_GROWTH`` of its RSS after warm-up. The figures are printed (``pytest -s``).
"""

import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from helpers import require_module  # noqa: E402

require_module("starlette")  # the serve extra: a failure where it may not be missing (CI)
require_module("uvicorn")

from msfin_fast import Upscaler  # noqa: E402

from helpers import free_port, png, request, wait_until_serving  # noqa: E402

CLIENTS = 16
ROUNDS = 16         # each round: the whole mix below (16 requests); all rounds shuffled together
RSS_GROWTH = 64 * 2**20
MAX_BODY = 40_000
MAX_PIXELS = 4096
MAX_WORK = 20_000


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _mix(rng):
    """(name, path, body, expected status, expected refusal reason or None)."""
    def image(shape, fmt="PNG"):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format=fmt)
        return buffer.getvalue()

    gif = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gif, format="GIF")
    cases = []
    for shape in [(12, 16, 3), (16, 16, 3), (9, 13, 3), (16, 16), (12, 12, 4)]:
        cases.append(("valid", "/upscale", image(shape), 200, None))
    cases.append(("valid jpeg", "/upscale", image((16, 12, 3), "JPEG"), 200, None))
    cases.append(("valid tiles", "/upscale?tile=8", image((16, 16, 3)), 200, None))
    cases += [
        ("text", "/upscale", b"not a picture at all", 400, "bad_request"),
        ("gif", "/upscale", gif.getvalue(), 400, "bad_request"),
        ("empty", "/upscale", b"", 400, "bad_request"),
        ("truncated", "/upscale", image((16, 16, 3))[:100], 400, "bad_request"),
        ("tile=1", "/upscale?tile=1", image((8, 8, 3)), 400, "bad_request"),
        ("unknown query", "/upscale?scale=3", image((8, 8, 3)), 400, "bad_request"),
        ("too many pixels", "/upscale", image((80, 80, 3)), 400, "too_many_pixels"),
        ("too much work", "/upscale?self_ensemble=1", image((60, 60, 3)), 400, "too_much_work"),
        ("body too large", "/upscale", os.urandom(MAX_BODY + 1), 413, "body_too_large"),
    ]
    return cases


def test_soak(weights_dir, pretrained):
    rng = np.random.default_rng(11)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "msfin_fast", "serve", "--model", "msfin-s-x4", "--device", "cpu",
         "--port", str(port), "--max-pixels", str(MAX_PIXELS), "--max-body-mb", str(MAX_BODY / 2**20),
         "--max-work", str(MAX_WORK / 1e6), "--max-queue", "64", "--max-batch", "4",
         "--header-timeout", "1", "--body-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # The same intra-op thread count as the direct Upscaler here: oneDNN's reductions, and so a
        # rare rounding, depend on it.
        env={**os.environ, "MSFIN_WEIGHTS_DIR": str(weights_dir), "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    try:
        wait_until_serving(proc, port)
        direct = Upscaler(pretrained("msfin-s-x4"), device="cpu")
        warm = [request(port, "/upscale", png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
                for _ in range(8)]
        assert all(status == 200 for status, _, _ in warm)
        rss_warm = _rss(proc.pid)

        jobs = [case for _ in range(ROUNDS) for case in _mix(rng)]
        order = rng.permutation(len(jobs))
        jobs = [jobs[i] for i in order]
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]  # never send a head

        def send(job):
            t0 = time.perf_counter()
            status, headers, body = request(port, job[1], job[2], timeout=60)
            return status, headers, body, time.perf_counter() - t0

        soak_start = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(send, jobs))
        soak_seconds = time.monotonic() - soak_start
        for s in silent:
            assert s.recv(1024).startswith(b"HTTP/1.1 408"), "a silent connection was not cut off"
            s.close()
        metrics = request(port, "/metrics")[2].decode()
        rss_after = _rss(proc.pid)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]

    by_status, reasons, latencies = {}, {}, []
    for (name, path, body, want, reason), (status, headers, reply, seconds) in zip(jobs, answers):
        assert status == want, (name, status, reply[:200])
        by_status[status] = by_status.get(status, 0) + 1
        latencies.append(seconds)
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
        if status == 200:
            got = np.asarray(Image.open(io.BytesIO(reply)))
            expected = np.asarray(direct.upscale(Image.open(io.BytesIO(body))))
            assert np.array_equal(got, expected), f"{name}: the service's image differs from Upscaler's"
        if status == 413:
            assert headers["Connection"] == "close"
    reasons["header_timeout"] = len(silent)

    counted = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line and not line.startswith("#")}
    for status, n in by_status.items():
        assert counted[f'msfin_requests_total{{status="{status}"}}'] == n + (8 if status == 200 else 0)
    for reason, n in reasons.items():
        assert counted[f'msfin_refused_total{{reason="{reason}"}}'] == n, reason
    assert counted["msfin_images_total"] == by_status[200] + 8
    assert sum(v for k, v in counted.items() if k.startswith("msfin_requests_total")) == len(jobs) + 8

    p50, p99 = np.percentile(latencies, [50, 99])
    print(f"\nsoak: {len(jobs)} requests from {CLIENTS} clients in {soak_seconds:.1f} s; by status "
          f"{dict(sorted(by_status.items()))}; refusals {reasons}; latency p50 {p50 * 1e3:.0f} ms, "
          f"p99 {p99 * 1e3:.0f} ms; server RSS {rss_warm / 2**20:.0f} MiB after warm-up, "
          f"{rss_after / 2**20:.0f} MiB after ({(rss_after - rss_warm) / 2**20:+.1f} MiB)")
    assert rss_after - rss_warm <= RSS_GROWTH, out
    assert "Traceback" not in out, out
