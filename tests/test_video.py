"""Video files: clips are synthesised here with PyAV (nothing is committed), upscaled with MSFIN-S on
the CPU, and read back. Pixels are compared before encoding (``on_frame``), since the encoder is lossy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from helpers import require_module  # noqa: E402

av = require_module("av")  # the video extra

from msfin_fast import EncodeOptions, ImageReadError, InvalidInputError, Upscaler, upscale_video  # noqa: E402
from msfin_fast.cli import main  # noqa: E402

W, H = 64, 48
NTSC = Fraction(30000, 1001)


def picture(i: int, w: int = W, h: int = H) -> np.ndarray:
    """A smooth moving picture (an encoder keeps it well, so decoded output can be compared)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin((x + 2 * i) / 9)
    g = 128 + 100 * np.cos((y - i) / 7)
    b = 255 * (((x - 3 * i) % w) < w / 3)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def make_clip(path, *, n=60, rate=NTSC, pts=None, time_base=None, audio=False, subtitles=False,
              codec="libx264", colour=None, sar=None, fmt=None, size=(W, H), rotation=None):
    """Write a test clip: ``pts`` (in ``time_base``) for variable frame rate, AAC audio, SubRip
    subtitles, colour tags ``(primaries, trc, matrix, range)``, a sample aspect ratio, a frame
    ``size`` (w, h), a display ``rotation`` (degrees, as ``VideoFrame.rotation`` reads it back)."""
    out = av.open(str(path), "w", format=fmt)
    v = out.add_stream(codec, rate=rate)
    v.width, v.height, v.pix_fmt = *size, "yuv420p"
    if rotation is not None:
        v.set_display_rotation(rotation)
    if time_base is not None:
        v.time_base = v.codec_context.time_base = time_base
    if colour is not None:
        cc = v.codec_context
        cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = colour
    if sar is not None:
        v.codec_context.sample_aspect_ratio = sar
    a = out.add_stream("aac", rate=48000) if audio else None
    s = out.add_mux_stream("subrip") if subtitles else None
    if s is not None:
        s.time_base = Fraction(1, 1000)
    mux = out.mux

    for i in range(n):
        frame = av.VideoFrame.from_ndarray(picture(i, *size), format="rgb24")
        if colour is not None:
            frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709",
                                   dst_color_range="JPEG" if colour[3] == 2 else "MPEG")
        frame.pts = i if pts is None else pts[i]
        mux(v.encode(frame))
    seconds = float(n / rate) if pts is None else float((pts[-1] + 1) * time_base)
    if a is not None:
        t = np.arange(int(seconds * 48000)) / 48000
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for j in range(0, len(wave) - 1024, 1024):
            af = av.AudioFrame.from_ndarray(wave[None, j:j + 1024], format="fltp", layout="mono")
            af.sample_rate, af.pts = 48000, j
            out.mux(a.encode(af))
        out.mux(a.encode(None))
    if s is not None:
        for k in range(int(seconds)):
            p = av.Packet(f"second {k}".encode())
            p.stream, p.pts, p.dts, p.duration, p.time_base = s, k * 1000, k * 1000, 800, Fraction(1, 1000)
            out.mux(p)
    mux(v.encode(None))
    out.close()
    return Path(path)


def damage(src, dst, packets: tuple[int, ...]):
    """Copy ``src`` with the video packets numbered in ``packets`` (in file order) replaced by
    random bytes of the same size: the file's structure is intact, those packets' data is not."""
    rng = np.random.default_rng(3)
    with av.open(str(src)) as c, av.open(str(dst), "w") as out:
        o = out.add_stream_from_template(c.streams.video[0])
        k = 0
        for p in c.demux(video=0):
            if not p.size:
                continue
            if k in packets:
                bad = av.Packet(rng.integers(0, 255, p.size, dtype=np.uint8).tobytes())
                bad.pts, bad.dts, bad.duration, bad.time_base = p.pts, p.dts, p.duration, p.time_base
                p = bad
            p.stream = o
            out.mux(p)
            k += 1
    return Path(dst)


def video_times(path) -> list[Fraction]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [f.pts * s.time_base for f in c.decode(s)]


def packets(path, kind: str) -> list[tuple[bytes, Fraction]]:
    with av.open(str(path)) as c:
        s = getattr(c.streams, kind)[0]
        return [(bytes(p), p.pts * p.time_base) for p in c.demux(s) if p.size]


