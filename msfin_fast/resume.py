"""Resuming folder jobs: a manifest in the output folder records what made each output.

A folder run (``msfin-fast upscale`` on a folder, with or without ``--ray``) appends one JSON line to
``<output folder>/.msfin-fast-manifest.jsonl`` for every output it writes::

    {"output": "sub/a.png", "recipe": {...}, "input": [bytes, mtime_ns], "file": [bytes, mtime_ns]}

``recipe`` is everything that decides the output's pixels: the model, the SHA-256 of its weights,
dtype, backend, tiles, self-ensemble (and, for a video, the encoder settings). ``input`` is the
source's size and modification time when it was read, ``file`` the output's own when it was written.
The line is appended after the output's temporary file is complete and before it is renamed into
place, so a killed writer leaves either no line or a line that does not match what is on disk.

A resumed run skips an output only when all of it holds: the manifest has its line, the line's recipe
is the run's, the input and the output are still the files the line describes, and (images) the
output is a whole image of the right size (:func:`msfin_fast.images.output_is_complete`). Anything
else is (re)done, with the reason counted, so that the run can say why. Outputs made by anything
else (another tool, an earlier version without a manifest, a file copied over) are redone.

Appends come from several processes at once (Ray workers): each line is one ``write`` to a file
opened with ``O_APPEND``, which local file systems keep whole. A torn last line is ignored.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = ".msfin-fast-manifest.jsonl"

# Why an output is (re)made. The first is no redo: there was nothing there.
MISSING = "no output yet"
INCOMPLETE = "output incomplete or unreadable"
UNRECORDED = "not made by a recorded run of this package"
SETTINGS = "made with other settings"
INPUT_CHANGED = "input changed since its output was made"
OUTPUT_CHANGED = "output changed since it was written"
OVERWRITE = "overwrite asked"


def weights_id(model: str, weights) -> str:
    """The SHA-256 of the weights a run loads: the released file's (the loader verifies it), the
    given file's, or (a module) that of its parameters' and buffers' names, shapes and bytes."""
    import hashlib

    import torch

    from .weights import registry_entry, sha256_of

    if weights is None:
        return registry_entry(model).sha256
    if isinstance(weights, torch.nn.Module):
        digest = hashlib.sha256()
        for name, tensor in weights.state_dict().items():
            t = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()
    return sha256_of(weights)


def recipe(model: str, weights: str | os.PathLike | None, *, dtype: str, backend: str, options,
           **extra) -> dict:
    """What decides an output's pixels, as the manifest records it. ``options`` is a
    :class:`~msfin_fast.run.RunOptions`; ``extra`` adds anything else (a video's encoder)."""
    made = {"model": model, "weights": weights_id(model, weights), "dtype": dtype, "backend": backend,
            "tile": options.tile, "tile_pad": options.tile_pad,
            "tile_mode": options.tile_mode, "self_ensemble": bool(options.self_ensemble)}
    return extend(made, **extra)


def extend(made: dict, **extra) -> dict:
    """``made`` with ``extra`` added, in the form the manifest reads back (lists, not tuples), so
    that a recipe compares equal to its record."""
    return json.loads(json.dumps({**made, **extra}))


def file_stat(path: str | os.PathLike) -> list[int] | None:
    """[size, mtime_ns] of ``path`` as the manifest records a file (None when it cannot be read).
    Taken of an input before it is read: a change after that makes the record older than the file,
    so the output is redone."""
    try:
        return _stat(path)
    except OSError:
        return None


def _stat(path: str | os.PathLike) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = []
    for k in keys[:3]:
        before, after = old.get(k), new.get(k)
        if k == "weights":
            before, after = str(before)[:12] + "…", str(after)[:12] + "…"
        shown.append(f"{k} {before} → {after}")
    return ", ".join(shown) + (", …" if len(keys) > 3 else "")


