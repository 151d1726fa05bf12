"""Round 29: the ``longcat-vc`` command and video input/output on odd inputs (non-square pixels, ...)."""

import os
import subprocess

import numpy as np
import pytest

from longcat_vc.video_io import read_video, write_video
from test_video_io_hostile import _ffmpeg  # tests/vc is on sys.path (pytest's default prepend import mode)


def _smooth_frames(rng, n, h, w):
    """Smooth random frames (low-frequency), so resampling them compares well across scalers."""
    small = rng.integers(0, 256, (n, 4, 5, 3)).astype(np.float64)
    yy = np.linspace(0, 3, h)[:, None]
    xx = np.linspace(0, 4, w)[None, :]
    y0, x0 = np.floor(yy).astype(int).clip(0, 2), np.floor(xx).astype(int).clip(0, 3)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    out = (small[:, y0, x0] * (1 - fy) * (1 - fx) + small[:, y0 + 1, x0] * fy * (1 - fx)
           + small[:, y0, x0 + 1] * (1 - fy) * fx + small[:, y0 + 1, x0 + 1] * fy * fx)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _square_and_anamorphic(ffmpeg, tmp_path, n, h, w, sar):
    """Paths of a square-pixel clip of n random smooth frames and of the same clip re-tagged with ``sar``
    (lossless yuv444, so only the pixel aspect differs)."""
    src = str(tmp_path / "square.mp4")
    write_video(src, _smooth_frames(np.random.default_rng(), n, h, w), fps=15, crf=0)
    ana = str(tmp_path / "anamorphic.mp4")
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-i", src, "-vf", f"setsar={sar}", "-c:v", "libx264",
                    "-crf", "0", "-pix_fmt", "yuv444p", ana], check=True)
    return src, ana


@pytest.mark.parametrize("sar", ["2/1", "8/9"])
def test_non_square_pixels_are_read_at_the_display_aspect(tmp_path, sar):
    """A clip with a sample aspect ratio other than 1 (anamorphic DVD / HDV / broadcast) was read at its
    stored size, its pixels taken as square: the model's bucket came from the wrong aspect, the model saw a
    squashed (or stretched) picture and the output mp4 (SAR 1) showed the input part squashed too. Frames
    now come out as players show them, width scaled by the SAR (ffmpeg's scale=iw*sar:ih)."""
    ffmpeg = _ffmpeg()
    h, w = 48, 72
    src, ana = _square_and_anamorphic(ffmpeg, tmp_path, 6, h, w, sar)
    num, den = map(int, sar.split("/"))
    dw = int(round(w * num / den))
    raw = subprocess.run([ffmpeg, "-loglevel", "error", "-i", ana, "-vf", "scale=iw*sar:ih:flags=bicubic",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    ref = np.frombuffer(raw, np.uint8).reshape(-1, h, dw, 3).astype(np.float64)
    got = read_video(ana)
    assert got.frames.shape == (6, h, dw, 3), f"read at the stored size {got.frames.shape[1:3]}, shown {h}x{dw}"
    assert np.abs(got.frames.astype(np.float64) - ref).mean() < 2.0
    # square pixels: unchanged, the stored size
    assert read_video(src).frames.shape == (6, h, w, 3)


@pytest.mark.parametrize("sar", ["2/1", "8/9", "1/1"])
def test_non_square_pixels_imageio_ffmpeg_fallback_agrees_with_pyav(tmp_path, monkeypatch, sar):
    """Without PyAV the imageio-ffmpeg reader is used: it read non-square-pixel clips at their stored size
    too. Both readers now give the same display-size frames (square pixels: the stored frames, unscaled)."""
    from longcat_vc import video_io

    ffmpeg = _ffmpeg()
    h, w = 48, 72
    src, ana = _square_and_anamorphic(ffmpeg, tmp_path, 5, h, w, sar)
    via_av = read_video(ana)
    monkeypatch.setattr(video_io, "_have_pyav", lambda: False)
    via_ffmpeg = read_video(ana)
    assert via_ffmpeg.frames.shape == via_av.frames.shape
    assert np.abs(via_ffmpeg.frames.astype(np.float64) - via_av.frames.astype(np.float64)).mean() < 2.0
    if sar == "1/1":
        assert via_ffmpeg.frames.shape == (5, h, w, 3)
        assert np.array_equal(via_ffmpeg.frames, via_av.frames)


def test_timings_json_total_of_continue_refine_counts_stage1_as_the_line_does(tmp_path, capsys):
    """``continue --refine --timings-json``: the printed line's total counts the 480p stage 1 (load + stage 1 +
    refinement + write), but the JSON's ``timings.total`` was the refinement's alone, so load + total + write
    from the JSON fell short of the run by the whole stage 1 (most of it) without a word. The JSON's total now
    counts stage 1 too, as the line; the stage-1 and refinement parts stay under their own keys."""
    import argparse
    import json
    import re

    from longcat_vc import cli
    from longcat_vc.stages import VideoContinuationOutput

    rng = np.random.default_rng()
    s1 = {k: float(rng.uniform(1, 5)) for k in ("text", "vae_encode", "cache_build", "denoise", "decode")}
    s1["steps"], s1["total"] = 2, float(rng.uniform(50, 70))  # the run < 100 s: the line shows 2 decimals
    ref = {k: float(rng.uniform(1, 5)) for k in ("text", "vae_encode", "cache_build", "denoise", "decode")}
    ref["steps"], ref["total"] = 5, float(rng.uniform(10, 20))
    ref["stage1"] = s1
    frames = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    out = VideoContinuationOutput(frames, None, 30.0, 4, 2, (64, 64), ref)
    args = argparse.Namespace(out=str(tmp_path / "o.mp4"), crf=18, timings_json=str(tmp_path / "t.json"))
    load = 3.0
    cli._write_out(args, out, load, 1, __import__("sys").stderr, "refine (720p)", extra={"mode": "distill"})
    err = capsys.readouterr().err
    line_total = float(re.search(r"total ([0-9.]+)", err).group(1))
    t = json.load(open(args.timings_json))["timings"]
    assert abs(t["load"] + t["total"] + t["write"] - line_total) < 0.02, (t["total"], line_total)
    assert abs(t["total"] - (s1["total"] + ref["total"])) < 1e-9
    assert t["stage1"]["total"] == s1["total"] and t["denoise"] == ref["denoise"]


@pytest.mark.parametrize("flag", ["--out", "--timings-json"])
def test_an_output_under_a_file_is_named_as_such_not_as_a_missing_folder(tmp_path, capsys, flag):
    """``--out in.mp4/out.mp4`` (the input file taken for a folder) said "output folder does not exist: in.mp4"
    with exit 1 while in.mp4 exists: the message sent the user to create a folder that would clash with their
    input. It now says the path is a file (exit 2, a bad argument); write_video says the same."""
    from longcat_vc import cli

    rng = np.random.default_rng()
    inp = str(tmp_path / "in.mp4")
    write_video(inp, rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), fps=15)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    under = os.path.join(inp, "out.mp4")
    out = under if flag == "--out" else str(tmp_path / "o.mp4")
    argv = ["continue", inp, "--prompt", "a", "--checkpoint", str(ckpt), "--out", out, "--device", "cpu"]
    if flag == "--timings-json":
        argv += ["--timings-json", os.path.join(inp, "t.json")]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "is a file, not a folder" in err and "does not exist" not in err
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        write_video(under, rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8), fps=15)
    assert read_video(inp).num_frames == 6  # the input untouched


