"""What the Ray jobs and the Ray service share: importing Ray, connecting to a cluster, the
environment workers get, and the checks of their options."""

from __future__ import annotations

import contextlib
import logging
import os

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
def ray_session(address: str | None = None, connect_timeout: float = CONNECT_TIMEOUT):
    """Ray as it is (already initialised), else connected to ``address`` (or ``RAY_ADDRESS``), else a
    local cluster started for the block; what this starts or connects, it shuts down after, however
    the block ends (an error, Ctrl-C, SIGTERM or SIGHUP in the CLI). An address that does not answer
    within ``connect_timeout`` seconds is an error, not a wait."""
    ray = import_ray()
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
