"""Hostile-user inputs to the refinement surface (SPEC 11): ``refine``, ``extend(refine=True)`` and
the ``longcat-vc refine`` / ``continue --refine`` commands. Each bad input must be named before any
model work (the models are replaced by objects that fail on use) and before any weights load (the
CLI cases point at a checkpoint folder that does not exist: reaching the load would exit 1, not 2).
The cases already in test_refine.py / test_hardening.py are not repeated here."""

import os

import numpy as np
import pytest
import torch

from longcat_vc.pipeline import VideoContinuationOutput, VideoContinuationPipeline
from longcat_vc.refine import check_t_thresh, resolve_refine_args
from vc_components import NoModel, forbid_model_work, random_frames, write_refine_checkpoint

SIZE = (64, 64)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_refine_hostile"))
    write_refine_checkpoint(root)
    return VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", attn_backend="torch")


_frames = random_frames


@pytest.fixture
def no_model(pipe, monkeypatch):
    return forbid_model_work(pipe, monkeypatch)


@pytest.mark.parametrize("nc", [False, 0.0, -1])
def test_num_cond_frames_without_video_is_an_int(no_model, nc):
    # False / 0.0 compared equal to 0 and went through as "no cond frames"
    with pytest.raises((TypeError, ValueError), match="num_cond_frames"):
        no_model.refine(_frames(5, 36, 64), video=None, num_cond_frames=nc, resolution=SIZE, progress=False)


@pytest.mark.parametrize("t", [np.float32(0.5), np.float64(1.0), 1])
def test_t_thresh_numpy_scalars_accepted(pipe, t):
    assert check_t_thresh(t) == float(t)
    a = resolve_refine_args(pipe, _frames(5, 36, 64), _frames(12, 40, 72), 5, SIZE, False, t, 2, "np")
    assert a["nc"] == 5 and a["n_refine"] == 10