def test_imageio_ffmpeg_fallback_reads_each_frame_of_a_variable_rate_clip_once(tmp_path, monkeypatch):
    """Without PyAV the imageio-ffmpeg reader let ffmpeg resample a variable-frame-rate clip (phones, screen
    recordings) to a constant rate: a 24-frame clip came back with duplicated frames (more than it holds) while
    its fps said the average rate, so the model got stretched (slowed) motion and the output repeated frames,
    and the two backends disagreed. Every decoded frame now comes once, as with PyAV."""
    from longcat_vc import video_io

    ffmpeg = _ffmpeg()
    rng = np.random.default_rng()
    n = 24
    frames = _smooth_frames(rng, n, 32, 48)
    frames[:, :8, :8] = (np.arange(n) * 10)[:, None, None, None]  # a per-frame grey mark: duplicates show
    src = str(tmp_path / "cfr.mp4")
    write_video(src, frames, fps=30, crf=0)
    vfr = str(tmp_path / "vfr.mp4")
    # the first half at 30 fps, the second at 7.5 fps (each frame held 4/30 s)
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-i", src, "-vf",
                    f"setpts='if(lt(N,{n // 2}),N,{n // 2}+(N-{n // 2})*4)/(30*TB)'", "-fps_mode", "vfr",
                    "-c:v", "libx264", "-crf", "0", "-pix_fmt", "yuv444p", vfr], check=True)
    via_av = read_video(vfr)
    monkeypatch.setattr(video_io, "_have_pyav", lambda: False)
    via_ffmpeg = read_video(vfr)
    assert via_av.num_frames == n
    assert via_ffmpeg.num_frames == n, f"{via_ffmpeg.num_frames} frames read from a {n}-frame clip"
    marks = via_ffmpeg.frames[:, 2:6, 2:6].astype(np.float64).mean(axis=(1, 2, 3))  # inside the mark
    assert np.abs(marks - np.arange(n) * 10).max() < 5  # a repeated or skipped frame is 10 off
    assert abs(via_ffmpeg.fps - via_av.fps) < 0.01 * via_av.fps
