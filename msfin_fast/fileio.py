"""Atomic file writes: a failure never leaves a half-written file behind.

A write goes to a hidden temporary file beside the target, ``.<name>.<pid>.<random>.part``, which is
flushed to disk (fsync) and then renamed over the target. An exception or a handled signal (Ctrl-C,
SIGTERM) deletes it. A process that is killed outright (SIGKILL, power loss) cannot, so the CLI
calls :func:`remove_stale_parts` on its output folders at start: a temporary file whose writer's
process no longer exists is removed; one whose writer is alive is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def _read_umask() -> int:
    # os.umask can only be read by setting it, which races with threads creating files; read it once,
    # at import, before any worker thread of this package exists.
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()
_PART = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]{8}\.part$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system syncs folders
    finally:
        os.close(fd)


def temporary_beside(path: str | Path) -> Path:
    """Create an empty ``.<name>.<pid>.<random>.part`` file beside ``path`` (parents created), for a
    writer that needs a path rather than a file object; :func:`commit` puts it in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=path.parent)
    os.close(fd)
    return Path(tmp_name)


def commit(tmp: str | Path, path: str | Path) -> None:
    """Sync the finished temporary file ``tmp`` to disk and rename it over ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, before_commit=None) -> Iterator[BinaryIO]:
    """Yield a binary file; when the block succeeds it is synced and renamed over ``path``, else
    deleted. Missing parent folders are created. ``before_commit(tmp)`` runs on the complete
    temporary file just before the rename (a resume manifest records it there)."""
    tmp = temporary_beside(path)
    try:
        with open(tmp, "wb") as f:
            yield f
        if before_commit is not None:
            before_commit(tmp)
        commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # PermissionError among them
        return True  # exists but belongs to someone else, or cannot be asked: leave its files
    return True


def remove_stale_parts(folder: str | Path) -> list[Path]:
    """Delete this package's temporary files in ``folder`` whose writing process has ended; returns them."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _PART.match(entry.name)
        if match and not _alive(int(match["pid"])) and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed
