"""msfin_fast.console: the progress displays (a folder's files, a video's frames) and signals."""

from __future__ import annotations

import io
import os
import re
import signal
import time

import pytest

from msfin_fast.console import (
    FrameProgress,
    ImageProgress,
    Progress,
    Terminated,
    clock,
    on_signals,
    stop_signals_interrupt,
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_folder_bar_on_a_terminal_is_one_line_with_rate_and_eta():
    stream = Terminal()
    bar = Progress(3, stream=stream)
    for name in ("a.png", "b.png", "c\nd.png"):
        bar.step(name)
    out = stream.getvalue()
    assert out.count("\r") == 3 and out.count("\n") == 1 and out.endswith("\n")  # one line, ended at the end
    assert "3/3" in out and "img/s, ETA 0:00" in out and "c\\nd.png" in out
    assert "[" + "#" * 30 + "]" in out


def test_off_a_terminal_each_file_is_its_own_line():
    stream = io.StringIO()
    bar = Progress(2, stream=stream)
    bar.step("a.png")
    bar.step("b.png")
    assert re.fullmatch(r"\[1/2\] a\.png, ETA 0:0\d\n\[2/2\] b\.png\n", stream.getvalue())
    quiet = io.StringIO()
    Progress(2, enabled=False, stream=quiet).step("a.png")
    assert quiet.getvalue() == ""


def test_frames_off_a_terminal_are_a_line_every_few_seconds_and_at_the_end():
    stream = io.StringIO()
    frames = FrameProgress("clip.mp4", stream=stream, every=3600)
    for done in range(1, 5):
        frames(done, 4, exact=False)
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]  # only the last
    assert "clip.mp4: [" in stream.getvalue() and "4/~4 frames" in stream.getvalue()


def test_clock():
    assert (clock(0), clock(65), clock(3725), clock(-3)) == ("0:00", "1:05", "1:02:05", "0:00")


def test_signals_are_handled_in_the_block_and_put_back_after():
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    with on_signals(lambda signum, frame: seen.append(signum)):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(Terminated) as caught, stop_signals_interrupt():
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(1)
    assert caught.value.signum == signal.SIGHUP and signal.getsignal(signal.SIGHUP) is not None


def test_an_images_tiles_on_a_terminal_show_a_bar_with_eta_then_clear():
    stream = Terminal()
    bar = ImageProgress("big.png", stream=stream, after=0.0, every=0.01)
    time.sleep(0.05)
    whole = stream.getvalue()
    assert "big.png: upscaling the whole image, 0:00 so far" in whole  # before any tile is reported
    for done in range(1, 4):
        bar(done, 12)
        time.sleep(0.05)
    bar.close()
    out = stream.getvalue()
    assert "big.png: [" in out and "tile 3/12, ETA 0:0" in out
    assert "\n" not in out and out.endswith("\r")  # redrawn in place, the line cleared at the end
    drawn = stream.tell()
    time.sleep(0.05)
    assert stream.tell() == drawn  # the thread has stopped


def test_an_images_progress_draws_nothing_off_a_terminal_or_before_its_delay():
    stream = io.StringIO()
    bar = ImageProgress("big.png", stream=stream, after=0.0, every=0.01)
    bar(1, 4)
    time.sleep(0.05)
    bar.close()
    assert stream.getvalue() == ""
    quick = Terminal()
    bar = ImageProgress("small.png", stream=quick, after=3600, every=0.01)
    bar(1, 4)
    time.sleep(0.05)
    bar.close()
    assert quick.getvalue() == ""  # a quick image shows nothing
