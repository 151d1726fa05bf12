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
