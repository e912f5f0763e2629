"""``msfin-fast serve``: an HTTP endpoint in front of a :class:`~msfin_fast.upscaler.ServingUpscaler`.

Starlette (routing, streaming request bodies) on uvicorn's h11 protocol, extended with a deadline
for request heads and a connection cap (:func:`make_server`). The event loop only reads bodies and
awaits futures; decoding and PNG encoding run in a thread pool, and the model runs in the
ServingUpscaler's own worker thread, which batches requests of the same shape.

Endpoints:
  POST /upscale   the image (PNG, JPEG, BMP, WebP or TIFF; no other decoder is run) → the ×4 image
                  as PNG, equal pixel for pixel to the CLI's file (the service encodes its PNGs
                  with zlib level 1 for speed, the CLI with Pillow's default 6: the same pixels in
                  other bytes). Options: ``self_ensemble=1``, ``tile=N`` (N ≥ 8), ``tile_mode=exact``.
                  The body is either
                  - the raw image file (any Content-Type but multipart/form-data), options in the
                    query string; or
                  - multipart/form-data (``curl -F image=@photo.png``; see :func:`parse_form`): one
                    image part, which is the field named ``image`` (with or without a filename) or
                    else the one file part (a part with a filename) whatever its name; every other
                    field is an option, by the query's names and values. An option given both as a
                    field and in the query must have the same value in both, else 400 naming it.
                    No image part or more than one, a repeated or unknown field, or a malformed or
                    truncated body → 400 saying which.
                  Either body is read under the same size limit and deadline.
  GET  /healthz   JSON: status, model, device.
  GET  /metrics   Prometheus text (prometheus-client): requests by status, refusals by reason,
                  the latency histogram, batch sizes, queue depth.

Every refusal is answered by this module and counted in /metrics (see :class:`Limits`):
  400  not an image, a format not listed, too many pixels, too much work, a bad query or form
  408  the request head or body did not arrive within its deadline
  413  a body over the size limit
  499  (metrics only) the client went away; its queued work is cancelled
  500  the model failed, or produced NaN/Inf
  503  the queue is full, every body slot is taken, or too many connections (with Retry-After)
A response to a request whose body was not read to its end carries ``Connection: close``, and the
connection is closed after it.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass

import numpy as np

from .errors import ImageReadError, InvalidInputError, MSFINError, QueueFullError
from .images import decode_image, encode_image
from .pictures import Picture, upscaled
from .run import MIN_TILE, TILE_MODES, RunOptions, estimated_work
from .serving import ServingUpscaler

_NEEDS_EXTRA = "serving needs starlette, uvicorn and prometheus-client: pip install 'msfin_fast[serve]'"
REFUSAL_REASONS = ("header_timeout", "body_timeout", "too_many_connections", "no_body_slot", "queue_full",
                   "body_too_large", "too_many_pixels", "too_much_work", "bad_request", "client_gone")


@dataclass(frozen=True)
class Limits:
    """What one request may cost the service, and how long the service waits for it.

    max_body:        bytes of one upload (413 beyond it).
    max_pixels:      LR pixels (w·h) of one image (400 beyond it; checked from the header, before
                     the pixels are decoded).
    max_work:        LR pixels of whole-image work one request may cost, counting self-ensemble
                     (×8) and tiles (their padding and a fixed cost per tile; see
                     ``upscaler.estimated_work``). The default admits the largest image with
                     self-ensemble, or with plain tiles of 64 and more without it (400 beyond it).
    header_timeout:  seconds from a connection's start (or its previous response) to a complete
                     request head (408 and close beyond it).
    body_timeout:    seconds to receive a whole body once its head is in (408 and close).
    max_bodies:      bodies being received or decoded at once: memory held for uploads stays under
                     max_bodies × max_body. A request that finds no slot within ``slot_wait``
                     seconds gets 503.
    max_connections: open connections; beyond it a request is answered 503 and its connection closed.
    """

    max_body: int = 20 * 2**20
    max_pixels: int = 2_000_000
    max_work: float = 16_000_000
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_bodies: int = 16
    slot_wait: float = 1.0
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name in ("max_body", "max_pixels", "max_work", "header_timeout", "body_timeout", "max_bodies",
                     "max_connections"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"Limits.{name} (serve --{name.replace('_', '-')}) must be > 0, "
                                        f"got {getattr(self, name)!r}")
        if not self.slot_wait >= 0:
            raise InvalidInputError(f"Limits.slot_wait must be >= 0, got {self.slot_wait!r}")


class _Refused(InvalidInputError):
    """A request the service refuses: its status, message and the reason counted in /metrics."""

    def __init__(self, status: int, message: str, reason: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.reason, self.close = status, message, reason, close


def _client_gone() -> _Refused:
    """Recorded as status 499 (nginx's "client closed request"); the response goes nowhere."""
    return _Refused(499, "the client went away", "client_gone")


# Upscale latency buckets (seconds): from a small image on a GPU to a large one on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (``prometheus_client``).

    Recorded as they happen: requests by status, refusals by reason, and the upscale latency as a
    histogram (buckets :data:`LATENCY_BUCKETS`), so that replicas' latencies add up in PromQL
    (``histogram_quantile`` over ``sum by (le)``). Read from the upscaler at each scrape: images,
    cancellations, CUDA-graph hits, queue depth, and batch sizes as a histogram.
    """

    def __init__(self, upscaler: ServingUpscaler | None = None):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("msfin_requests", "Upscale requests answered, by HTTP status (499: the client left).",
                                ["status"], registry=self.registry)
        self.refused = Counter(
            "msfin_refused", "Requests and connections refused, by reason (header_timeout and too_many_connections "
            "are answered before /upscale is reached, so they are not in requests_total).",
            ["reason"], registry=self.registry)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)  # every reason is shown, from 0
        self.latency = Histogram("msfin_request_latency_seconds", "Upscale latency, receipt to answer.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upscaler = upscaler  # whose counters are read at each scrape (create_app sets it)
        self.registry.register(self)

    def record(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)

    def refuse(self, reason: str) -> None:
        self.refused.labels(reason=reason).inc()

    def collect(self):
        """prometheus_client's collector protocol: the upscaler's own counters, read at scrape time."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        upscaler = self.upscaler
        if upscaler is None:
            return
        stats = upscaler.snapshot()
        bounds = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < upscaler.max_batch} | {upscaler.max_batch})
        sizes = stats.batch_sizes
        buckets = [(str(b), sum(n for size, n in sizes.items() if size <= b)) for b in bounds]
        yield HistogramMetricFamily("msfin_batch_size", "Images per model run.",
                                    buckets=buckets + [("+Inf", sum(sizes.values()))],
                                    sum_value=sum(size * n for size, n in sizes.items()))
        yield GaugeMetricFamily("msfin_queue_depth", "Requests waiting for the model.", value=upscaler.queue_depth)
        yield CounterMetricFamily("msfin_images", "Images upscaled.", value=stats.images)
        yield CounterMetricFamily("msfin_cancelled", "Queued requests dropped before they ran (their client left).",
                                  value=stats.cancelled)
        yield CounterMetricFamily("msfin_cuda_graph_hits", "Batches replayed from a cached CUDA graph.",
                                  value=stats.graph_hits)

    def describe(self):
        return []  # the upscaler's metrics exist only once one is attached: nothing to check at registration

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def decode_upload(body: bytes, limits: Limits, options: RunOptions | None = None,
                  label: str = "the body") -> Picture:
    """Bytes of an uploaded image → Picture, refusing non-images, formats other than PNG, JPEG, BMP,
    WebP and TIFF, and images over ``limits.max_pixels`` or (with ``options``) ``limits.max_work``,
    both checked from the header before any pixel is decoded. ``label`` names the bytes in errors."""
    if not body:
        if label != "the body":
            raise _Refused(400, f"{label} is empty; it must hold the image file's bytes", "bad_request")
        raise _Refused(400, "empty body; POST the image file's bytes as the request body", "bad_request")

    def check_size(w: int, h: int) -> None:
        if w * h > limits.max_pixels:
            raise _Refused(400, f"image is {w}×{h} = {w * h} pixels; this server takes at most "
                                f"{limits.max_pixels} pixels per image (tile it client-side or raise --max-pixels)",
                           "too_many_pixels")
        if options is not None:
            work = estimated_work(h, w, options)
            if work > limits.max_work:
                parts = [f"{w}×{h} px"]
                if options.self_ensemble:
                    parts.append("self_ensemble (×8)")
                if options.tile is not None:
                    parts.append(f"{options.tile_mode} tiles of {options.tile}")
                raise _Refused(400, f"too much work: {' with '.join(parts)} costs {work / 1e6:.1f} M pixel-runs; "
                                    f"this server takes at most {limits.max_work / 1e6:.1f} M per request "
                                    "(send a smaller image, larger tiles, or no self_ensemble)", "too_much_work")

    try:
        return decode_image(io.BytesIO(body), label, check_size)
    except ImageReadError as exc:
        # Pillow's own decompression-bomb limit (far above max_pixels) is the one read error that is
        # about size.
        reason = "too_many_pixels" if "too many pixels" in str(exc) else "bad_request"
        raise _Refused(400, str(exc), reason) from None


