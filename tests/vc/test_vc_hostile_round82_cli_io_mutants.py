"""Round 82: mutation testing of ``longcat_vc/cli.py`` argument handling and ``longcat_vc/video_io.py``.

Single-point mutants were applied one at a time and the existing video-io / CLI tests run
(tests/vc/test_video_io*.py, round 19 / 48 io files; test_cli*.py, round 29/37/42/44/49 cli files,
then all 8 CLI files in full for the survivors). One product bug: ``--frames 7 --cond-frames 5`` said
"--frames (7) must be greater than --cond-frames (5)" (7 is rounded down to 5 = 4k+1); the message now
names the count used. Every surviving non-equivalent mutant is killed by the tests below.

| id  | mutant                                                               | before  | now            |
|-----|----------------------------------------------------------------------|---------|----------------|
| V1  | subsample_stride: round -> floor                                     | killed  |                |
| V2  | decode keeps i % stride == stride-1 instead of 0                     | killed  |                |
| V3  | 8-bit image -> BGR (channels reversed)                               | killed  |                |
| V4  | 16-bit gray -> uint8 floors instead of rounding                      | SURVIVED| killed (test 1)|
| V5  | _check_frames accepts 0 frames                                       | SURVIVED| killed (test 2)|
| V6  | atomic_output: no temp cleanup on failure                            | killed  |                |
| V7  | atomic_output writes in place (old file lost on failure)            | killed  |                |
| V8  | check_crf: 51 refused (< instead of <=)                              | SURVIVED| killed (test 3)|
| V9  | write fps: 0 passes the first check                                  | equivalent: rate == 0 check refuses it, ValueError all the same |
| V10 | GIF zero-delay frame counted as 0 ms                                 | killed  |                |
| V11 | subsample_to_fps does not divide fps                                 | killed  |                |
| V12 | subsample_to_fps drops the incoming VideoFrames.stride               | SURVIVED| killed (test 4)|
| V13 | write_video: folder check dropped (encodes, then fails in rename)   | SURVIVED| killed (test 5)|
| V14 | output extension check case-sensitive (".MP4" refused)              | SURVIVED| killed (test 6)|
| V15 | frame folder reads hidden dot files ("._0001.png")                 | SURVIVED| killed (test 7)|
| V16 | odd width written as yuv420p (libx264 refuses)                       | SURVIVED| killed (test 8)|
| V17 | frame folder size check dropped                                      | killed  |                |
| V18 | VideoFrames.stride 0 accepted                                        | SURVIVED| killed (test 9)|
| V19 | imageio-ffmpeg read-back frame count not checked                     | SURVIVED| killed (test 10)|
| C1  | KeyboardInterrupt exit 130 -> 1                                      | killed (round42 piped input) | |
| C2  | UsageError exit 2 -> 1                                               | killed (test_cli bad_inputs) | |
| C3  | other error exit 1 -> 2                                              | killed (test_cli oom)        | |
| C4  | --frames <= --cond-frames check -> <                                 | killed (test_cli bad_inputs) | |
| C5  | --guidance 1 refused (1 <= g -> 1 < g)                               | SURVIVED| killed         |
| C6  | --input-fps 0 accepted                                               | SURVIVED| killed         |
| C7  | --t-thresh 1 refused ((0, 1] -> (0, 1))                              | SURVIVED| killed         |
| C8  | --cond-frames 4k+1 check dropped                                     | killed (test_cli bad_inputs) | |
| C9  | --negative-prompt with --guidance 1 accepted                         | SURVIVED| killed         |
| C10 | --cfg-parallel with odd --context-parallel accepted                  | SURVIVED| killed         |
| C11 | --segments 0 accepted                                                | SURVIVED| killed         |
| C12 | --input-fps inf accepted                                             | SURVIVED| killed         |
| C13 | --cfg-parallel with --guidance 1 accepted                            | SURVIVED| killed         |
| C14 | --frames not rounded down to 4k+1                                    | killed (test_cli e2e)        | |
"""

import os
import random

import numpy as np
import pytest

from longcat_vc import video_io
from longcat_vc.video_io import (
    VideoFrames,
    VideoReadError,
    as_video_frames,
    check_crf,
    read_video,
    subsample_to_fps,
    write_video,
)


def _seed():
    return random.randrange(2**31)