@pytest.fixture(scope="module")
def upscaler(pretrained):
    return Upscaler(pretrained("msfin-s-x4"), device="cpu", backend="cpu")


@pytest.fixture(scope="module")
def ntsc_clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "ntsc.mp4", n=60, audio=True)


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def test_a_2s_ntsc_clip_with_audio(tmp_path, upscaler, ntsc_clip):
    seen = {}
    out = tmp_path / "x4.mp4"
    summary = upscale_video(ntsc_clip, out, upscaler, on_frame=lambda i, lr, sr: seen.setdefault(i, (lr, sr)))

    with av.open(str(ntsc_clip)) as c:  # the source, decoded independently
        src = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        src_duration = c.streams.video[0].duration * c.streams.video[0].time_base
    assert summary.frames == len(src) == 60 and sorted(seen) == list(range(60))
    assert summary.size_in == (W, H) and summary.size_out == (4 * W, 4 * H)
    times = video_times(out)
    assert times == video_times(ntsc_clip) == [i / NTSC for i in range(60)]  # no frame dropped or repeated
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.codec_context.name) == (4 * W, 4 * H, "h264")
        assert s.duration * s.time_base == src_duration == 60 / NTSC  # the last frame keeps its duration
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    # Audio: byte-identical packets at the same times.
    assert packets(out, "audio") == packets(ntsc_clip, "audio") and len(packets(out, "audio")) > 80
    # Pixels before encoding: the decoded frame, and exactly what the Upscaler makes of it.
    for i in (0, 17, 59):
        lr, sr = seen[i]
        assert np.array_equal(lr, src[i])
        assert np.array_equal(sr, upscaler.upscale_rgb(lr))
    # After encoding (lossy): close to them, so the colour conversions on the way out are right.
    # (yuv420p and CRF 18 keep 33–37 dB of this picture; a wrong matrix or range gives 26–28.)
    assert min(psnr(decoded[i], seen[i][1]) for i in range(0, 60, 7)) > 31
    assert "1 stream copied" in summary.line()


def test_pipelined_and_sequential_runs_give_the_same_frames(tmp_path, upscaler, ntsc_clip):
    outs = []
    for pipelined in (True, False):
        frames = {}
        summary = upscale_video(ntsc_clip, tmp_path / f"{pipelined}.mp4", upscaler, frames=(0, 12), batch_size=5,
                                pipelined=pipelined, on_frame=lambda i, lr, sr: frames.setdefault(i, sr))
        assert summary.frames == 12
        outs.append(frames)
    assert outs[0].keys() == outs[1].keys() and all(np.array_equal(outs[0][i], outs[1][i]) for i in outs[0])


def test_variable_frame_rate_keeps_every_timestamp(tmp_path, upscaler):
    tb = Fraction(1, 1000)
    steps = [33, 17, 50, 33, 100, 8, 42, 33, 66, 25, 33, 200, 33, 17, 33]
    pts = list(np.cumsum([0] + steps))
    clip = make_clip(tmp_path / "vfr.mp4", n=len(pts), rate=30, pts=pts, time_base=tb)
    assert video_times(clip) == [p * tb for p in pts]  # the source really is VFR
    out = tmp_path / "vfr_x4.mp4"
    summary = upscale_video(clip, out, upscaler)
    assert summary.frames == len(pts)
    assert video_times(out) == [p * tb for p in pts]


def test_mkv_without_a_frame_count_with_subtitles_and_audio(tmp_path, upscaler):
    clip = make_clip(tmp_path / "clip.mkv", n=45, rate=30, audio=True, subtitles=True)
    with av.open(str(clip)) as c:
        assert c.streams.video[0].frames == 0  # Matroska does not store one
    calls = []
    out = tmp_path / "clip_x4.mkv"
    summary = upscale_video(clip, out, upscaler, progress=lambda done, total, exact: calls.append((done, total, exact)))
    assert summary.frames == 45 and summary.copied_streams == 2
    assert [c[0] for c in calls] == list(range(1, 46))
    assert all(total == 45 and not exact for _, total, exact in calls)  # estimated from duration × rate
    assert video_times(out) == video_times(clip)
    assert packets(out, "subtitles") == packets(clip, "subtitles") and len(packets(out, "subtitles")) == 1
    assert packets(out, "audio") == packets(clip, "audio")


