"""The input side: demux and decode with timestamps (variable frame rate kept, corrupt packets
skipped, backward timestamps repaired), each frame converted to RGB with its stream's colour matrix
and range; audio and subtitle packets pass along untouched, in file order."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import ImageReadError, InvalidInputError
from .colour import full_range, sws_matrix, sws_range
from .options import import_av
from .summary import VideoSummary


# After the last selected frame, packets of the copied streams are still read this far (seconds):
# muxers interleave streams within a second or so, so their packets up to the cut have arrived.
_TAIL_SECONDS = 10.0



@dataclass
class Frame:
    index: int
    rgb: np.ndarray
    pts: int
    duration: int
    sr: np.ndarray | None = None


@dataclass
class Copy:
    packet: object  # av.Packet of a copied stream


def open_input(av, src: Path):
    try:
        container = av.open(str(src), "r")
    except av.FFmpegError as exc:
        raise ImageReadError(f"{src}: not a video FFmpeg can read ({exc})") from None
    if not container.streams.video:
        kinds = ", ".join(f"{s.type} {s.codec_context.name}" for s in container.streams) or "none"
        container.close()
        raise InvalidInputError(f"{src}: has no video stream (streams: {kinds})")
    return container


def video_stream(container):
    """The stream to upscale: the first video stream that is not a cover picture."""
    for stream in container.streams.video:
        if not stream.disposition & type(stream.disposition).attached_pic:  # cover art, not a video
            return stream
    return container.streams.video[0]


def display_matrix(src: str | Path, index: int) -> tuple[int, ...] | None:
    """The display matrix (FFmpeg's 9 int32s: rotation and flips a player applies, e.g. a phone's
    portrait clip stored landscape) of video stream ``index`` of ``src``, from its first decoded frame;
    None when it has none (or no frame decodes)."""
    import struct

    av = import_av()
    try:
        with av.open(str(src), "r") as container:
            stream = container.streams[index]
            stream.thread_type = "AUTO"
            for packets, frame in enumerate(container.decode(stream)):
                for data in frame.side_data:
                    if "DISPLAYMATRIX" in str(data.type):
                        matrix = struct.unpack("=9i", bytes(data)[:36])
                        return None if matrix == (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30) else matrix
                return None
    except (av.FFmpegError, ValueError, IndexError, struct.error):
        return None
    return None


def frame_count(stream) -> tuple[int | None, bool]:
    """(frames, exact): from the container's count when it has one (mp4, mov), else estimated from
    the duration and the average rate (mkv, webm), else (None, False)."""
    if stream.frames:
        return int(stream.frames), True
    rate = stream.average_rate or stream.guessed_rate
    duration = stream.duration * stream.time_base if stream.duration else None
    if duration is None and stream.container.duration:
        duration = Fraction(stream.container.duration, 1_000_000)
    if rate and duration:
        return int(round(duration * rate)), False
    return None, False



def _frame_to_rgb(frame) -> np.ndarray:
    if frame.format.is_rgb:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", src_colorspace=sws_matrix(frame.colorspace),
                            src_color_range=sws_range(full_range(frame.color_range, frame.format)))


def _packet_time(packet) -> Fraction | None:
    ts = packet.pts if packet.pts is not None else packet.dts
    return None if ts is None else ts * packet.time_base


_MAX_READ_ERRORS = 64  # read errors in a row before the rest of a file is given up


def _packets(container, streams, summary: VideoSummary):
    """The file's packets; a read error is counted as a corrupt packet and reading goes on from
    where FFmpeg resynchronises (a damaged file is read to its end, not abandoned)."""
    av = import_av()
    errors = 0
    while True:
        try:
            for packet in container.demux(streams):
                errors = 0
                yield packet
            return
        except av.FFmpegError:
            summary.corrupt_packets += 1
            errors += 1
            if errors >= _MAX_READ_ERRORS:
                return


def _demux_decode(container, stream, copies: dict, summary: VideoSummary, state: dict):
    """Yield ("copy", packet) and ("frame", frame) in file order.

    A corrupt packet is counted and skipped: one the demuxer flags or cannot read, one the decoder
    rejects, and one the decoder drops without a word (a threaded decoder reports no error; it just
    gives no frame). The last are found by timestamp: a packet whose time has not come out as a frame
    by the time a later frame has. Once ``state["stop"]`` (seconds) is set, video is no longer
    decoded, and reading ends when the file is ``_TAIL_SECONDS`` past it."""
    av = import_av()
    sent: set[int] = set()  # pts of video packets given to the decoder and not yet seen as a frame

    def frames_of(packet):
        try:
            frames = packet.decode()  # an empty packet at the end flushes the decoder
        except av.FFmpegError:
            if packet.pts is None:  # else it is counted below, when its time passes without a frame
                summary.corrupt_packets += 1
            frames = []
        for frame in frames:
            if frame.pts is not None:
                sent.discard(frame.pts)
                lost = [p for p in sent if p < frame.pts]
                summary.corrupt_packets += len(lost)
                sent.difference_update(lost)
            yield frame

    for packet in _packets(container, [stream, *copies.values()], summary):
        stop = state["stop"]
        t = _packet_time(packet)
        if stop is not None and t is not None and t > stop + _TAIL_SECONDS:
            return
        if packet.stream.index != stream.index:
            if packet.size:
                yield "copy", packet
            continue
        if stop is not None:
            continue
        if packet.is_corrupt:
            summary.corrupt_packets += 1
            continue
        if packet.size and packet.pts is not None:
            sent.add(packet.pts)
        for frame in frames_of(packet):
            yield "frame", frame
    if state["stop"] is None:
        summary.corrupt_packets += len(sent)  # never came out, even when the decoder was flushed


def _overlaps(packet, lower: Fraction | None, upper: Fraction | None) -> bool:
    """Whether a copied packet's span [t, t + duration) meets the selection [lower, upper)."""
    t = _packet_time(packet)
    if t is None:
        return True
    end = t + (packet.duration or 0) * packet.time_base
    return (upper is None or t < upper) and (lower is None or (end > lower if end > t else t >= lower))