def _frames(rng, f=3, h=8, w=10):
    return rng.integers(0, 256, size=(f, h, w, 3), dtype=np.uint8)


def test_16bit_gray_png_rounds_to_nearest_uint8(tmp_path):
    from PIL import Image

    seed = _seed()
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 65536, size=(6, 7), dtype=np.int64)
    g[0, :3] = [65534, 65535, 0]  # 65534 -> 255 rounded, 254 floored
    Image.fromarray(g.astype(np.uint16)).save(tmp_path / "g.png")
    v = read_video(str(tmp_path / "g.png"))
    ref = np.round(g.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    assert v.frames.shape == (1, 6, 7, 3), seed
    for c in range(3):
        np.testing.assert_array_equal(v.frames[0, ..., c], ref, err_msg=f"seed {seed}")


def test_zero_frame_inputs_are_refused():
    seed = _seed()
    h, w = random.Random(seed).randint(1, 9), random.Random(seed + 1).randint(1, 9)
    with pytest.raises(VideoReadError, match="no frames"):
        as_video_frames(np.zeros((0, h, w, 3), np.uint8))
    with pytest.raises(VideoReadError, match="no frames"):
        as_video_frames(VideoFrames(np.zeros((0, h, w, 3), np.uint8), 30.0))


def test_crf_range_ends_are_inclusive():
    assert check_crf(0) == 0 and check_crf(51) == 51 and check_crf(np.int64(51)) == 51
    for bad in (-1, 52):
        with pytest.raises(ValueError, match="crf"):
            check_crf(bad)


def test_subsampling_composes_with_an_earlier_stride():
    seed = _seed()
    rng = np.random.default_rng(seed)
    fr = _frames(rng, f=12)
    vf = VideoFrames(fr, 30.0, "x", stride=2)  # read at 60 fps with stride 2
    out, s = subsample_to_fps(vf, 15.0)
    assert s == 2 and out.stride == 4 and out.fps == 15.0, seed
    np.testing.assert_array_equal(out.frames, fr[::2])


def _no_encode(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("encoded before the path was checked")

    monkeypatch.setattr(video_io, "_write_av", boom)
    monkeypatch.setattr(video_io, "_write_imageio_ffmpeg", boom)


def test_write_to_a_folder_is_refused_before_encoding(tmp_path, monkeypatch):
    _no_encode(monkeypatch)
    fr = _frames(np.random.default_rng(_seed()))
    with pytest.raises(IsADirectoryError, match="folder"):
        write_video(str(tmp_path), fr)
    with pytest.raises(IsADirectoryError, match="folder"):
        write_video(str(tmp_path / "new") + "/", fr)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["o.MP4", "o.Mov", "o.M4V"])
def test_upper_case_mp4_extensions_are_accepted(tmp_path, monkeypatch, name):
    def fake(tmp, frames, fps, crf, **kw):
        with open(tmp, "wb") as f:
            f.write(b"mp4")

    monkeypatch.setattr(video_io, "_write_av", fake)
    out = write_video(str(tmp_path / name), _frames(np.random.default_rng(_seed())), backend="av")
    assert open(out, "rb").read() == b"mp4"


def test_frame_folder_skips_hidden_files(tmp_path):
    from PIL import Image

    seed = _seed()
    fr = _frames(np.random.default_rng(seed), f=2)
    for i, a in enumerate(fr):
        Image.fromarray(a).save(tmp_path / f"{i + 1:04d}.png")
    (tmp_path / "._0001.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    v = read_video(str(tmp_path))
    np.testing.assert_array_equal(v.frames, fr, err_msg=f"seed {seed}")


@pytest.mark.parametrize("hw", [(8, 9), (9, 8), (9, 9)])
def test_odd_sizes_write_and_read_back(tmp_path, hw):
    pytest.importorskip("av")
    seed = _seed()
    rng = np.random.default_rng(seed)
    fr = np.repeat(rng.integers(0, 256, size=(2, 1, 1, 3), dtype=np.uint8), hw[0], 1).repeat(hw[1], 2)
    out = write_video(str(tmp_path / "o.mp4"), fr, crf=0, backend="av")
    v = read_video(out)
    assert v.frames.shape == fr.shape, seed
    assert np.abs(v.frames.astype(int) - fr.astype(int)).max() <= 6, seed


@pytest.mark.parametrize("stride", [0, -1, 1.0, True])
def test_videoframes_stride_must_be_a_positive_int(stride):
    fr = _frames(np.random.default_rng(_seed()))
    with pytest.raises(ValueError, match="stride"):
        as_video_frames(VideoFrames(fr, 15.0, None, stride))


def test_imageio_ffmpeg_short_file_is_an_error_and_keeps_the_old_output(tmp_path, monkeypatch):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    target = tmp_path / "o.mp4"
    target.write_bytes(b"old")

    def write_frames(path, size, **kw):
        with open(path, "wb") as f:
            while (yield) is not None:
                f.write(b"x")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", write_frames)
    fr = _frames(np.random.default_rng(_seed()), f=random.randint(2, 5))
    monkeypatch.setattr(imageio_ffmpeg, "count_frames_and_secs", lambda p: (len(fr) - 1, 0.0))
    with pytest.raises(OSError, match=f"holds {len(fr) - 1} of the {len(fr)} frames"):
        write_video(str(target), fr, backend="imageio-ffmpeg")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["o.mp4"]


# ---- cli.py: the cheap argument checks run before any model load -------------------------------------

def _args(tmp_path, cmd, *extra):
    from longcat_vc import cli

    (tmp_path / "in.mp4").write_bytes(b"not read by the checks")
    base = [cmd, str(tmp_path / "in.mp4"), "--prompt", "a", "--checkpoint", str(tmp_path / "no_ckpt"),
            "--out", str(tmp_path / "o.mp4")]
    return cli.build_parser().parse_args(base + list(extra))


@pytest.mark.parametrize("cmd", ["continue", "extend"])
@pytest.mark.parametrize("extra, message", [
    (["--input-fps", "0"], "--input-fps must be a positive finite number"),
    (["--input-fps", "inf"], "--input-fps must be a positive finite number"),
    (["--guidance", "0.999"], "--guidance must be >= 1"),
    (["--negative-prompt", "blurry", "--guidance", "1"], "--negative-prompt needs --guidance > 1"),
    (["--cfg-parallel", "--context-parallel", "3", "--guidance", "4"], "even N >= 2"),
    (["--cfg-parallel", "--context-parallel", "2", "--guidance", "1"], "--cfg-parallel needs --guidance > 1"),
    (["--cond-frames", "6"], "--cond-frames must be 4k+1"),
    (["--frames", "7", "--cond-frames", "5"], "--frames (7, used as 5 (frame counts are 4k+1)) must be greater than --cond-frames (5)"),
])
def test_bad_argument_is_a_usage_error_before_loading(tmp_path, cmd, extra, message):
    from longcat_vc import cli

    args = _args(tmp_path, cmd, *extra)
    with pytest.raises(cli.UsageError) as e:
        cli._fail_early(args)
    assert message in str(e.value)


@pytest.mark.parametrize("segments, ok", [("0", False), ("-1", False), ("1", True), ("2", True)])
def test_extend_segments_must_be_at_least_1(tmp_path, segments, ok):
    from longcat_vc import cli

    args = _args(tmp_path, "extend", "--segments", segments)
    if ok:
        cli._fail_early(args)
    else:
        with pytest.raises(cli.UsageError, match="--segments must be >= 1"):
            cli._fail_early(args)


@pytest.mark.parametrize("cmd", ["continue", "extend"])
def test_boundary_values_are_accepted(tmp_path, cmd):
    """--guidance 1 (no CFG) is allowed; so is a tiny positive --input-fps."""
    from longcat_vc import cli

    cli._fail_early(_args(tmp_path, cmd, "--guidance", "1"))
    cli._fail_early(_args(tmp_path, cmd, "--input-fps", "1e-3"))


@pytest.mark.parametrize("t, ok", [("1", True), ("0.5", True), ("1e-6", True), ("0", False), ("1.0001", False),
                                   ("nan", False)])
def test_refine_t_thresh_range_is_half_open(tmp_path, t, ok):
    from longcat_vc import cli

    args = _args(tmp_path, "refine", "--t-thresh", t)
    if ok:
        cli._check_refine_args(args)
        assert args.t_thresh == float(t)
    else:
        with pytest.raises(cli.UsageError, match=r"--t-thresh must be in \(0, 1\]"):
            cli._check_refine_args(args)
