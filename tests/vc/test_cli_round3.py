"""``longcat-vc`` findings of the third audit (2026-12-06); each test fails on the code before.

- ``continue`` wrote only the input + new frames at the input's size, so the README's two-step
  flow (``continue``, then ``refine STAGE1 --video INPUT``) fed ``refine`` the whole input as "stage 1":
  a wrong video. ``--stage1-out`` writes the clip ``refine`` takes.
- ``--input-fps`` was checked against --cond-frames before the 15 fps subsampling: exit 1 after the load.
- ``--fp8 --fuse-lora --refine`` failed after the whole 480p stage; a bad WORLD_SIZE gave a message
  naming no variable.
"""

import os

import numpy as np
import pytest

from longcat_vc import cli
from longcat_vc.pipeline import VideoContinuationOutput, VideoContinuationPipeline
from longcat_vc.video_io import read_video, write_video
from vc_components import refine_checkpoint_in

RUN = ["--device", "cpu", "--dtype", "fp32", "--attn-backend", "torch", "--no-progress", "--frames", "9",
       "--cond-frames", "5", "--steps", "1", "--resolution", "32x64", "--mode", "distill", "--seed", "4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return refine_checkpoint_in(tmp_path_factory, "ckpt")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    # smooth frames: the H.264 round trip of the stage-1 file stays close to the decoded clip
    t, y, x = np.meshgrid(np.arange(16), np.arange(36), np.arange(70), indexing="ij")
    base = np.stack([(x * 3 + t * 5) % 256, (y * 5 + t * 3) % 256, (x + y + t * 7) % 256], -1)
    path = str(tmp_path_factory.mktemp("in") / "in.mp4")
    write_video(path, base.astype(np.uint8), fps=15)
    return path


def _cli(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def test_stage1_out_feeds_refine_the_clip_continue_refine_uses(ckpt, video, tmp_path, capsys, monkeypatch):
    seen = []

    def spy(self, stage1, prompt="", **kw):
        seen.append((stage1, kw))
        if isinstance(stage1, VideoContinuationOutput):
            return stage1
        return VideoContinuationOutput(frames=stage1, latents=None, fps=15.0, num_input_frames=0,
                                       num_new_frames=stage1.shape[0], size=stage1.shape[1:3])

    monkeypatch.setattr(VideoContinuationPipeline, "refine", spy)
    s1 = str(tmp_path / "s1.mp4")
    rc, err = _cli(["continue", video, "--prompt", "a cat", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                    "--stage1-out", s1, "--refine"] + RUN, capsys)
    assert rc == 0, err
    assert "the stage-1 clip, 9 frames at 64x32" in err
    clip = seen[0][0].model_frames  # what `continue --refine` hands to refine
    got = read_video(s1)
    assert got.frames.shape == clip.shape == (9, 32, 64, 3) and got.fps == 15.0
    # H.264 (crf 18) of the same frames, not the input: the input frames differ from the clip by far more
    assert np.abs(got.frames.astype(float) - clip).mean() < 6.0
    # the two-step flow: refine reads STAGE1 as that clip and the input for the cond frames
    rc, err = _cli(["refine", s1, "--video", video, "--checkpoint", ckpt, "--out", str(tmp_path / "r.mp4"),
                    "--cond-frames", "10", "--device", "cpu", "--dtype", "fp32", "--no-progress", "--resolution", "64x64"],
                   capsys)
    assert rc == 0, err
    stage1, kw = seen[1]
    assert stage1.shape == (9, 32, 64, 3) and np.array_equal(stage1, got.frames)
    assert kw["video"].frames.shape[0] == 16 and kw["num_cond_frames"] == 10


@pytest.mark.parametrize("flag", ["--out", "--timings-json"])
def test_stage1_out_cannot_be_another_output(ckpt, video, tmp_path, capsys, flag):
    same = str(tmp_path / "x.mp4")
    argv = ["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--stage1-out", same] + RUN
    argv += ["--out", same] if flag == "--out" else ["--out", str(tmp_path / "o.mp4"), "--timings-json", same]
    rc, err = _cli(argv, capsys)
    assert rc == 2 and f"--stage1-out {same} is the same file as {flag}" in err
    rc, err = _cli(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                    "--stage1-out", video] + RUN, capsys)
    assert rc == 2 and "is the input" in err


def test_input_fps_counted_after_subsampling(ckpt, video, tmp_path, capsys):
    # 16 frames declared at 60 fps: every 4th frame at 15 fps = 4 frames, fewer than 5 cond frames
    out = str(tmp_path / "o.mp4")
    rc, err = _cli(["continue", video, "--prompt", "a", "--checkpoint", str(tmp_path / "none"), "--out", out,
                    "--input-fps", "60"] + RUN, capsys)
    assert rc == 2, err
    assert "4 frames (every 4th frame, about 15 fps), fewer than --cond-frames 5" in err and not os.path.exists(out)


def test_fp8_fuse_lora_refine_refused_before_load(ckpt, video, tmp_path, capsys, monkeypatch):
    import longcat_vc.fp8 as fp8

    monkeypatch.setattr(fp8, "check_fp8_device", lambda device: None)  # a CPU stands in for an fp8 GPU
    rc, err = _cli(["continue", video, "--prompt", "a", "--checkpoint", str(tmp_path / "none"), "--out",
                    str(tmp_path / "o.mp4"), "--fp8", "--fuse-lora", "--refine"] + RUN, capsys)
    assert rc == 2 and "--fp8 with --fuse-lora quantises the distill LoRA" in err, err


def test_bad_world_size_named(ckpt, video, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    argv = ["continue", video, "--prompt", "a", "--checkpoint", str(tmp_path / "none"), "--out",
            str(tmp_path / "o.mp4")] + RUN
    rc, err = _cli(argv + ["--context-parallel", "2"], capsys)
    assert rc == 2 and "WORLD_SIZE: expected an int (torchrun sets it), got 'abc'" in err, err
    rc, err = _cli(argv, capsys)  # not read without context parallelism: the run goes on to the load
    assert "WORLD_SIZE" not in err and "not found" in err


def test_init_distributed_names_bad_torchrun_variables(monkeypatch):
    from longcat_vc.parallel import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an int"):
        init_distributed(2, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK: expected an int"):
        init_distributed(2, "cpu")


def test_refine_with_lora_fused_into_fp8_weights_refused_before_work(ckpt):
    import torch

    from longcat_vc.fp8 import quantize_dit_fp8

    pipe = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="distill",
                                                     fuse_lora=True)
    quantize_dit_fp8(pipe.dit, emulate=True)  # what from_pretrained(fp8=True) does after the fuse, on a GPU
    vid = np.random.default_rng(0).integers(0, 255, (26, 64, 64, 3), dtype=np.uint8)
    calls = []
    pipe.encode_text = lambda *a, **k: calls.append("encode_text")  # any work at all would call it first
    match = "fp8 weights were quantised with its LoRA fused in"
    with pytest.raises(ValueError, match=match):
        pipe.extend(vid, "a cat", segments=2, resolution=(32, 32), num_frames=9, num_cond_frames=5,
                    num_inference_steps=1, refine=True, refine_resolution=(64, 64), progress=False)
    with pytest.raises(ValueError, match=match):
        pipe.refine(vid[:9], "a cat", video=vid, resolution=(64, 64), num_inference_steps=1, progress=False)
    assert calls == []


@pytest.mark.parametrize("value, refused", [("true", False), ("1", False), ("0", True), ("", True)])
def test_cli_triton_on_cpu_follows_tritons_reading_of_the_variable(ckpt, video, tmp_path, capsys, monkeypatch,
                                                                   value, refused):
    import longcat_kernels.dispatch as d

    monkeypatch.setenv("TRITON_INTERPRET", value)
    argv = ["continue", video, "--prompt", "a", "--checkpoint", str(tmp_path / "none"), "--out",
            str(tmp_path / "o.mp4")] + RUN + ["--attn-backend", "triton"]
    rc, err = _cli(argv, capsys)
    assert ("needs TRITON_INTERPRET=1" in err) == refused == (not d.triton_interpret()), err


def test_cli_no_progress_hides_the_loading_bar(ckpt, video, tmp_path, capsys):
    rc, err = _cli(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4")] + RUN,
                   capsys)
    assert rc == 0 and "Loading DiT" not in err, err


def test_continue_refine_checks_the_refinements_memory_before_stage_1(ckpt, video, tmp_path, capsys, monkeypatch):
    # `continue --refine` checked the refinement's fit only when the refinement started, after stage 1
    from longcat_vc import refine as rf
    from longcat_vc.memory import MemoryModeError

    seen = []

    def fits(pipe, size, n_refine, nc, **kw):
        seen.append((size, n_refine, nc, kw["offload_kv_cache"]))
        raise MemoryModeError("refine needs more memory (stand-in)")

    def no_stage1(self, *a, **k):
        raise AssertionError("stage 1 ran before the refinement's memory was checked")

    monkeypatch.setattr(rf, "check_refine_fits", fits)
    monkeypatch.setattr(VideoContinuationPipeline, "__call__", no_stage1)
    rc, err = _cli(["continue", video, "--prompt", "a cat", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                    "--refine"] + RUN, capsys)
    assert rc != 0 and "refine needs more memory (stand-in)" in err, err
    # 9 stage-1 frames at 32x64 -> 18 refine frames, 2 x 5 cond frames from the ~30 fps input
    assert seen == [(rf.refine_bucket(32, 64), 18, 10, None)]