def decode_frames(container, stream, copies: dict, frames: tuple[int, int | None], summary: VideoSummary):
    """The decode stage: the selected frames as RGB, with timestamps, and the copied streams'
    packets that overlap the selection, in file order. A selection that starts after frame 0 is
    shifted to start at time 0, its copied packets with it.

    For a selection, a copied packet is held until the video shows it is inside: a selected frame
    at or after its time has been decoded (or the selection's end is known). Demuxers put audio
    ahead of the video it plays with, and the decoder adds its own delay, so the end of the
    selection is not known when the packets near it are read."""
    start, stop = frames
    whole = start == 0 and stop is None
    tb = stream.time_base
    state = {"stop": None}
    lower: Fraction | None = None      # the selection's start time (None: from the file's start)
    offset = 0                          # pts subtracted from the video timestamps
    held: list = []                     # copied packets not yet known to be inside or outside
    index, last_pts = -1, None

    def shift(packet):
        if lower is not None and lower != 0:
            delta = round(lower / packet.time_base)
            packet.pts = None if packet.pts is None else packet.pts - delta
            packet.dts = None if packet.dts is None else packet.dts - delta
        return Copy(packet)

    def release(before: Fraction | None, upper: Fraction | None):
        """Yield the held packets that start before ``before`` (all for None) and overlap the
        selection; keep the later ones held."""
        nonlocal held
        keep = []
        for p in held:
            t = _packet_time(p)
            if before is not None and t is not None and t >= before:
                keep.append(p)
            elif _overlaps(p, lower, upper):
                yield shift(p)
        held = keep

    try:
        for kind, obj in _demux_decode(container, stream, copies, summary, state):
            if kind == "copy":
                if whole:
                    yield Copy(obj)
                elif state["stop"] is not None:
                    if _overlaps(obj, lower, state["stop"]):
                        yield shift(obj)
                else:
                    held.append(obj)
                continue
            index += 1
            summary.decoded = index + 1
            pts = obj.pts
            if pts is None or (last_pts is not None and pts <= last_pts):
                pts = 0 if last_pts is None else last_pts + max(int(obj.duration or 0), 1)
                summary.fixed_timestamps += 1
            last_pts = pts
            t = pts * tb
            if index < start:
                # Before the selection: copied packets that end before this frame cannot reach it.
                held = [p for p in held if _overlaps(p, t, None)]
                continue
            if stop is not None and index >= stop:
                state["stop"] = t
                yield from release(None, t)
                continue
            if index == start and start:
                lower, offset = t, pts
            if not whole:
                yield from release(t, None)
            yield Frame(index, _frame_to_rgb(obj), pts - offset, int(obj.duration or 0))
        if index >= start:
            yield from release(None, state["stop"])
    finally:
        container.close()
