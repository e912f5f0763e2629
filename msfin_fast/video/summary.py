"""What one video job did (:class:`VideoSummary`), filled in by the stages as they run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class VideoSummary:
    """What one run did. ``frames`` were upscaled and written; ``copied_packets`` of audio and
    subtitles were copied; ``corrupt_packets`` could not be decoded and were skipped; ``fixed_timestamps``
    frames had a missing or backward timestamp and were placed after their predecessor."""

    src: Path
    dst: Path
    codec: str
    frames: int = 0
    size_in: tuple[int, int] = (0, 0)
    size_out: tuple[int, int] = (0, 0)
    seconds: float = 0.0
    copied_streams: int = 0
    copied_packets: int = 0
    corrupt_packets: int = 0
    fixed_timestamps: int = 0
    decoded: int = 0  # frames decoded, selected or not
    interrupted: bool = False
    kept_partial: bool = False
    rotation: int = 0  # the rotation of the display matrix carried over, in degrees as ``VideoFrame.rotation`` gives it
    # Seconds each stage spent working (not waiting on its queues): decode, compute, encode.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / max(self.seconds, 1e-9)

    def line(self) -> str:
        (w, h), (W, H) = self.size_in, self.size_out
        text = (f"upscaled {self.frames} frame{'s' if self.frames != 1 else ''} of {self.src.name} "
                f"{w}×{h} → {W}×{H} ({self.codec}) in {self.seconds:.2f} s, {self.fps:.2f} fps")
        if self.copied_streams:
            text += f"; {self.copied_streams} stream{'s' if self.copied_streams != 1 else ''} copied " \
                    f"({self.copied_packets} packets)"
        if self.corrupt_packets:
            text += f"; {self.corrupt_packets} corrupt packet{'s' if self.corrupt_packets != 1 else ''} skipped"
        if self.fixed_timestamps:
            text += f"; {self.fixed_timestamps} frame timestamp{'s' if self.fixed_timestamps != 1 else ''} repaired"
        if self.rotation:
            text += f"; display matrix kept (rotation {self.rotation}°)"
        if self.kept_partial:
            text += "; interrupted, partial file kept"
        return text
