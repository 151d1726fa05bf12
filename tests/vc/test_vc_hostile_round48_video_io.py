"""Round 48: video reading numerics (display matrices with a mirror, GIF frame delays)."""

import subprocess

import numpy as np
import pytest

from longcat_vc.video_io import read_video, write_video
from test_video_io_hostile import _ffmpeg, _ffmpeg_displayed_frames, _pattern  # tests/vc is on sys.path

H, W = 32, 48


@pytest.mark.parametrize("opts", [
    ["-display_hflip"],
    ["-display_vflip"],
    ["-display_rotation", "90", "-display_hflip"],
    ["-display_rotation", "270", "-display_vflip"],
    ["-display_rotation", "180", "-display_hflip"],
])
def test_display_matrix_with_a_mirror_is_applied_like_ffmpeg(tmp_path, opts):
    """A display matrix that mirrors the picture (hflip / vflip, alone or with a quarter turn) was read by
    its rotation angle only: an hflip came out turned 180 degrees, a vflip not flipped (mean abs error 136
    levels against what ffmpeg and players show). Now the whole matrix is applied, as ffmpeg does."""
    ffmpeg = _ffmpeg()
    src = str(tmp_path / "in.mp4")
    write_video(src, _pattern(), fps=15, crf=0)
    path = str(tmp_path / "mirrored.mp4")
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", *opts, "-i", src, "-c", "copy", path], check=True)
    v = read_video(path)
    quarter = "-display_rotation" in opts and int(opts[1]) % 180
    assert v.frames.shape == ((8, W, H, 3) if quarter else (8, H, W, 3))
    ref = _ffmpeg_displayed_frames(ffmpeg, path, *v.frames.shape[1:3])
    assert np.abs(v.frames.astype(int) - ref.astype(int)).mean() < 1
    sub = read_video(path, target_fps=7.5)  # subsampling while decoding keeps the transform
    np.testing.assert_array_equal(sub.frames, v.frames[::2])


def _gif(tmp_path, durations, n=6):
    from PIL import Image

    ims = [Image.fromarray(f) for f in _pattern(n)]
    path = str(tmp_path / "clip.gif")
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=durations, loop=0)
    return path


def test_gif_frames_of_zero_delay_count_as_ffmpeg_counts_them(tmp_path):
    """A GIF frame with a delay of 0 (no delay set: ffmpeg, the imageio-ffmpeg reader and browsers show it
    for 100 ms) was counted as lasting 0 ms: one such frame among 40 ms ones gave 30 fps where ffmpeg reads
    20 fps, so target_fps=15 kept every 2nd frame (3 of 6) instead of all 6."""
    path = _gif(tmp_path, [0, 40, 40, 40, 40, 40])
    v = read_video(path)
    assert v.num_frames == 6 and v.fps == pytest.approx(20.0)
    assert read_video(path, target_fps=15.0).num_frames == 6


def test_gif_of_only_zero_delays_is_read_at_ffmpegs_10_fps(tmp_path):
    """A GIF whose frames all have delay 0 had no frame rate (taken as 15 fps by the command), while ffmpeg
    and browsers play it at 10 fps (100 ms a frame): the continuation came out 1.5x too fast. Nonzero
    delays are kept as stored (10 ms: 100 fps, as ffmpeg reads it)."""
    assert read_video(_gif(tmp_path, 0)).fps == pytest.approx(10.0)
    assert read_video(_gif(tmp_path, 10)).fps == pytest.approx(100.0)
    assert read_video(_gif(tmp_path, 50)).fps == pytest.approx(20.0)


def test_apng_frames_of_zero_delay_count_as_ffmpeg_counts_them(tmp_path):
    """An animated PNG frame of delay 0 counted as 0 ms: one among 40 ms frames gave 30 fps where ffmpeg's
    APNG demuxer (a zero delay lasts 1/15 s) reads 22.5 fps; all-zero delays gave no rate (ffmpeg: 15 fps)."""
    from PIL import Image

    ims = [Image.fromarray(f) for f in _pattern(6)]
    path = str(tmp_path / "clip.png")
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=[0, 40, 40, 40, 40, 40], loop=0)
    assert read_video(path).fps == pytest.approx(22.5)
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=0, loop=0)
    assert read_video(path).fps == pytest.approx(15.0)
