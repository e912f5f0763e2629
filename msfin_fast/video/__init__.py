"""Video files: decode → upscale → encode, with PyAV (FFmpeg in-process; ``pip install 'msfin_fast[video]'``).

Three stages joined by bounded queues, so that decoding and encoding overlap the model and memory
stays bounded whatever the clip's length:

  decode   (a thread)  demuxes, decodes the video stream with FFmpeg's own threads, converts each
                       frame to RGB with the stream's colour matrix and range; audio and subtitle
                       packets pass along untouched, in file order;
  compute  (a thread)  batches same-size frames through a :class:`~.run.BatchRunner`: on a GPU one
                       captured CUDA graph and pinned copies serve the whole clip; on a CPU the frames
                       run one at a time, exactly as ``Upscaler.upscale_rgb`` runs them;
  encode   (the caller's thread) converts back to the output pixel format and colour matrix, encodes,
                       and muxes the copied packets beside the video.

Every frame keeps its source timestamp, duration and time base, so variable frame rate survives and
no frame is dropped or repeated. Audio and subtitle streams are copied packet for packet. Colour tags
(primaries, transfer, matrix, range), the sample aspect ratio and the display matrix (a phone's
portrait rotation) are carried over. The encoder is opened with the output's settings and frame
size before any frame is decoded, so a size or option it refuses fails first, not last.

The file is written beside the target under a temporary name and renamed when complete. Ctrl-C (or
any error) removes it, unless ``keep_partial`` asks for a playable file of the frames done so far.
"""

from .job import upscale_video
from .options import (
    CONTAINERS,
    DEFAULT_PIX_FMT,
    VIDEO_SUFFIXES,
    EncodeOptions,
    check_frames,
    is_video,
    list_video_files,
    parse_frames,
)
from .summary import VideoSummary

__all__ = ["CONTAINERS", "DEFAULT_PIX_FMT", "VIDEO_SUFFIXES", "EncodeOptions", "VideoSummary", "check_frames",
           "is_video", "list_video_files", "parse_frames", "upscale_video"]