@pytest.mark.parametrize("t", [np.float32("nan"), np.float64(0.0), torch.tensor(0.5), "0.5"])
def test_t_thresh_bad_values_named(t):
    with pytest.raises((TypeError, ValueError), match="t_thresh"):
        check_t_thresh(t)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_cond_frames=10), "not more than num_cond_frames"),  # 2 latents -> 5 frames, 10 refine frames
        (dict(num_cond_frames=13), "fewer than num_cond_frames"),  # video has 12
        (dict(resolution=(60, 64)), "multiples of 64"),
        (dict(t_thresh=0.0), "t_thresh"),
    ],
)
def test_latent_stage1_checked_before_decode(no_model, kwargs, match):
    # a stage-1 output_type="latent" result was decoded (VAE work) before the checks ran
    st1 = VideoContinuationOutput(None, torch.zeros(1, 16, 2, 4, 8), 15.0, 12, 4, (32, 64), {})
    args = dict(video=_frames(12, 40, 72), num_cond_frames=5, resolution=SIZE, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        no_model.refine(st1, **args)


def test_latent_stage1_bad_latents_named(no_model):
    st1 = VideoContinuationOutput(None, torch.zeros(16, 2, 4, 8), 15.0, 12, 4, (32, 64), {})
    with pytest.raises(ValueError, match="stage1.latents"):
        no_model.refine(st1, video=None, resolution=SIZE, progress=False)


@pytest.mark.parametrize("res, match", [("480p", "refine_resolution"), ((60, 64), "multiples of 64"),
                                        ((64.0, 64), "refine_resolution"), ((0, 64), "positive")])
def test_extend_refine_resolution_checked_before_stage1(no_model, monkeypatch, res, match):
    # a bad refine_resolution surfaced only after every stage-1 segment had run
    monkeypatch.setattr(no_model, "encode_text", NoModel())
    with pytest.raises(ValueError, match=match):
        no_model.extend(_frames(9, 40, 72), "a cat", segments=2, num_frames=9, num_cond_frames=5,
                        resolution=(32, 64), num_inference_steps=1, progress=False, refine=True,
                        refine_resolution=res)


@pytest.mark.parametrize("t", [np.float32(2.0), True, float("nan")])
def test_extend_refine_t_thresh_before_stage1(no_model, monkeypatch, t):
    monkeypatch.setattr(no_model, "encode_text", NoModel())
    with pytest.raises((TypeError, ValueError), match="t_thresh"):
        no_model.extend(_frames(9, 40, 72), "a cat", segments=2, num_frames=9, num_cond_frames=5,
                        resolution=(32, 64), num_inference_steps=1, progress=False, refine=True, t_thresh=t)


@pytest.mark.parametrize("kw", [dict(t_thresh=0.3), dict(spatial_refine_only=True), dict(refine_steps=10),
                                dict(refine_resolution=(64, 64)), dict(spatial_refine_only=0)])
def test_extend_refinement_options_without_refine(no_model, monkeypatch, kw):
    # they were silently ignored: a user who forgot refine=True got an unrefined video
    monkeypatch.setattr(no_model, "encode_text", NoModel())
    with pytest.raises(ValueError, match=f"{next(iter(kw))}=.*refine=True"):
        no_model.extend(_frames(9, 40, 72), "a cat", segments=2, num_frames=9, num_cond_frames=5,
                        resolution=(32, 64), num_inference_steps=1, progress=False, **kw)


def test_extend_refine_use_kv_cache_before_stage1(no_model, monkeypatch):
    # run_refine's bool check came only after every stage-1 segment had run
    monkeypatch.setattr(no_model, "encode_text", NoModel())
    with pytest.raises(TypeError, match="use_kv_cache must be a bool, got str"):
        no_model.extend(_frames(9, 40, 72), "a cat", segments=2, num_frames=9, num_cond_frames=5,
                        resolution=(32, 64), num_inference_steps=1, progress=False, refine=True, use_kv_cache="no")


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from longcat_vc.video_io import write_video

    d = tmp_path_factory.mktemp("clips")
    paths = {"s1": str(d / "s1.mp4"), "short_s1": str(d / "short.mp4"), "vid": str(d / "in.mp4"),
             "vid15": str(d / "in15.mp4")}
    write_video(paths["s1"], _frames(6, 32, 64, 1), fps=15)
    write_video(paths["short_s1"], _frames(2, 32, 64, 2), fps=15)
    write_video(paths["vid"], _frames(12, 32, 64, 3), fps=15)  # 12 frames at ~30 fps as well
    write_video(paths["vid15"], _frames(15, 32, 64, 4), fps=15)  # enough for 13 cond frames, not for 26
    return paths


def _cli(argv, capsys):
    from longcat_vc.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize(
    "case, match",
    [
        ("cond_without_video", "--cond-frames 5 needs --video"),
        ("cond_zero", "--cond-frames must be >= 1"),
        ("cond_more_than_video", "fewer than --cond-frames"),
        ("nothing_refined", "nothing would be refined"),
        ("continue_t_without_refine", "--t-thresh applies to the refinement"),
        ("continue_spatial_without_refine", "--spatial-only applies to the refinement"),
        ("continue_refine_too_few_30fps", "fewer than the refinement's 26 cond frames"),
    ],
)
def test_cli_bad_refine_values_exit_2_before_load(clips, tmp_path, capsys, case, match):
    out = str(tmp_path / "out.mp4")
    ck = str(tmp_path / "no_checkpoint")  # reaching the weights load would exit 1 ("not found")
    common = ["--checkpoint", ck, "--out", out, "--device", "cpu", "--no-progress"]
    ref = ["refine", clips["s1"]] + common
    cont = ["continue", clips["vid"], "--prompt", "a cat", "--frames", "17"] + common
    argv = {
        "cond_without_video": ref + ["--cond-frames", "5"],
        "cond_zero": ref + ["--video", clips["vid"], "--cond-frames", "0"],
        "cond_more_than_video": ref + ["--video", clips["vid"], "--cond-frames", "13"],
        "nothing_refined": ["refine", clips["short_s1"]] + common + ["--video", clips["vid"], "--cond-frames", "5"],
        "continue_t_without_refine": cont + ["--cond-frames", "5", "--t-thresh", "0.3"],
        "continue_spatial_without_refine": cont + ["--cond-frames", "5", "--spatial-only"],
        "continue_refine_too_few_30fps": [clips["vid15"] if a == clips["vid"] else a for a in cont]
        + ["--cond-frames", "13", "--refine"],  # 15 frames at ~30 fps, the refine needs 26
    }[case]
    rc, err = _cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("longcat-vc: error:") and match in lines[0], err
    assert "Traceback" not in err and not os.path.exists(out)


def test_cli_continue_refine_passes_the_30fps_input(clips, tmp_path, capsys, monkeypatch):
    """``continue --refine`` reads the input at ~30 fps before the load (for the check above) and hands
    that same video to ``refine`` (the refine itself is replaced: 720p on CPU would take minutes)."""
    ck = str(tmp_path / "ckpt")
    write_refine_checkpoint(ck)
    seen = {}

    def spy(self, stage1, prompt="", **kw):
        seen.update(kw, prompt=prompt, stage1=stage1)
        return stage1

    monkeypatch.setattr(VideoContinuationPipeline, "refine", spy)
    out = str(tmp_path / "out.mp4")
    rc, err = _cli(["continue", clips["vid15"], "--prompt", "a cat", "--checkpoint", ck, "--out", out, "--device",
                    "cpu", "--dtype", "fp32", "--attn-backend", "torch", "--no-progress", "--frames", "9",
                    "--cond-frames", "5", "--steps", "1", "--resolution", "32x64", "--refine", "--t-thresh", "0.25",
                    "--seed", "1"], capsys)
    assert rc == 0, err
    assert seen["t_thresh"] == 0.25 and seen["spatial_refine_only"] is False and seen["prompt"] == "a cat"
    assert isinstance(seen["stage1"], VideoContinuationOutput)
    assert seen["video"].frames.shape == (15, 32, 64, 3) and os.path.exists(out)