@pytest.mark.parametrize("full_range", [False, True])
def test_colour_tags_and_aspect_ratio_are_carried_over(tmp_path, upscaler, full_range):
    tags = (1, 1, 1, 2 if full_range else 1)  # BT.709 primaries, transfer and matrix; range
    clip = make_clip(tmp_path / "bt709.mp4", n=6, colour=tags, sar=Fraction(4, 3))
    seen = {}
    out = tmp_path / "bt709_x4.mp4"
    upscale_video(clip, out, upscaler, on_frame=lambda i, lr, sr: seen.setdefault(i, (lr, sr)))
    with av.open(str(out)) as c:
        cc = c.streams.video[0].codec_context
        assert (int(cc.color_primaries), int(cc.color_trc), int(cc.colorspace), int(cc.color_range)) == tags
        assert cc.sample_aspect_ratio == Fraction(4, 3)
        decoded = [f.to_ndarray(format="rgb24", src_colorspace="ITU709",
                                src_color_range="JPEG" if full_range else "MPEG") for f in c.decode(video=0)]
    with av.open(str(clip)) as c:
        src = [f.to_ndarray(format="rgb24", src_colorspace="ITU709", src_color_range="JPEG" if full_range else "MPEG")
               for f in c.decode(video=0)]
    assert np.array_equal(seen[3][0], src[3])  # read with the source's own matrix and range
    assert psnr(decoded[3], seen[3][1]) > 31    # written with them


def test_an_untagged_source_is_written_tagged_bt601(tmp_path, upscaler, ntsc_clip):
    out = tmp_path / "x4.mkv"
    upscale_video(ntsc_clip, out, upscaler, frames=(0, 2))
    with av.open(str(out)) as c:
        assert int(c.streams.video[0].codec_context.colorspace) == 6  # SMPTE 170M (BT.601), as it was read


