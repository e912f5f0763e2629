"""Scale-out on Ray: batch upscaling of image folders with Ray Data, a replicated service with Ray Serve.

Needs the ``scale`` extra (``pip install 'msfin_fast[scale]'``); nothing here imports Ray until it
is used.

**Batch** (:func:`upscale_folder`, ``msfin-fast upscale --ray``). The driver lists the input folder
(its whole tree with ``recursive``), leaves out every image whose output was already made from the
same input with the same settings (the output folder's manifest, :mod:`msfin_fast.resume`), so a
killed job resumes where it stopped and a changed model, option or input redoes what it changes,
and hands the rest to Ray Data as paths (``from_items``): the object store carries names, never
decoded pixels (a ×4 output is 16× its input). An actor pool of :class:`UpscaleWorker`
(``map_batches``) builds the model once per worker. Each worker reads and decodes its files with
this package's own reader, which handles alpha, grey, 16-bit grey and EXIF orientation, and gives
the CLI's errors: a file that is gone, unreadable or over ``max_pixels`` is that file's error row.
It runs a batch's images grouped by shape, through a :class:`~msfin_fast.serving.ServingUpscaler`,
so a GPU worker gets batches, pinned copies and CUDA graphs, and a CPU worker gives the API's bytes.
It writes each output atomically to the mirrored path under the output root, recording it in the
manifest just before the rename. Every image gives one row ``{path, ok, error, seconds,
out_pixels}``; a file that cannot be read, run or written is an error row, never a failed job.

**Online** (:func:`service`, ``msfin-fast serve --ray``). A Ray Serve deployment whose replicas
each hold one ServingUpscaler, so same-shape requests still batch. Each replica serves the
Starlette app of ``msfin-fast serve`` (``serve.ingress``), so both give the same answers byte for
byte. Deployment handles can also call :meth:`upscale` without HTTP.

Workers and replicas read the weights where the driver would: the driver's ``MSFIN_*`` and
``TORCH_HOME`` environment variables are passed to them.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import PRESETS, get_config
from .errors import InvalidInputError, MSFINError
from .images import DEFAULT_MAX_PIXELS, decode_image, pixel_limit, write_image
from .pictures import Picture, upscaled
from .run import RunOptions, check_exact_tiles
from .tiling import DEFAULT_TILE_PAD

_NEEDS_EXTRA = "scale-out needs Ray: pip install 'msfin_fast[scale]'"
# Threads of the driver that check which outputs are complete (file headers: I/O-bound).
CHECK_THREADS = 16


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MSFINError(_NEEDS_EXTRA) from None
    return ray


def _forwarded_env() -> dict[str, str]:
    """What a worker needs from the driver's environment to find the weights and caches."""
    return {k: v for k, v in os.environ.items() if k.startswith("MSFIN_") or k == "TORCH_HOME"}


