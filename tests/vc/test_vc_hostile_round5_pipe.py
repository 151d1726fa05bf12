"""Hostile inputs of the VC pipeline, the refinement, video I/O and the CLI that used to give a silently
wrong answer or an unhelpful crash (fifth audit, 2026-12-07), one section per finding:

A. ``refine`` without cond frames (``video=None``) of a stage-1 clip whose refine frame count is 14, 15
   or 0 (mod 16) (e.g. 8 frames, or 16 with ``spatial_refine_only``): upstream's padding gives the VAE
   4 * n latent frames of which it encodes 1 + 4 (n - 1), so the last frames were never encoded; the
   output held 13 frames where ``num_new_frames`` said 16.
B. ``write_video`` to ``out.gif`` / ``out.png`` / ``out.webm``: an H.264 mp4 under that name, silently
   (``read_video`` could not read the .gif / .png back).
C. ``longcat-vc continue --context-parallel 2 --cfg-parallel --mode distill`` (guidance 1, no CFG batch):
   accepted, and both halves of the ranks ran the same single branch, each sequence-parallel over half
   the ranks (slower than plain context parallelism, without a word).
D. ``longcat-vc continue --resolution 832x480`` for a landscape input (WIDTHxHEIGHT, as ffmpeg writes
   sizes, where the CLI reads HEIGHTxWIDTH): the model ran on the clip squashed to portrait and the
   result was resized back, without a word; ``refine --resolution 1280x704`` the same.
"""
from __future__ import annotations

import contextlib
import math

import pytest

from longcat_vc.refine import refine_padding
from longcat_vc.video_io import read_video, write_video
from vc_components import random_frames, run_cli_without_loading


def _needs_video_backend():
    """Skips where neither PyAV nor imageio-ffmpeg is installed (the GPU machine has no registry access)."""
    import importlib.util

    if importlib.util.find_spec("av") is None and importlib.util.find_spec("imageio_ffmpeg") is None:
        pytest.skip("needs a video backend (av or imageio-ffmpeg) to write an mp4")




# ------------------------------------------------------------------------------------------------ A


def test_refine_padding_without_cond_keeps_every_frame_decodable():
    for n in range(1, 200):
        pad = refine_padding(n, 0)
        assert pad["noise_latents"] % 4 == 0
        assert 1 + 4 * (pad["noise_latents"] - 1) >= n, n  # frames the VAE encodes and decodes
        upstream = math.ceil(math.ceil(n / 4) / 4) * 4
        if 1 + 4 * (upstream - 1) >= n:  # where upstream's padding loses nothing it is kept
            assert pad["noise_latents"] == upstream, n


def test_refine_without_cond_returns_every_frame(refine_pipe):
    out = refine_pipe.refine(random_frames(16, 64, 64), "a cat", resolution=(64, 64), spatial_refine_only=True,
                             generator=1, progress=False)
    assert out.num_new_frames == 16
    assert out.frames.shape == (16, 64, 64, 3) and out.model_frames.shape == (16, 64, 64, 3)


# ------------------------------------------------------------------------------------------------ B


@pytest.mark.parametrize("name", ["out.gif", "out.png", "out.webm", "out.avi"])
def test_write_video_refuses_a_name_of_another_format(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ValueError, match=r"write_video: path must name an mp4 file .*out\."):
        write_video(str(path), random_frames(3, 16, 16), 15)
    assert not path.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["out.MP4", "out.mov", "out"])
def test_write_video_mp4_names_still_written(tmp_path, name):
    _needs_video_backend()
    path = str(tmp_path / name)
    write_video(path, random_frames(3, 16, 16), 15)
    assert read_video(path).num_frames == 3


# ------------------------------------------------------------------------------------------------ C


@pytest.fixture(scope="module")
def in_video(tmp_path_factory):
    _needs_video_backend()
    path = str(tmp_path_factory.mktemp("in") / "in.mp4")
    write_video(path, random_frames(9, 32, 48), fps=15)
    return path


def _cli_no_load(argv, capsys, monkeypatch):
    return run_cli_without_loading(capsys, argv, monkeypatch)


@pytest.mark.parametrize("extra", [["--mode", "distill"], ["--guidance", "1"]])
def test_cli_cfg_parallel_without_guidance_exits_2(tmp_path, capsys, monkeypatch, in_video, extra):
    argv = ["continue", in_video, "--prompt", "a", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o.mp4"),
            "--cond-frames", "5", "--frames", "9", "--context-parallel", "2", "--cfg-parallel"] + extra
    rc, err = _cli_no_load(argv, capsys, monkeypatch)
    assert rc == 2 and "--cfg-parallel needs --guidance > 1" in err, err


# ------------------------------------------------------------------------------------------------ D


@pytest.mark.parametrize("command, res", [("continue", "48x32"), ("continue", "96x32"), ("refine", "128x64")])
def test_cli_resolution_of_the_other_orientation_exits_2(tmp_path, capsys, monkeypatch, in_video, command, res):
    common = ["--checkpoint", str(tmp_path / "no_ckpt"), "--out", str(tmp_path / "o.mp4"), "--resolution", res]
    if command == "continue":
        argv = ["continue", in_video, "--prompt", "a", "--cond-frames", "5", "--frames", "9"] + common
    else:
        argv = ["refine", in_video] + common
    rc, err = _cli_no_load(argv, capsys, monkeypatch)
    h, w = res.split("x")
    assert rc == 2 and f"--resolution {res} is HEIGHTxWIDTH" in err and f"did you mean {w}x{h}?" in err, err


@pytest.mark.parametrize("res", ["32x48", "64x64", "48x64"])
def test_cli_resolution_of_the_same_orientation_or_square_passes(tmp_path, capsys, monkeypatch, in_video, res):
    argv = ["continue", in_video, "--prompt", "a", "--cond-frames", "5", "--frames", "9", "--checkpoint",
            str(tmp_path), "--out", str(tmp_path / "o.mp4"), "--resolution", res, "--device", "cpu"]
    with pytest.raises(AssertionError, match="weights were loaded"):  # every check passed
        _cli_no_load(argv + ["--debug"], capsys, monkeypatch)


def test_api_cfg_parallel_without_guidance_warns(refine_pipe, monkeypatch):
    # the API side of C: cfg_parallel=True with guidance 1 ran both rank halves on the same branch
    # without a word (the multi-process run is tests/vc/test_context_parallel.py's; here the pipeline's
    # view of the DiT's context parallelism is a stand-in that only broadcasts)
    class CP:
        cfg_parallel = True

        @staticmethod
        def broadcast(*xs):
            return xs

        class same_call:  # one process: nothing to agree on
            def __init__(self, *args):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def record(self, *values):
                pass

        @staticmethod
        def checked_region():
            return contextlib.nullcontext()

    monkeypatch.setattr(type(refine_pipe.dit), "context_parallel", property(lambda self: CP()))
    kw = dict(resolution=(32, 32), num_frames=9, num_cond_frames=5, num_inference_steps=1, generator=1,
              progress=False)
    with pytest.warns(UserWarning, match=r"cfg_parallel=True at guidance_scale 1 \(no CFG\)"):
        refine_pipe(random_frames(5, 32, 32), "a cat", guidance_scale=1.0, **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        refine_pipe(random_frames(5, 32, 32), "a cat", guidance_scale=2.0, **kw)