class Manifest:
    """The records of one output folder (``root``): output path relative to it → its last line."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / MANIFEST_NAME
        self.entries: dict[str, dict] = {}
        self.lines = 0
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError:
            return  # unreadable: every output is redone, and appends will say what is wrong
        for line in text.splitlines():
            self.lines += 1
            try:
                entry = json.loads(line)
                key = entry["output"]
                entry["recipe"], entry["input"], entry["file"]  # noqa: B018 (a line must hold all three)
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line
            self.entries[key] = entry

    def key(self, out: str | os.PathLike) -> str:
        return Path(os.path.relpath(os.path.abspath(out), os.path.abspath(self.root))).as_posix()

    def reason(self, src: str | os.PathLike, out: str | os.PathLike, made: dict, scale: int | None) -> str | None:
        """None when ``out`` is a complete output of ``src`` made with ``made``; else why it is to be
        (re)made. ``scale``: check the output as an image of ``scale``× the input's size (None for
        a video, which is written whole or not at all)."""
        from .images import output_is_complete

        out = Path(out)
        if not out.is_file():
            return MISSING
        entry = self.entries.get(self.key(out))
        if entry is None:
            return UNRECORDED
        if entry["recipe"] != made:
            return f"{SETTINGS} ({_differences(entry['recipe'], made)})"
        try:
            if _stat(src) != entry["input"]:
                return INPUT_CHANGED
            if _stat(out) != entry["file"]:
                return OUTPUT_CHANGED
        except OSError:
            return MISSING
        if scale is not None and not output_is_complete(src, out, scale):
            return INCOMPLETE
        return None

    def line(self, src: str | os.PathLike, out: str | os.PathLike, made: dict,
             written: str | os.PathLike | None = None, input_stat: list[int] | None = None) -> bytes:
        """The record of ``out``, made from ``src`` with ``made``; ``written`` is the file whose size
        and time are recorded (the temporary file about to be renamed to ``out``; default ``out``);
        ``input_stat`` the input's :func:`file_stat` from before it was read (default: now)."""
        entry = {"output": self.key(out), "recipe": made, "input": input_stat or _stat(src),
                 "file": _stat(written or out)}
        return (json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n").encode()

    def append(self, data: bytes) -> None:
        """Append record lines (one ``write``, so concurrent writers do not interleave them)."""
        from .errors import ImageWriteError

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ImageWriteError(f"{self.path}: cannot record the outputs for resuming "
                                  f"({exc.strerror or exc})") from None

    def record(self, src, out, made: dict, written=None, input_stat: list[int] | None = None) -> None:
        self.append(self.line(src, out, made, written, input_stat))

    def compact(self) -> None:
        """Rewrite the file with one line per output when it holds many superseded lines."""
        from .fileio import atomic_write

        if self.lines <= 2 * len(self.entries) + 64:
            return
        with atomic_write(self.path) as f:
            for entry in self.entries.values():
                f.write((json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n").encode())
        self.lines = len(self.entries)


@dataclass
class ResumePlan:
    """Which (input, output) pairs to run and which are already done, and why each is run."""

    todo: list[tuple[Path, Path]] = field(default_factory=list)
    done: list[tuple[Path, Path]] = field(default_factory=list)
    reasons: collections.Counter = field(default_factory=collections.Counter)

    @property
    def skipped(self) -> int:
        return len(self.done)

    @property
    def redone(self) -> int:
        """Outputs that existed and are made again."""
        return sum(n for reason, n in self.reasons.items() if reason != MISSING)

    def why(self) -> str:
        """``"2 redone: 1 made with other settings (model …); 1 input changed since …"`` or ""."""
        parts = [f"{n} {reason}" for reason, n in self.reasons.most_common() if reason != MISSING]
        return f"{self.redone} redone: " + "; ".join(parts) if parts else ""

    def line(self) -> str:
        """What a resumed run is about to do, e.g. ``resuming: 3 to do, 10 already done (skipped);
        2 redone: …``."""
        text = f"resuming: {len(self.todo)} to do, {self.skipped} already done (skipped)"
        return text + (f"; {self.why()}" if self.redone else "")


def plan(pairs, manifest: Manifest, made, scale, *, overwrite: bool = False, threads: int = 16) -> ResumePlan:
    """Split ``(input, output)`` pairs into what is done and what to run. ``made(src)`` and
    ``scale(src)`` give a pair's recipe and its image scale (None: a video). The outputs' headers
    are read on ``threads`` threads (it is I/O)."""
    import concurrent.futures

    pairs = list(pairs)
    result = ResumePlan()
    if overwrite:
        result.todo = pairs
        result.reasons.update(OVERWRITE if Path(out).is_file() else MISSING for _, out in pairs)
        return result
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        reasons = list(pool.map(lambda p: manifest.reason(p[0], p[1], made(p[0]), scale(p[0])), pairs))
    for pair, reason in zip(pairs, reasons):
        if reason is None:
            result.done.append(pair)
        else:
            result.todo.append(pair)
            result.reasons[reason] += 1
    manifest.compact()
    return result


__all__ = ["MANIFEST_NAME", "Manifest", "ResumePlan", "extend", "file_stat", "plan", "recipe", "weights_id"]
