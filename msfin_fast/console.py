"""What a long job shows on a terminal and how it stops: progress lines and signals.

One :class:`Bar` draws every progress display of the package (a folder's images, a video's
frames, training steps): a bar redrawn in place on a terminal, plain lines otherwise (a log file,
a pipe). :func:`on_signals` installs signal handlers for a block, in the main thread only, and puts
the previous ones back after; the CLI turns SIGTERM and SIGHUP into :class:`Terminated` with it, and
training turns Ctrl-C into "save and stop".
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time


def printable(text: str) -> str:
    """``text`` with control characters (a newline in a file name) written as escapes, so that a
    progress line stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def clock(seconds: float) -> str:
    """Seconds as m:ss (h:mm:ss past an hour), for an ETA."""
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Bar:
    """A progress display of ``total`` units on ``stream`` (default stderr): on a terminal one line
    redrawn in place (``draw``), elsewhere one line per ``draw`` the caller asks to keep (``keep``).
    ``rate(done)`` is units per second since the bar started, from ``start`` units."""

    width = 30

    def __init__(self, total: int | None, *, enabled: bool = True, stream=None, start: int = 0):
        self.total, self.enabled, self.start_count = total, enabled, start
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = self.last_draw = time.perf_counter()
        self.open = False  # a tty line is drawn and not yet ended

    def rate(self, done: int) -> float:
        return (done - self.start_count) / max(time.perf_counter() - self.started, 1e-9)

    def eta(self, done: int) -> float:
        """Seconds left at the rate so far (0 without a total)."""
        if not self.total:
            return 0.0
        return max(self.total - done, 0) / max(self.rate(done), 1e-9)

    def bar(self, done: int) -> str:
        filled = min(self.width, self.width * done // max(self.total or 1, 1))
        return f"[{'#' * filled}{'.' * (self.width - filled)}]"

    def draw(self, text: str, *, keep: bool = False, final: bool = False) -> None:
        """Show ``text``: redrawn in place on a terminal (ended with a newline when ``final``);
        written as its own line elsewhere when ``keep`` or ``final``."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write(f"\r{text}")
            self.open = not final
            if final:
                self.stream.write("\n")
        elif keep or final:
            self.stream.write(f"{text}\n")
        else:
            return
        self.last_draw = time.perf_counter()
        self.stream.flush()

    def due(self, every: float) -> bool:
        """Whether ``every`` seconds have passed since the last draw."""
        return time.perf_counter() - self.last_draw >= every

    def close(self) -> None:
        """End a line left open on a terminal."""
        if self.enabled and self.tty and self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


class Progress(Bar):
    """A folder's files: ``step(label)`` after each; on a terminal a bar with files per second and
    the ETA, elsewhere ``[3/12] name, ETA 0:42`` lines (the last without an ETA)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        super().__init__(total, enabled=enabled, stream=stream)
        self.done = 0

    def step(self, label: str) -> None:
        self.done += 1
        label = printable(label)
        if self.tty:
            text = (f"{self.bar(self.done)} {self.done}/{self.total} {self.rate(self.done):.2f} img/s, "
                    f"ETA {clock(self.eta(self.done))}  {label[:40]:<40}")
        elif self.done < self.total:
            text = f"[{self.done}/{self.total}] {label}, ETA {clock(self.eta(self.done))}"
        else:
            text = f"[{self.done}/{self.total}] {label}"
        self.draw(text, keep=True, final=self.done == self.total)


class FrameProgress(Bar):
    """A video's frames, as ``upscale_video``'s ``progress(done, total, exact)``: a bar with fps and
    ETA on a terminal, else a line every ``every`` seconds and at the end."""

    def __init__(self, label: str, stream=None, every: float = 5.0):
        super().__init__(None, stream=stream)
        self.label, self.every = printable(label), every

    def __call__(self, done: int, total: int | None, exact: bool) -> None:
        self.total = total
        finished = total is not None and done >= total
        if not (self.tty or finished or self.due(self.every)):
            return
        fps = self.rate(done)
        if total:
            text = (f"{self.bar(done)} {done}/{'' if exact else '~'}{total} frames, {fps:.1f} fps, "
                    f"ETA {clock(self.eta(done))}")
        else:
            text = f"{done} frames, {fps:.1f} fps"
        if self.tty:
            self.draw(f"{self.label[:30]}: {text}   ")
        else:
            self.draw(f"{self.label}: {text}", keep=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class ImageProgress(Bar):
    """One image's run, on a terminal only, once it has taken ``after`` seconds: as
    ``tiling.tile_progress``'s callback ``(done, total)`` a bar of tiles with the ETA; without tiles
    (one whole-image call, which reports nothing until it ends) the seconds so far. A thread redraws
    it every ``every`` seconds; ``close`` stops it and clears the line."""

    def __init__(self, label: str, stream=None, after: float = 1.0, every: float = 0.5):
        super().__init__(None, stream=stream)
        self.enabled = self.enabled and self.tty
        self.label, self.after, self.every = printable(label)[:30], after, every
        self.done, self.pass_start, self.width_drawn = 0, self.started, 0
        self._stop = threading.Event()
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="msfin-image-progress", daemon=True)
            self._thread.start()

    def __call__(self, done: int, total: int) -> None:
        if done < self.done:  # another pass (self-ensemble, a retry): its own ETA
            self.pass_start = time.perf_counter()
        self.done, self.total = done, total

    def text(self) -> str:
        now = time.perf_counter()
        if self.total:
            rate = self.done / max(now - self.pass_start, 1e-9)
            left = (self.total - self.done) / rate if self.done else None
            eta = "…" if left is None else clock(left)
            return f"{self.label}: {self.bar(self.done)} tile {self.done}/{self.total}, ETA {eta}"
        return f"{self.label}: upscaling the whole image, {clock(now - self.started)} so far"

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            if time.perf_counter() - self.started >= self.after:
                text = self.text()
                self.width_drawn = max(self.width_drawn, len(text))
                self.draw(text.ljust(self.width_drawn))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.enabled and self.open:
            self.stream.write("\r" + " " * self.width_drawn + "\r")
            self.stream.flush()
            self.open = False


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP: the terminal closed), raised in the main thread so that it unwinds like
    Ctrl-C: temporary files are removed, training saves its checkpoint, a local Ray cluster the
    command started is shut down, and the exit status is 128 + the signal (143, 129)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = int(signum)


#: The signals that end a command as Ctrl-C does: SIGTERM, and SIGHUP where there is one.
STOP_SIGNALS = (signal.SIGTERM,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


@contextlib.contextmanager
def on_signals(handler, signals=STOP_SIGNALS):
    """``handler(signum, frame)`` for ``signals`` while the block runs, the previous handlers after.
    Outside the main thread (where Python cannot set handlers) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def stop_signals_interrupt():
    """SIGTERM and SIGHUP raise :class:`Terminated` in the main thread while the block runs."""
    def handler(signum, frame):
        raise Terminated(signum)

    return on_signals(handler)
