"""What the Ray jobs and the Ray service share: importing Ray, connecting to a cluster, the
environment workers get, and the checks of their options."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from ..config import PRESETS
from ..errors import InvalidInputError, MSFINError

NEEDS_EXTRA = "scale-out needs Ray: pip install 'msfin_fast[scale]'"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MSFINError(NEEDS_EXTRA) from None
    return ray


def forwarded_env() -> dict[str, str]:
    """What a worker needs from the driver's environment to find the weights and caches."""
    return {k: v for k, v in os.environ.items() if k.startswith("MSFIN_") or k == "TORCH_HOME"}


def check_count(name: str, value, minimum: float, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= minimum:
        what = "an integer" if integer else "a number"
        raise InvalidInputError(f"{name} must be {what} >= {minimum:g}, got {value!r}")


def check_engine(model: str, dtype: str, backend: str | None) -> None:
    if model not in PRESETS:
        raise InvalidInputError(f"model must be one of {', '.join(PRESETS)}, got {model!r}")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise InvalidInputError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")
    from ..engine.backends import CHOICES

    if backend is not None and backend not in CHOICES:
        raise InvalidInputError(f"backend must be one of {', '.join(CHOICES)}, got {backend!r}")


def device_for(device: str, gpus: float, owner: str) -> str:
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


def backend_for(backend: str | None, device: str, tile_mode: str) -> str:
    """``backend``, else every door's default for a worker's or replica's device
    (:func:`msfin_fast.engine.default_backend`)."""
    from ..engine import default_backend

    return backend if backend is not None else default_backend(device, tile_mode)


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
def ray_session(address: str | None = None, connect_timeout: float = CONNECT_TIMEOUT, *, quiet: bool = False,
                announce: bool = True):
    """Ray as it is (already initialised), else connected to ``address`` (or ``RAY_ADDRESS``), else a
    local cluster started for the block; what this starts or connects, it shuts down after, however
    the block ends (an error, Ctrl-C, SIGTERM or SIGHUP in the CLI). An address that does not answer
    within ``connect_timeout`` seconds is an error, not a wait.

    ``quiet``: Ray's own output goes to a file, not the terminal (:func:`quiet_ray`): its log lines,
    the lines its C++ core writes to stderr, its Python warnings and (when this starts or connects
    Ray) its workers' output; with ``announce``, one line on stderr names the folder of the logs.
    Else Ray prints as it does (the ``ray`` logger from WARNING).
    """
    ray = import_ray()
    with quiet_ray(ray, announce) if quiet else contextlib.nullcontext() as into_file:
        started = False
        try:
            if not ray.is_initialized():
                _init(ray, address, connect_timeout, quiet)
                started = True
            if into_file is not None:
                into_file()
            yield ray
        finally:
            if started and ray.is_initialized():
                ray.shutdown()  # inside quiet_ray: what it prints goes to the log file too


def _init(ray, address: str | None, connect_timeout: float, quiet: bool) -> None:
    kwargs = {"logging_level": logging.WARNING}
    if quiet:
        kwargs["log_to_driver"] = False  # workers' stdout and stderr stay in their files in the logs folder
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


# The file, in Ray's logs folder, that gets this driver's own Ray output while Ray is quiet.
DRIVER_LOG = "msfin-fast-driver-{pid}.log"
LOG_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"  # Ray's own


def ray_logs_dir(ray) -> str | None:
    """The logs folder of this process's Ray session (``<temp dir>/session_…/logs``), or None (not
    initialised, or a ``ray://`` client, whose logs are on the cluster)."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    try:
        return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
    except Exception:
        return None


def from_ray(category: type, filename: str) -> bool:
    """Whether a warning is Ray's: its category is defined in Ray, or it was issued from a file in Ray."""
    ray_dir = os.path.dirname(import_ray().__file__) + os.sep
    return category.__module__.split(".")[0] == "ray" or os.path.abspath(filename).startswith(ray_dir)


@contextlib.contextmanager
def quiet_ray(ray, announce: bool = True):
    """Ray's own output, for the block, in a file rather than on the terminal.

    Yields a function to call once Ray is initialised. For the block, the console handlers of Ray's
    loggers (``ray``, ``ray.data``, …) print errors only, and the ``ray`` logger's records are held
    until the call, which writes them, and those after, to ``DRIVER_LOG`` in the session's logs
    folder (Ray Data keeps its own ``ray-data.log`` there); points file descriptor 2 at that file
    (the lines Ray's C++ core writes to stderr, and Ray's console handlers, which write to the
    stderr of their creation), while this process's ``sys.stderr`` keeps writing to the terminal
    (:func:`_stderr_into`); and, with ``announce``, prints ``msfin-fast: Ray logs: FOLDER`` on
    stderr. Ray's Python warnings (:func:`from_ray`) go to the file too; the others go to
    ``warnings.showwarning`` as before. Everything is put back at the end of the block.
    """
    import logging.handlers
    import tempfile
    import warnings

    consoles = [(h, h.level) for name, logger in list(logging.root.manager.loggerDict.items())
                if (name == "ray" or name.startswith("ray.")) and isinstance(logger, logging.Logger)
                for h in logger.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    ray_logger = logging.getLogger("ray")
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    held.setLevel(logging.DEBUG)
    ray_logger.addHandler(held)
    file_handler: logging.Handler | None = None
    redirect = contextlib.ExitStack()

    def into_file() -> None:
        nonlocal file_handler
        folder = ray_logs_dir(ray) or tempfile.mkdtemp(prefix="msfin-fast-ray-")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, DRIVER_LOG.format(pid=os.getpid()))
        file_handler = logging.FileHandler(path, delay=True)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        held.setTarget(file_handler)
        held.flush()
        ray_logger.removeHandler(held)
        ray_logger.addHandler(file_handler)
        redirect.enter_context(_stderr_into(path))
        if announce:
            print(f"msfin-fast: Ray logs: {folder}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if from_ray(category, filename):
                ray_logger.warning(warnings.formatwarning(message, category, filename, lineno, line).rstrip())
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        for handler, _ in consoles:
            handler.setLevel(logging.ERROR)
        # Ray's error listener prints the errors it is sent (a worker's failed task, with its
        # traceback) to sys.stdout as "(raylet) …" lines: into the file as well. A private function,
        # replaced only where it exists; the error still reaches the caller as an exception.
        # And when Ray was already up with its workers' output forwarded (log_to_driver), the
        # dispatcher's printing handler is swapped for the file for the block.
        def to_file(data, ignore_prefix=False):
            for line in data.get("lines", ()):
                ray_logger.warning(f"({data.get('pid', 'ray')}) {line}")

        private = getattr(ray, "_private", None)
        printer = getattr(getattr(private, "worker", None), "print_to_stdstream", None)
        if printer is not None:
            ray._private.worker.print_to_stdstream = to_file
        dispatcher = getattr(getattr(private, "ray_logging", None), "global_worker_stdstream_dispatcher", None)
        forwarded = {}
        if isinstance(getattr(dispatcher, "handlers", None), list):
            forwarded = {name: handler for name, handler in dispatcher.handlers if name == "ray_print_logs"}
            dispatcher.handlers = [(n, to_file if n in forwarded else h) for n, h in dispatcher.handlers]
        try:
            yield into_file
        finally:
            if printer is not None:
                ray._private.worker.print_to_stdstream = printer
            if forwarded:
                dispatcher.handlers = [(n, forwarded.get(n, h) if h is to_file else h) for n, h in dispatcher.handlers]
            redirect.close()
            for handler, level in consoles:
                handler.setLevel(level)
            ray_logger.removeHandler(held)
            held.close()
            if file_handler is not None:
                ray_logger.removeHandler(file_handler)
                file_handler.close()


@contextlib.contextmanager
def _stderr_into(path: str):
    """File descriptor 2 appends to ``path`` for the block. If ``sys.stderr`` writes to descriptor 2,
    it is swapped for a stream on a copy of the old descriptor, so that Python's own output (this
    package's messages and warnings) still reaches the terminal."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        own = sys.stderr.fileno() == 2
    except Exception:  # a replaced stream (pytest's capture, an IDE): not descriptor 2
        own = False
    saved = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    old, new = sys.stderr, None
    if own:
        new = open(os.dup(saved), "w", buffering=1, encoding=old.encoding, errors=old.errors)
        sys.stderr = new
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        if new is not None:
            with contextlib.suppress(Exception):
                new.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if new is not None:
            if sys.stderr is new:
                sys.stderr = old
            new.close()
