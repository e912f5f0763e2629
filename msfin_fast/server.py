"""``msfin-fast serve``: an HTTP endpoint in front of a :class:`~msfin_fast.upscaler.ServingUpscaler`.

Starlette (routing, streaming request bodies) on uvicorn (the ASGI server, with a connection
limit answered by 503). The event loop only reads bodies and awaits futures; decoding and PNG
encoding run in a thread pool, and the model runs in the ServingUpscaler's own worker thread,
which batches requests of the same shape.

Endpoints:
  POST /upscale   raw image bytes as the body (any Content-Type; PNG, JPEG, BMP, WebP, TIFF) →
                  the ×4 image as PNG. Query: ``self_ensemble=1``, ``tile=N``, ``tile_mode=exact``.
  GET  /healthz   JSON: status, model, device.
  GET  /metrics   Prometheus text: requests by status, latency quantiles, batch sizes, queue depth.
Refusals: a body over the size limit → 413; not an image, too many pixels, bad query → 400;
queue full or too many connections → 503 (with Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import io
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInputError, MSFINError, QueueFullError
from .images import Picture, from_pil, to_pil
from .upscaler import TILE_MODES, RunOptions, ServingUpscaler

LATENCY_WINDOW = 1024
_NEEDS_EXTRA = "serving needs starlette and uvicorn: pip install 'msfin_fast[serve]'"


@dataclass(frozen=True)
class Limits:
    """max_body: bytes of one upload; max_pixels: LR pixels (w·h) of one image."""

    max_body: int = 20 * 2**20
    max_pixels: int = 2_000_000


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Metrics:
    """Request counts by status and latencies of the last ``LATENCY_WINDOW`` upscale requests."""

    def __init__(self):
        self._lock = threading.Lock()
        self.by_status: collections.Counter = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.latency_sum = 0.0

    def record(self, status: int, seconds: float) -> None:
        with self._lock:
            self.by_status[status] += 1
            self.latencies.append(seconds)
            self.latency_sum += seconds

    def quantiles(self, qs=(0.5, 0.9, 0.99)) -> dict[float, float]:
        with self._lock:
            window = np.array(self.latencies, dtype=np.float64)
        if not window.size:
            return {q: float("nan") for q in qs}
        return {q: float(np.quantile(window, q)) for q in qs}

    def render(self, upscaler: ServingUpscaler) -> str:
        stats = upscaler.snapshot()
        with self._lock:
            by_status, total, latency_sum = dict(self.by_status), sum(self.by_status.values()), self.latency_sum
        lines = [
            "# HELP msfin_requests_total Upscale requests answered, by HTTP status.",
            "# TYPE msfin_requests_total counter",
            *(f'msfin_requests_total{{status="{code}"}} {n}' for code, n in sorted(by_status.items())),
            f"# HELP msfin_request_latency_seconds Upscale latency; quantiles over the last {LATENCY_WINDOW}.",
            "# TYPE msfin_request_latency_seconds summary",
            *(f'msfin_request_latency_seconds{{quantile="{q}"}} {v:.6f}' for q, v in self.quantiles().items()),
            f"msfin_request_latency_seconds_sum {latency_sum:.6f}",
            f"msfin_request_latency_seconds_count {total}",
            "# HELP msfin_batch_size Images per model run.",
            "# TYPE msfin_batch_size histogram",
        ]
        bounds = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < upscaler.max_batch} | {upscaler.max_batch})
        batches = stats.batch_sizes
        for bound in bounds:
            lines.append(f'msfin_batch_size_bucket{{le="{bound}"}} '
                         f"{sum(n for size, n in batches.items() if size <= bound)}")
        lines += [
            f'msfin_batch_size_bucket{{le="+Inf"}} {sum(batches.values())}',
            f"msfin_batch_size_sum {sum(size * n for size, n in batches.items())}",
            f"msfin_batch_size_count {sum(batches.values())}",
            "# HELP msfin_queue_depth Requests waiting for the model.",
            "# TYPE msfin_queue_depth gauge",
            f"msfin_queue_depth {upscaler.queue_depth}",
            "# HELP msfin_images_total Images upscaled.",
            "# TYPE msfin_images_total counter",
            f"msfin_images_total {stats.images}",
            "# HELP msfin_cuda_graph_hits_total Batches replayed from a cached CUDA graph.",
            "# TYPE msfin_cuda_graph_hits_total counter",
            f"msfin_cuda_graph_hits_total {stats.graph_hits}",
        ]
        return "\n".join(lines) + "\n"


def decode_upload(body: bytes, max_pixels: int) -> Picture:
    """Bytes of an uploaded image → Picture, refusing non-images and images over ``max_pixels``."""
    if not body:
        raise _Refused(400, "empty body; POST the image file's bytes as the request body")
    try:
        with Image.open(io.BytesIO(body)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise _Refused(400, f"image is {w}×{h} = {w * h} pixels; this server takes at most "
                                    f"{max_pixels} pixels per image (tile it client-side or raise --max-pixels)")
            img.load()
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise _Refused(400, "the body is not an image (or a format Pillow cannot read); "
                            "send PNG, JPEG, BMP, WebP or TIFF bytes") from None
    except Image.DecompressionBombError:
        raise _Refused(400, f"image has too many pixels; this server takes at most {max_pixels}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _Refused(400, f"cannot decode the image ({exc})") from None
    return from_pil(img)


def encode_png(picture: Picture, rgb: np.ndarray, scale: int) -> bytes:
    alpha = None
    if picture.alpha is not None:
        a = torch.from_numpy(picture.alpha).float()[None, None]
        a = F.interpolate(a, scale_factor=scale, mode="bicubic", align_corners=False)
        alpha = a[0, 0].clamp_(0, 255).round_().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    to_pil(Picture(rgb, alpha, picture.grey)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _flag(value: str, name: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise _Refused(400, f"query parameter {name}={value!r} must be 0/1 or true/false")


def create_app(upscaler: ServingUpscaler, limits: Limits = Limits()):
    """The Starlette application serving ``upscaler``."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route
    except ImportError:
        raise MSFINError(_NEEDS_EXTRA) from None

    metrics = Metrics()

    def options_from(query) -> RunOptions:
        unknown = set(query) - {"self_ensemble", "tile", "tile_mode"}
        if unknown:
            raise _Refused(400, f"unknown query parameter(s) {', '.join(sorted(unknown))}; "
                                "use self_ensemble, tile, tile_mode")
        tile = query.get("tile")
        if tile is not None:
            if not tile.isdigit() or int(tile) < 1:
                raise _Refused(400, f"tile={tile!r} must be a positive integer (LR pixels)")
            tile = int(tile)
        mode = query.get("tile_mode", "plain")
        if mode not in TILE_MODES:
            raise _Refused(400, f"tile_mode={mode!r} must be one of {', '.join(TILE_MODES)}")
        if mode == "exact" and tile is None:
            raise _Refused(400, "tile_mode=exact needs tile=N")
        return upscaler.options(tile=tile, tile_mode=mode,
                                self_ensemble=_flag(query.get("self_ensemble", "0"), "self_ensemble"))

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
            raise _Refused(413, f"body is {declared} bytes; the limit is {limits.max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body:
                raise _Refused(413, f"body exceeds the limit of {limits.max_body} bytes")
        return bytes(body)

    async def upscale(request):
        start = time.perf_counter()
        status = 500
        try:
            options = options_from(request.query_params)
            body = await read_body(request)
            picture = await run_in_threadpool(decode_upload, body, limits.max_pixels)
            try:
                future = upscaler.submit(picture.rgb, options)
            except QueueFullError as exc:
                raise _Refused(503, str(exc)) from None
            rgb = await asyncio.wrap_future(future)
            png = await run_in_threadpool(encode_png, picture, rgb, upscaler.scale)
            status = 200
            return Response(png, media_type="image/png")
        except _Refused as exc:
            status = exc.status
            headers = {"Retry-After": "1"} if exc.status == 503 else None
            return PlainTextResponse(f"error: {exc.message}\n", status_code=exc.status, headers=headers)
        except InvalidInputError as exc:
            status = 400
            return PlainTextResponse(f"error: {exc}\n", status_code=400)
        except MSFINError as exc:
            return PlainTextResponse(f"error: {exc}\n", status_code=500)
        except Exception as exc:  # a failure inside the model: answer it, keep serving
            return PlainTextResponse(f"error: upscaling failed ({type(exc).__name__}: {exc})\n",
                                     status_code=500)
        finally:
            metrics.record(status, time.perf_counter() - start)

    async def healthz(request):
        return JSONResponse({"status": "ok", "model": upscaler.name, "device": str(upscaler.device),
                             "scale": upscaler.scale, "queue_depth": upscaler.queue_depth})

    async def metrics_endpoint(request):
        return PlainTextResponse(metrics.render(upscaler),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app = Starlette(routes=[
        Route("/upscale", upscale, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ])
    app.state.metrics = metrics
    return app


def make_server(upscaler: ServingUpscaler, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits = Limits(), log_level: str = "warning"):
    """A uvicorn server for ``upscaler``; connections beyond the queue plus a batch get 503."""
    try:
        import uvicorn
    except ImportError:
        raise MSFINError(_NEEDS_EXTRA) from None
    config = uvicorn.Config(
        create_app(upscaler, limits), host=host, port=port, log_level=log_level,
        limit_concurrency=upscaler.max_queue + 2 * upscaler.max_batch + 4, access_log=False,
    )
    return uvicorn.Server(config)