def test_corrupt_packets_are_skipped_and_counted(tmp_path, upscaler, capsys):
    clip = damage(make_clip(tmp_path / "good.mkv", n=40, rate=25), tmp_path / "bad.mkv", (12, 25, 33))
    out = tmp_path / "bad_x4.mkv"
    assert main(["upscale", "-i", str(clip), "-o", str(out), "--model", "msfin-s-x4", "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert "3 corrupt packets skipped" in line and "upscaled 37 frames" in line
    assert len(video_times(out)) == 37


def test_part_of_a_clip_with_its_audio(tmp_path, upscaler, ntsc_clip):
    out = tmp_path / "part.mp4"
    summary = upscale_video(ntsc_clip, out, upscaler, frames="10:40")
    assert summary.frames == 30
    assert video_times(out) == [i / NTSC for i in range(30)]  # starts at 0
    t0, t1 = 10 / NTSC, 40 / NTSC
    src_audio = packets(ntsc_clip, "audio")
    with av.open(str(ntsc_clip)) as c:
        dur = {p.pts: p.duration * p.time_base for p in c.demux(audio=0) if p.size}
    wanted = [(data, t - t0) for data, t in src_audio if t < t1 and t + dur[t / Fraction(1, 48000)] > t0]
    got = packets(out, "audio")
    assert [d for d, _ in got] == [d for d, _ in wanted] and len(got) > 30
    assert all(abs(g - w) <= Fraction(1, 48000) for (_, g), (_, w) in zip(got, wanted))


def _parts(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("keep", [False, True])
def test_an_interrupted_run_removes_or_finishes_its_file(tmp_path, upscaler, ntsc_clip, keep):
    def stop_at_10(i, lr, sr):
        if i == 10:
            raise KeyboardInterrupt

    out = tmp_path / "x4.mp4"
    with pytest.raises(KeyboardInterrupt) as info:
        upscale_video(ntsc_clip, out, upscaler, keep_partial=keep, on_frame=stop_at_10, batch_size=4)
    assert not _parts(tmp_path)
    assert info.value.summary.interrupted and info.value.summary.frames == 10
    if keep:
        assert info.value.summary.kept_partial
        assert video_times(out) == [i / NTSC for i in range(10)]  # playable, with the frames done
    else:
        assert not out.exists()


def test_ctrl_c_in_the_cli(tmp_path, weights_dir):
    clip = make_clip(tmp_path / "long.mp4", n=400, rate=25)
    out = tmp_path / "long_x4.mp4"
    env = dict(os.environ, MSFIN_WEIGHTS_DIR=str(weights_dir))
    proc = subprocess.Popen([sys.executable, "-m", "msfin_fast", "upscale", "-i", str(clip), "-o", str(out),
                             "--model", "msfin-s-x4", "--device", "cpu", "--keep-partial"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 10_000 for p in _parts(tmp_path)):  # frames are being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "kept a playable partial file" in err and not _parts(tmp_path)
    frames = len(video_times(out))
    assert 0 < frames < 400 and f"({frames} frames)" in err


def test_errors_are_named(tmp_path, upscaler, ntsc_clip, capsys):
    audio_only = tmp_path / "audio.mp4"
    with av.open(str(audio_only), "w") as c:
        a = c.add_stream("aac", rate=48000)
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate, af.pts = 48000, 0
        c.mux(a.encode(af))
        c.mux(a.encode(None))
    with pytest.raises(InvalidInputError, match="has no video stream"):
        upscale_video(audio_only, tmp_path / "o.mp4", upscaler)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    with pytest.raises(ImageReadError, match="not a video FFmpeg can read"):
        upscale_video(garbage, tmp_path / "o.mp4", upscaler)
    with pytest.raises(InvalidInputError, match="select no frame .*the clip has 60"):
        upscale_video(ntsc_clip, tmp_path / "o.mp4", upscaler, frames="100:200")
    with pytest.raises(InvalidInputError, match="must end in"):
        upscale_video(ntsc_clip, tmp_path / "o.avi", upscaler)
    with pytest.raises(InvalidInputError, match="cannot hold stream #1 \\(audio, aac\\)"):
        upscale_video(ntsc_clip, tmp_path / "o.webm", upscaler)
    assert not list(tmp_path.glob("o.*")) and not _parts(tmp_path)
    for bad, message in [
        (dict(codec="nope"), "no such encoder"),
        (dict(codec="aac"), "encodes audio, not video"),
        (dict(crf=60), "CRF 60 is out of range for libx264"),
        (dict(crf=20, bitrate="2M"), "not both"),
        (dict(bitrate="fast"), "bitrate 'fast'"),
        (dict(codec="ffv1", crf=10), "no CRF mode"),
        (dict(pix_fmt="rgb48le"), "not one libx264 encodes"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            EncodeOptions(**bad).resolve(".mp4")
    with pytest.raises(InvalidInputError, match="a .webm file cannot hold libx264 video"):
        EncodeOptions(codec="h264").resolve(".webm")
    # The CLI: one line, exit 1, and option errors before any model loads.
    for args, message in [
        (["--frames", "5:2"], "selects nothing"),
        (["--crf", "99"], "out of range"),
    ]:
        assert main(["upscale", "-i", str(ntsc_clip), "-o", str(tmp_path / "o.mp4"), *args]) == 1
        assert message in capsys.readouterr().err
    png = tmp_path / "a.png"
    from PIL import Image
    Image.fromarray(picture(0)).save(png)
    assert main(["upscale", "-i", str(png), "-o", str(tmp_path / "b.png"), "--crf", "20"]) == 1
    assert "--crf only apply to videos" in capsys.readouterr().err
    assert main(["upscale", "-i", str(png), "-o", str(tmp_path / "b.mp4")]) == 1
    assert "must be one too" in capsys.readouterr().err
    assert main(["upscale", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--ray", "--crf", "20"]) == 1
    assert "--crf apply to videos, which --ray does not upscale" in capsys.readouterr().err


def test_cli_folder_with_images_and_videos_and_encoder_options(tmp_path, upscaler, capsys):
    src = tmp_path / "in"
    src.mkdir()
    make_clip(src / "clip.mkv", n=8, rate=24)
    from PIL import Image
    Image.fromarray(picture(1)).save(src / "still.png")
    dst = tmp_path / "out"
    assert main(["upscale", "-i", str(src), "-o", str(dst), "--model", "msfin-s-x4", "--device", "cpu",
                 "--codec", "hevc", "--crf", "24", "--preset", "ultrafast"]) == 0
    out = capsys.readouterr().out
    assert "upscaled 8 frames of clip.mkv" in out and "(libx265)" in out and "upscaled 1 image" in out
    with av.open(str(dst / "clip.mkv")) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "hevc" and (s.width, s.height) == (4 * W, 4 * H)
    assert Image.open(dst / "still.png").size == (4 * W, 4 * H)
    assert main(["upscale", "-i", str(src / "clip.mkv"), "-o", str(tmp_path / "c.webm"), "--model", "msfin-s-x4",
                 "--device", "cpu", "--frames", ":3", "-q"]) == 0
    with av.open(str(tmp_path / "c.webm")) as c:
        assert c.streams.video[0].codec_context.name == "vp9" and len([*c.decode(video=0)]) == 3


def test_outscale_resizes_the_images_of_a_mixed_folder_and_says_the_videos_stay_x4(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    make_clip(src / "clip.mp4", n=3, rate=24)
    Image.fromarray(picture(1)).save(src / "still.png")
    dst = tmp_path / "out"
    assert main(["upscale", "-i", str(src), "-o", str(dst), "-n", "msfin-s-x4", "--device", "cpu", "-s", "2"]) == 0
    assert "msfin-fast: warning: clip.mp4: outscale applies to images; the video is upscaled ×4" in \
        capsys.readouterr().err
    assert Image.open(dst / "still.png").size == (2 * W, 2 * H)
    with av.open(str(dst / "clip.mp4")) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (4 * W, 4 * H)
    assert main(["upscale", "-i", str(src / "clip.mp4"), "-o", str(tmp_path / "c.mp4"), "-s", "2"]) == 1
    assert "-s/--outscale applies to images; videos are upscaled ×4" in capsys.readouterr().err


def test_info_names_the_video_library(capsys):
    assert main(["info"]) == 0
    assert f"video: PyAV {av.__version__}, FFmpeg" in capsys.readouterr().out


@pytest.mark.gpu
def test_on_a_gpu_one_graph_serves_the_clip(tmp_path, ntsc_clip, monkeypatch):
    """60 frames in batches of 8: one CUDA graph captured for the full batches and replayed for all
    seven, one for the last four; every frame within 2 grey levels of the API's."""
    from msfin_fast import run as run_layer

    captured, replayed = [], []

    class Counting(run_layer.CapturedGraph):
        def __init__(self, fn, examples, **kwargs):
            super().__init__(fn, examples, **kwargs)
            captured.append(tuple(examples[0].shape))

        def replay(self, *inputs):
            replayed.append(tuple(inputs[0].shape))
            return super().replay(*inputs)

    monkeypatch.setattr(run_layer, "CapturedGraph", Counting)
    up = Upscaler("msfin-s-x4", device="cuda", dtype="fp16", backend="auto")
    seen = {}
    summary = upscale_video(ntsc_clip, tmp_path / "gpu.mp4", up, batch_size=8,
                            on_frame=lambda i, lr, sr: seen.setdefault(i, (lr, sr)))
    assert summary.frames == 60
    w, h = summary.size_in
    assert captured == [(8, h, w, 3), (4, h, w, 3)]
    assert replayed == [(8, h, w, 3)] * 7 + [(4, h, w, 3)]
    for i in (0, 33, 59):
        lr, sr = seen[i]
        assert np.abs(sr.astype(int) - up.upscale_rgb(lr).astype(int)).max() <= 2


# ---------------------------------------------------------------------------------------------
# What a hostile user found: rotation, encoder refusals, unwritable outputs, noise, partial files


def display_rotation(path) -> tuple[int, bytes | None]:
    """(rotation, the display matrix's bytes or None) of the first frame, as a player reads them."""
    with av.open(str(path)) as c:
        frame = next(c.decode(c.streams.video[0]))
        matrix = next((bytes(d) for d in frame.side_data if "DISPLAYMATRIX" in str(d.type)), None)
        return frame.rotation, matrix


@pytest.mark.parametrize("rotation", [-90, 90])
def test_a_portrait_phone_clip_keeps_its_display_rotation(tmp_path, upscaler, rotation):
    clip = make_clip(tmp_path / "phone.mp4", n=4, rotation=rotation, audio=True)
    source = display_rotation(clip)
    assert source[0] == rotation and source[1] is not None
    summary = upscale_video(clip, tmp_path / "x4.mp4", upscaler)
    assert display_rotation(tmp_path / "x4.mp4") == source  # the same matrix: players turn it the same way
    assert summary.rotation == rotation and f"display matrix kept (rotation {rotation}°)" in summary.line()
    with av.open(str(tmp_path / "x4.mp4")) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (4 * W, 4 * H)  # stored as it came
    plain = upscale_video(make_clip(tmp_path / "plain.mp4", n=2), tmp_path / "plain4.mp4", upscaler)
    assert display_rotation(tmp_path / "plain4.mp4") == (0, None) and plain.rotation == 0


def test_a_frame_size_the_encoder_refuses_fails_before_any_work(tmp_path, upscaler):
    clip = make_clip(tmp_path / "wide.mp4", n=3, size=(4400, 16))  # ×4: 17600×64, over H.264's 16384
    seen = []
    with pytest.raises(InvalidInputError, match="libx264 cannot encode 17600×64 frames") as info:
        upscale_video(clip, tmp_path / "x4.mp4", upscaler, on_frame=lambda *a: seen.append(a[0]))
    assert "--codec libx265" in str(info.value)
    assert seen == [] and not (tmp_path / "x4.mp4").exists() and not _parts(tmp_path)


def test_encoder_settings_ffmpeg_refuses_are_named_before_any_model_loads(tmp_path, ntsc_clip, capfd):
    for args, out, fragments in [
        (["--codec", "vp9"], "o.mov", ["a .mov file of libvpx-vp9 video", "vp9 only supported in MP4"]),
        (["--preset", "bogus"], "o.mp4", ["preset 'bogus' is not a libx264 preset", "veryslow"]),
        (["--codec", "vp9", "--preset", "fast"], "o.webm", ["preset 'fast' is not a libvpx-vp9 cpu-used"]),
    ]:
        assert main(["upscale", "-i", str(ntsc_clip), "-o", str(tmp_path / out), "--model", "msfin-s-x4", *args]) == 1
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("msfin-fast: error:"), err  # no raw FFmpeg lines
        for fragment in fragments:
            assert fragment in err[0], err
    assert not [p for p in tmp_path.iterdir()]


@pytest.mark.parametrize("target", ["/proc/x.mp4", "/sys/x.mp4"])
def test_a_video_to_an_unwritable_place_is_one_line(target, ntsc_clip, one_line_error):
    assert main(["upscale", "-i", str(ntsc_clip), "-o", target, "--model", "msfin-s-x4", "-q"]) == 1
    one_line_error(f"{target}: cannot write")


def test_a_video_over_an_immutable_file_is_one_line(tmp_path, locked, one_line_error):
    clip = make_clip(tmp_path / "c.mp4", n=2)
    target = locked("x4.mp4")
    assert main(["upscale", "-i", str(clip), "-o", str(target), "--model", "msfin-s-x4", "-q"]) == 1
    one_line_error(f"{target}: cannot write")
    assert target.read_bytes() == b"old" and not _parts(tmp_path)


def test_quiet_x265_prints_nothing(tmp_path, ntsc_clip, capfd):
    assert main(["upscale", "-i", str(ntsc_clip), "-o", str(tmp_path / "o.mkv"), "--model", "msfin-s-x4",
                 "--codec", "libx265", "--frames", "0:3", "-q"]) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == "", err  # x265 prints its info lines past FFmpeg's log unless told not to
    assert len(video_times(tmp_path / "o.mkv")) == 3


def test_keep_partial_interrupted_before_the_first_frame_says_so(tmp_path, ntsc_clip, monkeypatch, capsys):
    import msfin_fast.video.job as job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(job, "compute", interrupted)
    out = tmp_path / "x4.mp4"
    assert main(["upscale", "-i", str(ntsc_clip), "-o", str(out), "--model", "msfin-s-x4", "--keep-partial"]) == 130
    err = capsys.readouterr().err
    assert "interrupted before any frame of ntsc.mp4 was encoded; no partial file to keep" in err
    assert not out.exists() and not _parts(tmp_path)


def test_skip_existing_resumes_a_folder_of_videos(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    make_clip(src / "a.mp4", n=3)
    make_clip(src / "b.mkv", n=2)
    args = ["upscale", "-i", str(src), "-o", str(tmp_path / "out"), "--model", "msfin-s-x4", "--skip-existing"]
    assert main(args) == 0
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert main(args) == 0  # nothing left to do
    assert "2 already done (skipped)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == made
    assert main([*args, "--crf", "30"]) == 0  # another encoder setting redoes both
    assert "2 redone: 2 made with other settings (video" in capsys.readouterr().out