OPTION_NAMES = ("self_ensemble", "tile", "tile_mode")
IMAGE_FIELD = "image"
# A form holds the image and at most the three options; more parts than this is not a request for
# this service, and each part's head is parsed in Python, so their number is bounded before that.
MAX_FORM_PARTS = 8
MAX_PART_HEAD = 8192  # bytes of one part's headers


def is_form(content_type: str | None) -> bool:
    """Whether a request's Content-Type is multipart/form-data (its body is then a form)."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "multipart/form-data"


def _bad_form(message: str) -> _Refused:
    return _Refused(400, f"multipart/form-data body: {message}", "bad_request")


def _boundary(content_type: str) -> bytes:
    from email.message import Message

    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_boundary()
    if not boundary:
        raise _bad_form("the Content-Type has no boundary parameter "
                        "(let the client write the header: curl -F image=@photo.png)")
    if not (boundary.isascii() and 1 <= len(boundary) <= 70):
        raise _bad_form(f"the boundary {boundary!r} must be 1 to 70 ASCII characters")
    return boundary.encode("ascii")


def parse_form(body: bytes, content_type: str) -> tuple[bytes, str, dict[str, str]]:
    """A multipart/form-data body (RFC 7578) → (the image's bytes, a label naming its part for
    errors, the other fields as text).

    The image part is the field named ``image`` (with or without a filename), else the one file
    part (a part with a ``filename``) whatever its name. Every other part is a text field (UTF-8).
    Parts are delimited by CRLF and ``--boundary`` as RFC 2046 says; the body must end with the
    closing delimiter (else it is truncated). Nothing is decoded from a part (a
    Content-Transfer-Encoding other than 7bit, 8bit or binary is refused) and nested multiparts are
    not taken. Refusals are 400s (``bad_request``) naming the problem: no boundary, a body that does
    not start with its boundary or lacks its closing one, more than :data:`MAX_FORM_PARTS` parts, a
    part without ``Content-Disposition: form-data; name=…``, no image part or more than one, a field
    given twice, a field that is not UTF-8. Unknown field names are for the caller to refuse.
    """
    from email import policy
    from email.parser import BytesHeaderParser

    delimiter = b"--" + _boundary(content_type)
    separator = b"\r\n" + delimiter
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble before the first delimiter is allowed, and ignored
        first = body.find(separator)
        if first < 0:
            raise _bad_form("the body does not contain the boundary its Content-Type names")
        pos = first + len(separator)
    spans = []
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        line_end = body.find(b"\r\n", pos, pos + 256)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise _bad_form("malformed or truncated: a boundary is followed by neither a line break nor "
                            "'--' (the closing boundary is cut off, or the boundary occurs inside a part)")
        end = body.find(separator, line_end + 2)
        if end < 0:
            raise _bad_form("truncated: its closing boundary is missing")
        if len(spans) == MAX_FORM_PARTS:
            raise _bad_form(f"more than {MAX_FORM_PARTS} parts; send one image and its options")
        spans.append((line_end + 2, end))
        pos = end + len(separator)
    if not spans:
        raise _bad_form(f"no parts; send the image as a file field named {IMAGE_FIELD!r}")

    images, fields = [], {}
    for start, end in spans:
        if body.startswith(b"\r\n", start):  # a part without headers
            head_end = start
        else:
            head_end = body.find(b"\r\n\r\n", start, min(end, start + MAX_PART_HEAD))
            if head_end < 0:
                raise _bad_form(f"a part's headers do not end with a blank line within {MAX_PART_HEAD} bytes")
        head = BytesHeaderParser(policy=policy.HTTP).parsebytes(body[start:head_end] + b"\r\n\r\n")
        name = head.get_param("name", header="content-disposition")
        if head.get_content_disposition() != "form-data" or not isinstance(name, str):
            raise _bad_form("each part needs a 'Content-Disposition: form-data; name=\"…\"' header")
        if head.get_content_maintype() == "multipart":
            raise _bad_form(f"the part {name!r} is itself multipart; send one file per field")
        encoding = str(head.get("content-transfer-encoding", "binary")).strip().lower()
        if encoding not in ("binary", "8bit", "7bit"):
            raise _bad_form(f"the part {name!r} has Content-Transfer-Encoding {encoding!r}; send it as binary")
        content = (start, end) if head_end == start else (head_end + 4, end)
        if name == IMAGE_FIELD or head.get_filename() is not None:
            images.append((name, content))
        elif name in fields:
            raise _bad_form(f"the field {name!r} is given twice")
        else:
            try:
                fields[name] = body[content[0]:content[1]].decode("utf-8")
            except UnicodeDecodeError:
                raise _bad_form(f"the field {name!r} is not UTF-8 text") from None
    if not images:
        raise _bad_form(f"no image: send it as a file field named {IMAGE_FIELD!r} (curl -F image=@photo.png)"
                        + (f"; the fields were {', '.join(map(repr, fields))}" if fields else ""))
    if len(images) > 1:
        raise _bad_form(f"{len(images)} image parts ({', '.join(repr(name) for name, _ in images)}); "
                        "send exactly one image per request")
    name, (start, end) = images[0]
    return body[start:end], f"the form's file field {name!r}", fields


def request_options(query, fields: dict[str, str] | None) -> dict[str, str]:
    """The options of a request: its query parameters, and (for a form) its text fields. A field
    that is not an option, or one given in both with different values, is refused (400)."""
    options = dict(query)
    if fields:
        unknown = set(fields) - set(OPTION_NAMES)
        if unknown:
            raise _Refused(400, f"unknown form field(s) {', '.join(map(repr, sorted(unknown)))}; use "
                                f"{IMAGE_FIELD} (the image) and {', '.join(OPTION_NAMES)}", "bad_request")
        for name, value in fields.items():
            if name in options and options[name] != value:
                raise _Refused(400, f"{name} is {value!r} in the form but {options[name]!r} in the query; "
                                    "give it once", "bad_request")
            options[name] = value
    return options


def encode_png(picture: Picture, rgb: np.ndarray, scale: int) -> bytes:
    """The result as PNG bytes, in the upload's form: grey, alpha, and 16 bits stay.

    zlib level 1, for latency: the CLI's files (Pillow's default, 6) hold the same pixels in other
    bytes, and level 6 costs about 5× the time (a 1024² output: 0.46 s against 0.08 s).
    """
    return encode_image(upscaled(picture, rgb, scale), "PNG", "the result", compress_level=1)


def _flag(value: str, name: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise _Refused(400, f"{name}={value!r} must be 0/1 or true/false", "bad_request")


def _text(status: int, message: str, close: bool = False, retry: bool = False):
    from starlette.responses import PlainTextResponse

    headers = {}
    if retry:
        headers["Retry-After"] = "1"
    if close:
        headers["Connection"] = "close"
    return PlainTextResponse(f"error: {message}\n", status_code=status, headers=headers or None)


def create_app(upscaler: ServingUpscaler, limits: Limits = Limits(), metrics: Metrics | None = None):
    """The Starlette application serving ``upscaler``."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route
        import prometheus_client  # noqa: F401  (Metrics)
    except ImportError:
        raise MSFINError(_NEEDS_EXTRA) from None

    metrics = metrics or Metrics()
    metrics.upscaler = upscaler
    body_slots = asyncio.Semaphore(limits.max_bodies)

    def options_from(query) -> RunOptions:
        unknown = set(query) - set(OPTION_NAMES)
        if unknown:
            raise _Refused(400, f"unknown query parameter(s) {', '.join(sorted(unknown))}; "
                                "use self_ensemble, tile, tile_mode", "bad_request")
        tile = query.get("tile")
        if tile is not None:
            # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
            if not (tile.isascii() and tile.isdigit()) or len(tile) > 9 or int(tile) < MIN_TILE:
                raise _Refused(400, f"tile={tile!r} must be an integer of at least {MIN_TILE} (LR pixels)",
                               "bad_request")
            tile = int(tile)
        mode = query.get("tile_mode", "plain")
        if mode not in TILE_MODES:
            raise _Refused(400, f"tile_mode={mode!r} must be one of {', '.join(TILE_MODES)}", "bad_request")
        if mode == "exact" and tile is None:
            raise _Refused(400, "tile_mode=exact needs tile=N", "bad_request")
        try:
            return upscaler.options(tile=tile, tile_mode=mode,
                                    self_ensemble=_flag(query.get("self_ensemble", "0"), "self_ensemble"))
        except InvalidInputError as exc:
            raise _Refused(400, str(exc), "bad_request") from None

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limits.max_body:
            raise _Refused(413, f"body is {declared} bytes; the limit is {limits.max_body} bytes",
                           "body_too_large", close=True)
        body = bytearray()

        async def receive_all():
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limits.max_body:
                    raise _Refused(413, f"body exceeds the limit of {limits.max_body} bytes",
                                   "body_too_large", close=True)

        try:
            await asyncio.wait_for(receive_all(), limits.body_timeout)
        except ClientDisconnect:
            raise _client_gone() from None
        except asyncio.TimeoutError:
            raise _Refused(408, f"the body did not arrive within {limits.body_timeout:g} s "
                                f"({len(body)} bytes received)", "body_timeout", close=True) from None
        return bytes(body)

    async def until_disconnected(request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def upscale(request):
        start = time.perf_counter()
        status, body_read = 500, False
        try:
            if body_slots.locked():
                try:
                    await asyncio.wait_for(body_slots.acquire(), limits.slot_wait)
                except asyncio.TimeoutError:
                    raise _Refused(503, f"{limits.max_bodies} uploads are already being received; retry later",
                                   "no_body_slot", close=True) from None
            else:
                await body_slots.acquire()
            try:
                body = await read_body(request)
                body_read = True
                label, fields = "the body", None
                if is_form(request.headers.get("content-type")):
                    body, label, fields = await run_in_threadpool(parse_form, body, request.headers["content-type"])
                options = options_from(request_options(request.query_params, fields))
                picture = await run_in_threadpool(decode_upload, body, limits, options, label)
                del body
            finally:
                body_slots.release()
            try:
                future = upscaler.submit(picture.rgb, options)
            except QueueFullError as exc:
                raise _Refused(503, str(exc), "queue_full") from None
            result = asyncio.ensure_future(asyncio.wrap_future(future))
            gone = asyncio.ensure_future(until_disconnected(request))
            try:
                await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not result.done():
                future.cancel()  # dropped if it has not started; its result is discarded if it has
                result.cancel()
                raise _client_gone()
            rgb = result.result()
            png = await run_in_threadpool(encode_png, picture, rgb, upscaler.scale)
            status = 200
            return Response(png, media_type="image/png")
        except _Refused as exc:
            status = exc.status
            metrics.refuse(exc.reason)
            return _text(exc.status, exc.message, close=exc.close or not body_read, retry=exc.status == 503)
        except InvalidInputError as exc:
            status = 400
            metrics.refuse("bad_request")
            return _text(400, str(exc), close=not body_read)
        except MSFINError as exc:
            return _text(500, str(exc))
        except Exception as exc:  # a failure inside the model: answer it, keep serving
            return _text(500, f"upscaling failed ({type(exc).__name__}: {exc})")
        finally:
            metrics.record(status, time.perf_counter() - start)

    async def healthz(request):
        return JSONResponse({"status": "ok", "model": upscaler.name, "device": str(upscaler.device),
                             "scale": upscaler.scale, "queue_depth": upscaler.queue_depth})

    async def metrics_endpoint(request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[
        Route("/upscale", upscale, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ])
    app.state.metrics = metrics
    return app


def _over_capacity_app(metrics: Metrics, limit: int):
    """The ASGI app a connection beyond ``max_connections`` gets: 503, Retry-After, close."""
    body = f"error: {limit} connections are open; retry later\n".encode()

    async def app(scope, receive, send):
        metrics.refuse("too_many_connections")
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1"),
                                (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def _protocol(limits: Limits, metrics: Metrics):
    """uvicorn's h11 protocol with a deadline for every request head and a connection cap.

    uvicorn times out idle keep-alive connections, but not a head that arrives slowly (one header
    line a second kept 90 connections open for as long as the client liked) nor a connection that
    sends nothing at all. Here each connection gets ``header_timeout`` seconds, from its start and
    again from the end of each response, to deliver a complete head; else it is answered 408 and
    closed. A connection opened while ``max_connections`` are open gets the 503 app instead of ours.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    text = f"error: the request head did not arrive within {limits.header_timeout:g} s\n".encode()
    timeout_reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: " + str(len(text)).encode() + b"\r\n\r\n" + text)
    over_capacity = _over_capacity_app(metrics, limits.max_connections)

    class DeadlineH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self.app = over_capacity
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a head is in (or the connection is done)
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # before super(), which may parse a pipelined head and disarm
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return
            metrics.refuse("header_timeout")
            self.transport.write(timeout_reply)
            self.transport.close()

    return DeadlineH11Protocol


def make_server(upscaler: ServingUpscaler, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits = Limits(), log_level: str = "warning"):
    """A uvicorn server for ``upscaler`` with every limit of :class:`Limits` in force."""
    try:
        import uvicorn
    except ImportError:
        raise MSFINError(_NEEDS_EXTRA) from None
    metrics = Metrics()
    config = uvicorn.Config(
        create_app(upscaler, limits, metrics), host=host, port=port, log_level=log_level,
        http=_protocol(limits, metrics), access_log=False,
        # The app answers every refusal itself (uvicorn's own 503 has no Retry-After and is not counted).
        limit_concurrency=None,
    )
    return uvicorn.Server(config)