def _check_count(name: str, value, minimum: float, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= minimum:
        what = "an integer" if integer else "a number"
        raise InvalidInputError(f"{name} must be {what} >= {minimum:g}, got {value!r}")


def _check_engine(model: str, dtype: str, backend: str | None) -> None:
    if model not in PRESETS:
        raise InvalidInputError(f"model must be one of {', '.join(PRESETS)}, got {model!r}")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise InvalidInputError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")
    from .engine.backends import CHOICES

    if backend is not None and backend not in CHOICES:
        raise InvalidInputError(f"backend must be one of {', '.join(CHOICES)}, got {backend!r}")


def _device_for(device: str, gpus: float, owner: str) -> str:
    """The device a worker or replica runs on: 'auto' means its GPU when Ray gives it one."""
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInputError(f"device must be auto, cpu or cuda on Ray (a {owner} sees only the GPUs "
                                f"Ray gives it, as cuda), got {device!r}")
    if device == "cuda" and gpus <= 0:
        raise InvalidInputError(f"device='cuda' needs GPUs per {owner} > 0: Ray gives a {owner} a GPU only "
                                f"when it asks for one (--gpus-per-{owner})")
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return device


def _backend_for(backend: str | None, device: str, tile_mode: str) -> str:
    """``backend``, else every door's default for a worker's or replica's device
    (:func:`msfin_fast.engine.default_backend`)."""
    from .engine import default_backend

    return backend if backend is not None else default_backend(device, tile_mode)


# ---------------------------------------------------------------------------------------------
# Batch


@dataclass(frozen=True)
class JobOptions:
    """What a batch job runs and with how many workers. The defaults run on one CPU machine.

    model, dtype, weights, tile, tile_pad, tile_mode, self_ensemble: as for :class:`Upscaler`.
    backend:          None: ``cpu`` on CPU workers (the reference for exact tiles), the reference on
                      GPU workers, as the CLI; else any backend ``Upscaler`` takes.
    device:           auto (a worker's GPU when it has one, else its CPU), cpu or cuda.
    workers:          actors in the pool; each builds the model once.
    gpus_per_worker:  GPUs Ray gives each worker (fractions share a GPU); 0 runs on CPUs.
    cpus_per_worker:  CPUs Ray gives each worker, which are also its torch threads and its decode
                      and encode threads. None: the cluster's CPUs shared among CPU workers (at
                      most one node's worth); 1 for GPU workers.
    batch_size:       images handed to a worker at once; those of one shape run as one batch on a GPU.
    max_pixels:       the largest image in LR pixels (w·h, read from its header), else an error row.
    """

    model: str = "msfin-x4"
    dtype: str = "fp32"
    backend: str | None = None
    device: str = "auto"
    weights: str | None = None
    tile: int | None = None
    tile_pad: int = DEFAULT_TILE_PAD
    tile_mode: str = "plain"
    self_ensemble: bool = False
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float | None = None
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        _check_engine(self.model, self.dtype, self.backend)
        _check_count("workers", self.workers, 1, integer=True)
        _check_count("batch_size", self.batch_size, 1, integer=True)
        _check_count("max_pixels", self.max_pixels, 1, integer=True)
        _check_count("gpus_per_worker", self.gpus_per_worker, 0, integer=False)
        if self.cpus_per_worker is not None:
            _check_count("cpus_per_worker", self.cpus_per_worker, 0.01, integer=False)
        self.run_options()  # tile, tile_pad, tile_mode
        device = _device_for(self.device, self.gpus_per_worker, "worker")
        if self.tile_mode == "exact":
            check_exact_tiles(self.tile_mode, _backend_for(self.backend, device, self.tile_mode))

    def run_options(self) -> RunOptions:
        return RunOptions(self.tile, self.tile_pad, self.tile_mode, self.self_ensemble)

    @property
    def worker_device(self) -> str:
        return _device_for(self.device, self.gpus_per_worker, "worker")

    @property
    def worker_backend(self) -> str:
        return _backend_for(self.backend, self.worker_device, self.tile_mode)

    @functools.cached_property
    def recipe(self) -> dict:
        """What the manifest records as having made an output (:func:`msfin_fast.resume.recipe`):
        computed once (custom weights are hashed once), and pickled with the options, so workers
        record what the driver checks."""
        from .resume import recipe

        return recipe(self.model, self.weights, dtype=self.dtype, backend=self.worker_backend,
                      options=self.run_options())


class UpscaleWorker:
    """The stateful function of the job's actor pool: ``map_batches(UpscaleWorker, ...)``.

    Built once per actor (the model loads once). Each call takes a batch ``{"path"}`` and returns a
    row per image: ``path``, ``ok``, ``error`` ("" when ok), ``seconds`` (the image's read, decode
    and write, plus its share of its shape group's model time) and ``out_pixels`` (0 on error). The
    output goes to ``out_root`` / (the path relative to ``in_root``), written atomically, in the
    input's format, and is recorded with ``options.recipe`` in the output root's manifest.
    """

    def __init__(self, in_root: str, out_root: str, options: JobOptions):
        import torch

        from .resume import Manifest
        from .serving import ServingUpscaler

        self.in_root, self.out_root, self.options = Path(in_root), Path(out_root), options
        self.manifest = Manifest(self.out_root)
        self.read_stats: dict[str, list[int]] = {}  # path → its file_stat from before it was read
        cpus = _assigned_cpus()
        self.threads = max(1, int(cpus)) if cpus else max(1, torch.get_num_threads())
        torch.set_num_threads(self.threads)
        self.upscaler = ServingUpscaler(
            options.model, device=options.worker_device, dtype=options.dtype, weights=options.weights,
            max_batch=options.batch_size, batch_window=0.0, max_queue=options.batch_size,
            tile_pad=options.tile_pad, backend=options.worker_backend,
        )
        self.run_options = self.upscaler.options(tile=options.tile, tile_mode=options.tile_mode,
                                                 self_ensemble=options.self_ensemble)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="msfin-io")

    def _decode(self, path: str) -> tuple[Picture | None, str, float]:
        from .resume import file_stat

        start = time.perf_counter()
        try:
            try:
                self.read_stats[path] = file_stat(path)
                with open(path, "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                return None, f"{path}: no such file (gone since the job listed it)", time.perf_counter() - start
            except OSError as exc:
                return None, f"{path}: cannot read ({exc.strerror or exc})", time.perf_counter() - start
            check = pixel_limit(self.options.max_pixels, path, "--max-pixels / JobOptions.max_pixels")
            return decode_image(io.BytesIO(blob), path, check), "", time.perf_counter() - start
        except MSFINError as exc:
            return None, str(exc), time.perf_counter() - start
        except Exception as exc:  # a decoder's own bug: this file's row, not the job
            return None, f"{path}: cannot read image ({type(exc).__name__}: {exc})", time.perf_counter() - start

    def _output_path(self, path: str) -> Path:
        rel = os.path.relpath(path, self.in_root)
        if rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            raise InvalidInputError(f"{path}: not inside the input folder {self.in_root}")
        return self.out_root / rel

    def _write(self, path: str, picture: Picture, rgb: np.ndarray) -> tuple[str, float, int]:
        start = time.perf_counter()
        try:
            result = upscaled(picture, rgb, self.upscaler.scale)
            out = self._output_path(path)
            stat = self.read_stats.pop(path, None)
            write_image(out, result, lambda tmp: self.manifest.record(path, out, self.options.recipe, tmp, stat))
            w, h = result.size
            return "", time.perf_counter() - start, w * h
        except MSFINError as exc:
            return str(exc), time.perf_counter() - start, 0
        except Exception as exc:  # an encoder's own bug: this file's row, not the job
            return f"{path}: cannot write its output ({type(exc).__name__}: {exc})", time.perf_counter() - start, 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        decoded = list(self.pool.map(self._decode, paths))
        errors = [error for _, error, _ in decoded]
        seconds = [t for _, _, t in decoded]
        out_pixels = [0] * len(paths)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, (picture, _, _) in enumerate(decoded):
            if picture is not None:
                groups[picture.rgb.shape, picture.rgb.dtype.str].append(i)
        writes = {}
        for indices in groups.values():
            start = time.perf_counter()
            futures = self.upscaler.submit_many([decoded[i][0].rgb for i in indices], self.run_options)
            outputs = []
            for future in futures:
                try:
                    outputs.append(future.result())
                except MSFINError as exc:
                    outputs.append(exc)
                except Exception as exc:  # a failure inside the model: this image's row says so
                    outputs.append(MSFINError(f"{type(exc).__name__}: {exc}"))
            share = (time.perf_counter() - start) / len(indices)
            for i, out in zip(indices, outputs):
                seconds[i] += share
                if isinstance(out, Exception):
                    errors[i] = f"{paths[i]}: upscaling failed ({out})"
                else:
                    # Written while the next group runs.
                    writes[i] = self.pool.submit(self._write, paths[i], decoded[i][0], out)
        for i, write in writes.items():
            errors[i], spent, out_pixels[i] = write.result()
            seconds[i] += spent
        return {
            "path": np.array(paths, dtype=object),
            "ok": np.array([not e for e in errors], dtype=bool),
            "error": np.array(errors, dtype=object),
            "seconds": np.array(seconds, dtype=np.float64),
            "out_pixels": np.array(out_pixels, dtype=np.int64),
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.upscaler.close()
            self.pool.shutdown(wait=False)


def _assigned_cpus() -> float | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:
        pass
    return None


@dataclass
class JobSummary:
    """What a batch job did: images written, failures (path and message), outputs already made with
    these settings and skipped, why the others that existed were redone (``redone``, as
    :meth:`msfin_fast.resume.ResumePlan.why` says it), pixels in and out, wall seconds, and the sum
    of the rows' worker seconds."""

    model: str
    options: JobOptions
    images: int = 0
    skipped: int = 0
    in_pixels: int = 0
    out_pixels: int = 0
    seconds: float = 0.0
    worker_seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    redone: str = ""

    @property
    def failed(self) -> int:
        return len(self.failures)

    def line(self) -> str:
        """The CLI's summary (:func:`msfin_fast.folders.images_line`): images, failures, output Mpx/s,
        skipped outputs and why others were redone."""
        from .folders import images_line

        o = self.options
        where = (f"Ray ({o.workers} worker{'s' if o.workers != 1 else ''}, "
                 f"{o.worker_device}{f' ×{o.gpus_per_worker:g} GPU' if o.gpus_per_worker else ''}, {o.dtype})")
        return images_line(self.images, get_config(self.model).scale, f"{self.model}{'+' if o.self_ensemble else ''}",
                           where, self.in_pixels, self.out_pixels, self.seconds, failed=self.failed,
                           skipped=self.skipped, redone=self.redone)


def plan_job(src: str | Path, dst: str | Path, options: JobOptions | None = None, *, recursive: bool = False,
             overwrite: bool = False):
    """The :class:`~msfin_fast.resume.ResumePlan` of a job: (input, output) pairs to run (``todo``),
    those whose output was already made from the same input with ``options``' settings (``done``),
    and why each of the others is run (``reasons``, ``why()``).

    Refuses what the CLI refuses: a missing or empty input folder, an output that is a file or the
    input itself, and (walking the tree) an output folder inside the input. Removes temporary files
    left by killed writers.
    """
    from .folders import plan_folder
    from .resume import Manifest, plan

    options = options or JobOptions()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InvalidInputError(f"{src}: not a folder (a Ray job upscales a folder of images)")
    listed = plan_folder(src, dst, recursive=recursive, videos=False)
    # Workers may run elsewhere: each file keeps its path under the resolved roots (a link to a
    # file elsewhere is read through the link and written at the link's mirrored path).
    s, d = src.resolve(), dst.resolve()
    pairs = [(s / f.relative_to(src), d / out.relative_to(dst)) for f, out in listed.pairs]
    made, scale = options.recipe, get_config(options.model).scale
    return plan(pairs, Manifest(d), lambda _: made, lambda _: scale, overwrite=overwrite, threads=CHECK_THREADS)


# Seconds to wait for a Ray cluster's address to answer (Ray itself retries an unreachable GCS for
# minutes).
CONNECT_TIMEOUT = 15.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise MSFINError unless something accepts a TCP connection at ``address`` (``host:port`` or
    ``ray://host:port``) within ``timeout`` seconds. ``auto`` and ``local`` are Ray's to resolve."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InvalidInputError(f"Ray address {address!r}: expected auto, host:port or ray://host:port")
    host = host.strip("[]")  # an IPv6 literal
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = f"no answer in {timeout:g} s" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise MSFINError(f"cannot reach the Ray cluster at {address} ({why}); "
                         "is it running, and is the address host:port of its head node?") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, connect_timeout: float = CONNECT_TIMEOUT):
    """Ray as it is (already initialised), else connected to ``address`` (or ``RAY_ADDRESS``), else a
    local cluster started for the block; what this starts or connects, it shuts down after, however
    the block ends (an error, Ctrl-C, SIGTERM or SIGHUP in the CLI). An address that does not answer
    within ``connect_timeout`` seconds is an error, not a wait."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs = {"logging_level": logging.WARNING}
    target = address or os.environ.get("RAY_ADDRESS")
    if not target:
        kwargs["include_dashboard"] = False
    else:
        check_reachable(target, connect_timeout)
    try:
        ray.init(address=address or None, **kwargs)
    except ConnectionError as exc:
        raise MSFINError(f"cannot connect to Ray at {target or 'a local cluster'}: "
                         f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _worker_cpus(ray, options: JobOptions) -> float:
    if options.cpus_per_worker is not None:
        return options.cpus_per_worker
    if options.gpus_per_worker > 0:
        return 1
    total = ray.cluster_resources().get("CPU", 1)
    node_max = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=total)
    return max(1, min(int(total // options.workers), int(node_max)))


def upscale_folder(src: str | Path, dst: str | Path, options: JobOptions | None = None, *,
                   address: str | None = None, recursive: bool = False, overwrite: bool = False,
                   progress: bool = True, on_row=None) -> JobSummary:
    """Upscale every image in ``src`` (its tree with ``recursive``) into the mirrored paths under
    ``dst`` with a pool of Ray workers; returns the :class:`JobSummary`.

    Outputs already made from the same input with the same settings (the output folder's manifest,
    :mod:`msfin_fast.resume`) are skipped (``overwrite`` redoes them), so a rerun of a killed job
    does only what is left, and a rerun with another model or option redoes everything it changes;
    ``JobSummary.redone`` says why. ``address``: a Ray cluster to connect to (``"auto"``, an
    ``ip:port`` or ``ray://…``); None uses Ray as it is initialised in this process, else
    ``RAY_ADDRESS``, else a local cluster for the job. ``progress``: Ray's progress bars.
    ``on_row(row)`` sees every row as it arrives.
    """
    options = options or JobOptions()
    scale = get_config(options.model).scale
    job = plan_job(src, dst, options, recursive=recursive, overwrite=overwrite)
    files = [f for f, _ in job.todo]
    summary = JobSummary(options.model, options, skipped=job.skipped, redone=job.why())
    start = time.perf_counter()
    if not files:
        summary.seconds = time.perf_counter() - start
        return summary
    with ray_session(address) as ray:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        context.enable_auto_log_stats = False
        if not progress:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        cpus = _worker_cpus(ray, options)
        # Paths, not file contents: a worker reads its own files, so a name Ray's path expansion
        # would misread (a newline in it) or a file gone since the listing is that file's error row.
        ds = ray.data.from_items([{"path": str(f)} for f in files])
        ds = ds.map_batches(
            UpscaleWorker,
            fn_constructor_kwargs={"in_root": str(Path(src).resolve()), "out_root": str(Path(dst).resolve()),
                                   "options": options},
            batch_size=options.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=cpus, num_gpus=options.gpus_per_worker or None,
            runtime_env={"env_vars": _forwarded_env()},
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["path"])):
                row = {"path": str(batch["path"][i]), "ok": bool(batch["ok"][i]), "error": str(batch["error"][i]),
                       "seconds": float(batch["seconds"][i]), "out_pixels": int(batch["out_pixels"][i])}
                if row["ok"]:
                    summary.images += 1
                    summary.out_pixels += row["out_pixels"]
                    summary.in_pixels += row["out_pixels"] // (scale * scale)
                else:
                    summary.failures.append((row["path"], row["error"]))
                summary.worker_seconds += row["seconds"]
                if on_row is not None:
                    on_row(row)
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------------------------------
# Online


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
        _check_engine(self.model, self.dtype, self.backend)
        _check_count("replicas", self.replicas, 1, integer=True)
        _check_count("gpus_per_replica", self.gpus_per_replica, 0, integer=False)
        _check_count("cpus_per_replica", self.cpus_per_replica, 0, integer=False)
        _device_for(self.device, self.gpus_per_replica, "replica")
        if self.max_ongoing is not None:
            _check_count("max_ongoing", self.max_ongoing, 1, integer=True)

    def upscaler_kwargs(self) -> dict:
        device = _device_for(self.device, self.gpus_per_replica, "replica")
        return dict(model=self.model, device=device, dtype=self.dtype, weights=self.weights,
                    max_batch=self.max_batch, batch_window=self.batch_window, max_queue=self.max_queue,
                    graph_cache=self.graph_cache, backend=_backend_for(self.backend, device, "plain"))


class MSFINReplica:
    """One replica: a ServingUpscaler and the ``msfin-fast serve`` app in front of it."""

    def __init__(self, options: ServiceOptions, limits=None):
        from .server import Limits
        from .serving import ServingUpscaler

        self.options, self.limits = options, limits or Limits()
        self.upscaler = ServingUpscaler(**options.upscaler_kwargs())

    def __serve_build_asgi_app__(self):
        from .server import create_app

        return create_app(self.upscaler, self.limits)

    async def upscale(self, body: bytes, *, tile: int | None = None, tile_mode: str = "plain",
                      self_ensemble: bool = False) -> bytes:
        """Image file bytes → the ×4 PNG's bytes, as ``POST /upscale`` answers them, for deployment
        handles (no HTTP). A refusal raises InvalidInputError with the message the route gives."""
        from .server import decode_upload, encode_png

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
    _import_ray()
    from ray import serve

    options = options or ServiceOptions()
    max_ongoing = options.max_ongoing or options.max_queue + options.max_batch
    deployment = serve.deployment(serve.ingress()(MSFINReplica), name="msfin")
    return deployment.options(
        num_replicas=options.replicas,
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica,
                           "runtime_env": {"env_vars": _forwarded_env()}},
    ).bind(options, limits)


def build_app(args: dict):
    """The application for Ray's own tools: ``serve run msfin_fast.scale:build_app model=msfin-s-x4
    replicas=2``, or ``import_path: msfin_fast.scale:build_app`` with ``args`` in a Serve config file
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
    _import_ray()
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    return serve.run(service(options, limits), name="msfin", route_prefix="/", blocking=blocking)


__all__ = ["JobOptions", "JobSummary", "UpscaleWorker", "plan_job", "upscale_folder", "ray_session",
           "ServiceOptions", "MSFINReplica", "service", "build_app", "run_service"]
