"""A replicated service on Ray Serve (``msfin-fast serve --ray``, :func:`service`).

A Ray Serve deployment whose replicas each hold one ServingUpscaler, so same-shape requests still
batch. Each replica serves the Starlette app of ``msfin-fast serve`` (``serve.ingress``), so both give
the same answers byte for byte. Deployment handles can also call :meth:`MSFINReplica.upscale`
without HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from ..errors import InvalidInputError, MSFINError
from .common import backend_for, check_count, check_engine, device_for, forwarded_env, import_ray

@dataclass(frozen=True)
class ServiceOptions:
    """A replicated service: the ServingUpscaler of each replica, how many replicas, what each gets.

    device: auto (a replica's GPU when it has one), cpu or cuda. backend: None as the CLI.
    max_ongoing: requests Ray routes to one replica at once (None: max_queue + max_batch, so that
    the replica's own queue, not Ray's, is what answers 503 and same-shape requests can batch).
    """

    model: str = "msfin-x4"
    dtype: str = "fp32"
    backend: str | None = None
    device: str = "auto"
    weights: str | None = None
    replicas: int = 1
    gpus_per_replica: float = 0
    cpus_per_replica: float = 1
    max_batch: int = 8
    batch_window: float = 0.002
    max_queue: int = 64
    graph_cache: int = 8
    max_ongoing: int | None = None

    def __post_init__(self) -> None:
        check_engine(self.model, self.dtype, self.backend)
        check_count("replicas", self.replicas, 1, integer=True)
        check_count("gpus_per_replica", self.gpus_per_replica, 0, integer=False)
        check_count("cpus_per_replica", self.cpus_per_replica, 0, integer=False)
        device_for(self.device, self.gpus_per_replica, "replica")
        if self.max_ongoing is not None:
            check_count("max_ongoing", self.max_ongoing, 1, integer=True)

    def upscaler_kwargs(self) -> dict:
        device = device_for(self.device, self.gpus_per_replica, "replica")
        return dict(device=device, dtype=self.dtype, weights=self.weights,
                    max_batch=self.max_batch, batch_window=self.batch_window, max_queue=self.max_queue,
                    graph_cache=self.graph_cache, backend=backend_for(self.backend, device, "plain"))


class MSFINReplica:
    """One replica: a ServingUpscaler and the ``msfin-fast serve`` app in front of it."""

    def __init__(self, options: ServiceOptions, limits=None):
        from ..server import Limits
        from ..serving import ServingUpscaler

        self.options, self.limits = options, limits or Limits()
        self.upscaler = ServingUpscaler(options.model, **options.upscaler_kwargs())

    def __serve_build_asgi_app__(self):
        from ..server import create_app

        return create_app(self.upscaler, self.limits)

    async def upscale(self, body: bytes, *, tile: int | None = None, tile_mode: str = "plain",
                      self_ensemble: bool = False) -> bytes:
        """Image file bytes → the ×4 PNG's bytes, as ``POST /upscale`` answers them, for deployment
        handles (no HTTP). A refusal raises InvalidInputError with the message the route gives."""
        from ..server import decode_upload, encode_png

        options = self.upscaler.options(tile=tile, tile_mode=tile_mode, self_ensemble=self_ensemble)
        loop = asyncio.get_running_loop()
        picture = await loop.run_in_executor(None, decode_upload, body, self.limits, options)
        rgb = await asyncio.wrap_future(self.upscaler.submit(picture.rgb, options))
        return await loop.run_in_executor(None, encode_png, picture, rgb, self.upscaler.scale)

    def check_health(self) -> None:
        """Serve's health check: the replica is unhealthy once its model thread has stopped."""
        if not self.upscaler.alive:
            raise MSFINError("the replica's model thread has stopped")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.upscaler.close()


def service(options: ServiceOptions | None = None, limits=None):
    """The Ray Serve application: ``serve.run(service(ServiceOptions(replicas=2)))``."""
    import_ray()
    from ray import serve

    options = options or ServiceOptions()
    max_ongoing = options.max_ongoing or options.max_queue + options.max_batch
    deployment = serve.deployment(serve.ingress()(MSFINReplica), name="msfin")
    return deployment.options(
        num_replicas=options.replicas,
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica,
                           "runtime_env": {"env_vars": forwarded_env()}},
    ).bind(options, limits)


def build_app(args: dict):
    """The application for Ray's own tools: ``serve run msfin_fast.cluster:build_app model=msfin-s-x4
    replicas=2``, or ``import_path: msfin_fast.cluster:build_app`` with ``args`` in a Serve config file
    (``serve deploy``). ``args`` are ServiceOptions fields, as strings or their own types; the
    request limits are the defaults of ``msfin-fast serve``."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(ServiceOptions)}
    unknown = set(args) - set(fields)
    if unknown:
        raise InvalidInputError(f"unknown argument(s) {', '.join(sorted(unknown))}; use {', '.join(fields)}")
    typed = {}
    for name, value in args.items():
        if isinstance(value, str) and name not in ("model", "dtype", "backend", "device", "weights"):
            try:
                value = float(value) if name in ("gpus_per_replica", "cpus_per_replica", "batch_window") else int(value)
            except ValueError:
                raise InvalidInputError(f"{name}={value!r} must be a number") from None
        typed[name] = value
    return service(ServiceOptions(**typed))


def run_service(options: ServiceOptions | None = None, limits=None, *, host: str = "127.0.0.1",
                port: int = 8000, blocking: bool = True):
    """Start Serve's HTTP proxy on host:port and deploy :func:`service` there; returns its handle
    (when ``blocking`` is False; else it serves until interrupted)."""
    import_ray()
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    return serve.run(service(options, limits), name="msfin", route_prefix="/", blocking=blocking)
