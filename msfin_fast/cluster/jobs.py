"""Folder jobs on Ray Data (``msfin-fast upscale --ray``, :func:`run_job`).

The driver plans the job with :func:`msfin_fast.folders.plan_folder` (the CLI's listing and
checks), leaves out every image whose output was already made from the same input with the same
settings (the output folder's manifest, :mod:`msfin_fast.resume`), so a killed job resumes where it
stopped and a changed model, option or input redoes what it changes, and hands the rest to Ray Data
as paths (``from_items``): the object store carries names, never decoded pixels (a ×4 output is 16×
its input), in batches sized to spread the images over the workers (:func:`plan_batches`). An actor
pool of :class:`UpscaleWorker` (``map_batches``) builds the model once per worker. Each worker
reads and decodes its files with this package's own reader, which handles alpha, grey, 16-bit grey
and EXIF orientation, and gives the CLI's errors: a file that is gone, unreadable or over
``max_pixels`` is that file's error row. It runs a batch's images grouped by
shape, through a :class:`~msfin_fast.serving.ServingUpscaler`, so a GPU worker gets batches, pinned
copies and CUDA graphs, and a CPU worker gives the API's bytes. It writes each output atomically to
the mirrored path under the output root, recording it in the manifest just before the rename. Every
image gives one row ``{path, ok, error, seconds, out_pixels, worker}``; a file that cannot be read, run
or written is an error row, never a failed job. Ray's own output goes to its logs folder unless
``JobOptions.verbose`` (:func:`~.common.quiet_ray`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import io
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import get_config
from ..errors import InvalidInputError, MSFINError
from ..images import DEFAULT_MAX_PIXELS, decode_image, pixel_limit, write_image
from ..pictures import Picture, upscaled
from ..run import RunOptions, check_exact_tiles
from .common import backend_for, check_count, check_engine, device_for, forwarded_env, ray_session

# Threads of the driver that check which outputs are complete (file headers: I/O-bound).
CHECK_THREADS = 16


@dataclass(frozen=True)
class JobOptions:
    """What a batch job runs and with how many workers. The defaults run on one CPU machine.

    model, dtype, weights: as for :class:`~msfin_fast.Upscaler`.
    run:              how each image runs (:class:`~msfin_fast.run.RunOptions`: tiles, self-ensemble).
    backend:          None: every door's default for the worker's device (``auto`` on CPU workers,
                      the reference on GPU workers and for exact tiles); else any of the registry's
                      ``CHOICES``.
    device:           auto (a worker's GPU when it has one, else its CPU), cpu or cuda.
    workers:          actors in the pool; each builds the model once.
    gpus_per_worker:  GPUs Ray gives each worker (fractions share a GPU); 0 runs on CPUs.
    cpus_per_worker:  CPUs Ray gives each worker, which are also its torch threads and its decode
                      and encode threads. None: the cluster's CPUs shared among CPU workers (at
                      most one node's worth); 1 for GPU workers.
    batch_size:       the most images handed to a worker at once (fewer when there are too few images
                      to give every worker a batch: :func:`plan_batches`); those of one shape run as
                      one batch on a GPU.
    max_pixels:       the largest image in LR pixels (w·h, read from its header), else an error row.
    suffix, ext:      output names ``{name}_{suffix}.{ext}``, as the CLI's ``--suffix`` and ``--ext``
                      (:func:`msfin_fast.folders.output_name`); default: the input's name and format.
    verbose:          Ray's own output (its log lines, its C++ core's stderr, its warnings, its
                      workers' output) on the terminal, as Ray prints it; by default it goes to the
                      session's logs folder, named in one line on stderr (:func:`~.common.quiet_ray`).
    """

    model: str = "msfin-x4"
    dtype: str = "fp32"
    backend: str | None = None
    device: str = "auto"
    weights: str | None = None
    run: RunOptions = RunOptions()
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float | None = None
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    suffix: str = ""
    ext: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        from ..folders import check_ext

        check_ext(self.ext)
        check_engine(self.model, self.dtype, self.backend)
        check_count("workers", self.workers, 1, integer=True)
        check_count("batch_size", self.batch_size, 1, integer=True)
        check_count("max_pixels", self.max_pixels, 1, integer=True)
        check_count("gpus_per_worker", self.gpus_per_worker, 0, integer=False)
        if self.cpus_per_worker is not None:
            check_count("cpus_per_worker", self.cpus_per_worker, 0.01, integer=False)
        if not isinstance(self.run, RunOptions):
            raise InvalidInputError(f"run must be a RunOptions, got {type(self.run).__name__}")
        device = device_for(self.device, self.gpus_per_worker, "worker")
        if self.run.tile_mode == "exact":
            check_exact_tiles(self.run.tile_mode, backend_for(self.backend, device, self.run.tile_mode))

    @property
    def worker_device(self) -> str:
        return device_for(self.device, self.gpus_per_worker, "worker")

    @property
    def worker_backend(self) -> str:
        return backend_for(self.backend, self.worker_device, self.run.tile_mode)

    @functools.cached_property
    def recipe(self) -> dict:
        """What the manifest records as having made an output (:func:`msfin_fast.resume.recipe`):
        computed once (custom weights are hashed once), and pickled with the options, so workers
        record what the driver checks."""
        from ..resume import recipe

        return recipe(self.model, self.weights, dtype=self.dtype, backend=self.worker_backend, options=self.run)


def output_path(in_root: Path, out_root: Path, path: str, options: JobOptions) -> Path:
    """Where a worker writes the output of ``path``: its place under ``out_root`` mirrored from
    ``in_root``, named as :func:`plan_job` (and the CLI) name it (``options.suffix``/``ext``)."""
    from ..folders import output_name

    rel = Path(os.path.relpath(path, in_root))
    if rel.parts[:1] == (os.pardir,) or rel.is_absolute():
        raise InvalidInputError(f"{path}: not inside the input folder {in_root}")
    return out_root / rel.with_name(output_name(rel.name, options.suffix, options.ext))


class UpscaleWorker:
    """The stateful function of the job's actor pool: ``map_batches(UpscaleWorker, ...)``.

    Built once per actor (the model loads once). Each call takes a batch ``{"path"}`` and returns a
    row per image: ``path``, ``ok``, ``error`` ("" when ok), ``seconds`` (the image's read, decode
    and write, plus its share of its shape group's model time), ``out_pixels`` (0 on error) and
    ``worker`` (``host:pid`` of the worker that ran it). The
    output goes to ``out_root`` / (the path relative to ``in_root``), named by :func:`output_path`
    (the input's name and format unless ``options.suffix``/``ext``), written atomically, and is
    recorded with ``options.recipe`` in the output root's manifest.
    """

    def __init__(self, in_root: str, out_root: str, options: JobOptions):
        import torch

        from ..resume import Manifest
        from ..serving import ServingUpscaler
        from ..upscaler import Upscaler

        self.in_root, self.out_root, self.options = Path(in_root), Path(out_root), options
        self.manifest = Manifest(self.out_root)
        self.read_stats: dict[str, list[int]] = {}  # path → its file_stat from before it was read
        cpus = _assigned_cpus()
        self.threads = max(1, int(cpus)) if cpus else max(1, torch.get_num_threads())
        torch.set_num_threads(self.threads)
        run = options.run
        upscaler = Upscaler(options.model, device=options.worker_device, dtype=options.dtype, weights=options.weights,
                            tile=run.tile, tile_pad=run.tile_pad, tile_mode=run.tile_mode,
                            self_ensemble=run.self_ensemble, auto_tile=run.auto_tile, backend=options.worker_backend)
        self.upscaler = ServingUpscaler(upscaler, max_batch=options.batch_size, batch_window=0.0,
                                        max_queue=options.batch_size)
        self.run_options = upscaler.options
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="msfin-io")
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _decode(self, path: str) -> tuple[Picture | None, str, float]:
        from ..resume import file_stat

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

    def _write(self, path: str, picture: Picture, rgb: np.ndarray) -> tuple[str, float, int]:
        start = time.perf_counter()
        try:
            result = upscaled(picture, rgb, self.upscaler.scale)
            out = output_path(self.in_root, self.out_root, path, self.options)
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
            "worker": np.array([self.name] * len(paths), dtype=object),
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
        from ..folders import images_line

        o = self.options
        where = (f"Ray ({o.workers} worker{'s' if o.workers != 1 else ''}, "
                 f"{o.worker_device}{f' ×{o.gpus_per_worker:g} GPU' if o.gpus_per_worker else ''}, {o.dtype})")
        return images_line(self.images, get_config(self.model).scale, f"{self.model}{'+' if o.run.self_ensemble else ''}",
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
    from ..folders import plan_folder
    from ..resume import Manifest, plan

    options = options or JobOptions()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InvalidInputError(f"{src}: not a folder (a Ray job upscales a folder of images)")
    listed = plan_folder(src, dst, recursive=recursive, videos=False, suffix=options.suffix, ext=options.ext)
    # Workers may run elsewhere: each file keeps its path under the resolved roots (a link to a
    # file elsewhere is read through the link and written at the link's mirrored path).
    s, d = src.resolve(), dst.resolve()
    pairs = [(s / f.relative_to(src), d / out.relative_to(dst)) for f, out in listed.pairs]
    made, scale = options.recipe, get_config(options.model).scale
    return plan(pairs, Manifest(d), lambda _: made, lambda _: scale, overwrite=overwrite, threads=CHECK_THREADS)


# Up to this many images, each is its own block of the dataset, and ``map_batches`` bundles exactly
# a batch of them for each call; above it, fewer blocks (a block is an object in Ray's store: about
# 1.5 ms each to put on a 2-core machine), each at least a batch.
ROW_BLOCKS = 256
# Seconds for every worker of a job to start (its process, imports and model) before the job is an error.
WORKERS_START_TIMEOUT = 600


def plan_batches(images: int, workers: int, batch_size: int) -> tuple[int, int]:
    """(batch, blocks): the images per worker call and the blocks of the dataset, so that the work is
    spread over the workers. The batch is ``batch_size``, or fewer when there are too few images for
    every worker to get one: ``max(1, min(batch_size, ceil(images / workers)))`` (5 images, 2 workers,
    ``batch_size`` 8: batches of 3 and 2). Up to ``ROW_BLOCKS`` images each is a block, and Ray Data
    bundles blocks up to a batch per call; above it, ``images // batch`` blocks (at least
    ``workers``), each at least a batch, so that no two are bundled into one call."""
    check_count("images", images, 1, integer=True)
    check_count("workers", workers, 1, integer=True)
    check_count("batch_size", batch_size, 1, integer=True)
    batch = max(1, min(batch_size, math.ceil(images / workers)))
    blocks = images if images <= ROW_BLOCKS else min(images, max(workers, images // batch))
    return batch, blocks


def _worker_cpus(ray, options: JobOptions) -> float:
    if options.cpus_per_worker is not None:
        return options.cpus_per_worker
    if options.gpus_per_worker > 0:
        return 1
    total = ray.cluster_resources().get("CPU", 1)
    node_max = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=total)
    return max(1, min(int(total // options.workers), int(node_max)))


@contextlib.contextmanager
def _data_logs(options: JobOptions, progress: bool):
    """Verbose without progress: Ray Data's log from WARNING, for the job (quiet, it goes to its file)."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    if options.verbose and not progress:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rows(ray, src, dst, files: list[Path], options: JobOptions, progress: bool):
    """The job's rows, as the workers give them."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.enable_auto_log_stats = False
    # The job starts once every worker is up (its model built), so that the first batches go to
    # all of them rather than all to the first one up; workers that cannot start in this time
    # (resources the cluster lacks) are an error, not a wait for ever.
    context.wait_for_min_actors_s = WORKERS_START_TIMEOUT
    per_call, blocks = plan_batches(len(files), options.workers, options.batch_size)
    # Paths, not file contents: a worker reads its own files, so a name Ray's path expansion
    # would misread (a newline in it) or a file gone since the listing is that file's error row.
    ds = ray.data.from_items([{"path": str(f)} for f in files], override_num_blocks=blocks)
    ds = ds.map_batches(
        UpscaleWorker,
        fn_constructor_kwargs={"in_root": str(Path(src).resolve()), "out_root": str(Path(dst).resolve()),
                               "options": options},
        batch_size=per_call, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.workers, max_tasks_in_flight_per_actor=1),
        num_cpus=_worker_cpus(ray, options), num_gpus=options.gpus_per_worker or None,
        runtime_env={"env_vars": forwarded_env()},
    )
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except ray.exceptions.GetTimeoutError:
            gpus = f" and {options.gpus_per_worker:g} GPU" if options.gpus_per_worker else ""
            raise MSFINError(f"the {options.workers} Ray worker(s) did not all start within "
                             f"{WORKERS_START_TIMEOUT:g} s: does the cluster have {_worker_cpus(ray, options):g} "
                             f"CPU{gpus} for each (ray status)?") from None
        except ray.exceptions.ActorDiedError as exc:  # a worker's constructor failed: weights, device, …
            raise MSFINError(f"the Ray workers could not start: {worker_failure(exc)}") from None
        for i in range(len(batch["path"])):
            yield {"path": str(batch["path"][i]), "ok": bool(batch["ok"][i]), "error": str(batch["error"][i]),
                   "seconds": float(batch["seconds"][i]), "out_pixels": int(batch["out_pixels"][i]),
                   "worker": str(batch["worker"][i])}


def worker_failure(exc: BaseException) -> str:
    """The one-line cause in a Ray error that carries a worker's traceback: this package's error
    message (``msfin_fast.errors.WeightsError: msfin-x4: weights … not found``) when there is one,
    else the last ``SomeError: message`` line, else the error's first line."""
    text = str(exc)
    ours = re.findall(r"msfin_fast\.errors\.\w+: (.+)", text)
    if ours:
        return ours[-1].strip()
    errors = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception): .+)$", text, flags=re.M)
    return (errors[-1] if errors else (text.strip().splitlines() or [type(exc).__name__])[0]).strip()


def run_job(src: str | Path, dst: str | Path, options: JobOptions | None = None, *,
            address: str | None = None, recursive: bool = False, overwrite: bool = False,
            progress: bool = True, on_row=None) -> JobSummary:
    """Upscale every image in ``src`` (its tree with ``recursive``) into the mirrored paths under
    ``dst`` with a pool of Ray workers; returns the :class:`JobSummary`.

    Outputs already made from the same input with the same settings (the output folder's manifest,
    :mod:`msfin_fast.resume`) are skipped (``overwrite`` redoes them), so a rerun of a killed job
    does only what is left, and a rerun with another model or option redoes everything it changes;
    ``JobSummary.redone`` says why. ``address``: a Ray cluster to connect to (``"auto"``, an
    ``ip:port`` or ``ray://…``); None uses Ray as it is initialised in this process, else
    ``RAY_ADDRESS``, else a local cluster for the job. ``progress``: Ray's progress bars, and (unless
    ``options.verbose``) the line naming Ray's logs folder. ``on_row(row)`` sees every row as it
    arrives.
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
    with ray_session(address, quiet=not options.verbose, announce=progress) as ray, _data_logs(options, progress):
        for row in _rows(ray, src, dst, files, options, progress):
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
