"""``longcat-vc`` findings of the fourth CLI audit (a hostile user's whole journey with real files on
disk); each test fails on the code before its fix.

- ``--seed`` did not reproduce the output file: PyAV's libx264 with macroblock-tree rate control
  encoded the same frames to different bytes from run to run (decoded pixels up to 25 apart).
- Ctrl-C (or an error) after ``--stage1-out`` was written said "interrupted (no output written)"
  while the complete stage-1 clip was on disk.
"""

import hashlib
import os

import numpy as np
import pytest
import torch

from longcat_vc import cli
from longcat_vc.pipeline import VideoContinuationPipeline
from longcat_vc.video_io import read_video, write_video
from vc_components import refine_checkpoint_in


def _smooth(n=20, h=36, w=70):
    t, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(x * 3 + t * 5) % 256, (y * 5 + t * 3) % 256, (x + y + t * 7) % 256], -1).astype(np.uint8)


def test_write_video_same_frames_same_bytes(tmp_path):
    frames = _smooth()
    digests = set()
    for i in range(8):
        torch.randn(256, 256) @ torch.randn(256, 256)  # the CLI writes after the model ran: a busy heap
        path = str(tmp_path / f"o{i}.mp4")
        write_video(path, frames, 15)
        digests.add(hashlib.md5(open(path, "rb").read()).hexdigest())
    assert len(digests) == 1, digests
    assert read_video(path).frames.shape == frames.shape


# ---------------------------------------------------------------- Ctrl-C / failure after --stage1-out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return refine_checkpoint_in(tmp_path_factory, "ckpt4")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("in4") / "in put ü.mp4")  # a space and non-ASCII in the path
    write_video(path, _smooth(16), fps=15)
    return path


RUN = ["--device", "cpu", "--dtype", "fp32", "--attn-backend", "torch", "--no-progress", "--frames", "9",
       "--cond-frames", "5", "--steps", "1", "--resolution", "32x64", "--mode", "distill", "--seed", "4"]


@pytest.mark.parametrize("exc, rc", [(KeyboardInterrupt, 130), (RuntimeError("refine broke"), 1)])
def test_stop_after_stage1_out_says_the_stage1_clip_was_kept(ckpt, video, tmp_path, capsys, monkeypatch, exc, rc):
    # "interrupted (no output written)" while the complete --stage1-out clip was on disk
    def stop(self, *a, **k):
        raise exc

    monkeypatch.setattr(VideoContinuationPipeline, "refine", stop)
    s1, out = str(tmp_path / "s1.mp4"), str(tmp_path / "o.mp4")
    got = cli.main(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", out, "--stage1-out", s1,
                    "--refine"] + RUN)
    err = capsys.readouterr().err
    assert got == rc, err
    assert os.path.isfile(s1) and not os.path.exists(out)
    assert "no output written" not in err
    assert f"{out} not written; the stage-1 clip {s1} is complete and kept" in err.strip().splitlines()[-1]


# ---------------------------------------------------------------- an existing --out: documented, kept on failure


@pytest.mark.parametrize("command", ["continue", "refine"])
def test_help_says_an_existing_out_is_replaced(command, capsys):
    # replacing an existing --out was nowhere documented (no refusal, no --overwrite flag)
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "existing file is replaced when the run completes" in " ".join(capsys.readouterr().out.split())
    assert "is replaced once the new one is written in full" in " ".join(cli.__doc__.split())


def test_failed_run_keeps_an_existing_out(ckpt, video, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"the user's earlier result")

    def boom(self, *a, **k):
        raise RuntimeError("denoise broke")

    monkeypatch.setattr(VideoContinuationPipeline, "__call__", boom)
    rc = cli.main(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(out)] + RUN)
    assert rc == 1 and "denoise broke" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's earlier result" and os.listdir(tmp_path) == ["o.mp4"]
