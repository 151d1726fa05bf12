"""720p refinement (SPEC 11) on CPU with a tiny upstream-layout checkpoint and a tiny refinement LoRA."""

import os
import shutil

import numpy as np
import pytest
import torch

from longcat_vc import CheckpointError
from longcat_vc.pipeline import VideoContinuationOutput, VideoContinuationPipeline
from longcat_vc.refine import REFINEMENT_LORA, refine_bucket, refine_padding, refine_timesteps, resolve_refine_args
from vc_components import NoModel, write_refine_checkpoint

SIZE = (64, 64)  # 4 x 4 tokens per latent frame (kept small: the VAE dominates on CPU)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_refine"))
    write_refine_checkpoint(root)
    return root


@pytest.fixture(scope="module")
def pipe(ckpt):
    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch")


def _frames(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _state(p):
    return list(p.dit.active_loras), bool(p.dit.config.enable_bsa)


def test_schedule_padding_bucket():
    ts, sig = refine_timesteps(12.0, 50, 0.5)
    np.testing.assert_allclose(ts.numpy(), [500.0, 443.0, 343.5, 207.8, 11.9], atol=0.06)
    assert sig[-1] == 0 and torch.equal(sig[:-1], ts / 1000)
    # upstream demo: 93 stage-1 frames -> 186, 26 cond frames
    assert refine_padding(186, 26) == {"cond_latents": 8, "cond_added": 3, "noise_latents": 40, "noise_added": 0}
    assert refine_padding(186, 0) == {"cond_latents": 0, "cond_added": 0, "noise_latents": 48, "noise_added": 6}
    assert refine_bucket(480, 832) == refine_bucket(1080, 1920) == (704, 1280)


@pytest.mark.parametrize("spatial_only", [False, True])
def test_refine_end_to_end(pipe, spatial_only):
    vid, s1 = _frames(12, 40, 72, 1), _frames(6, 36, 64, 2)
    before = _state(pipe)
    out = pipe.refine(s1, "a cat", video=vid, num_cond_frames=5, resolution=SIZE, spatial_refine_only=spatial_only,
                      generator=3, progress=False)
    n_ref = 6 if spatial_only else 12
    assert out.fps == (15.0 if spatial_only else 30.0)
    assert out.frames.shape == (12 + n_ref - 5, 40, 72, 3) and out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.frames[:12], vid)
    assert out.model_frames.shape == (n_ref, 64, 64, 3)
    pad = refine_padding(n_ref, 5)
    assert out.latents.shape == (1, 16, pad["cond_latents"] + pad["noise_latents"], 8, 8)
    assert torch.isfinite(out.latents).all()
    assert out.timings["steps"] == 5 and out.timings["kv_cache_bytes"] > 0
    assert _state(pipe) == before


def test_cache_on_equals_cache_off_and_bsa_matters(pipe):
    vid, s1 = _frames(12, 40, 72, 4), _frames(5, 36, 64, 5)
    kw = dict(video=vid, num_cond_frames=5, resolution=SIZE, generator=11, output_type="latent", progress=False)
    on = pipe.refine(s1, "a dog", use_kv_cache=True, **kw).latents
    off = pipe.refine(s1, "a dog", use_kv_cache=False, **kw).latents
    assert torch.isfinite(on).all() and torch.isfinite(off).all()
    assert (on - off).abs().max().item() < 1e-5
    # the attention pattern matters: a denser BSA changes the result (so the comparison can fail)
    old = pipe.dit.config.bsa_params
    pipe.dit.config.bsa_params = dict(old, sparsity=0.0)
    try:
        dense = pipe.refine(s1, "a dog", use_kv_cache=True, **kw).latents
    finally:
        pipe.dit.config.bsa_params = old
    assert (dense - on).abs().max().item() > 1e-4


def test_randomness_global_and_generator(pipe):
    vid, s1 = _frames(12, 40, 72, 6), _frames(5, 36, 64, 7)
    kw = dict(video=vid, num_cond_frames=5, resolution=SIZE, output_type="latent", progress=False)
    torch.manual_seed(123)
    a = pipe.refine(s1, **kw).latents
    torch.manual_seed(123)
    b = pipe.refine(s1, **kw).latents
    torch.manual_seed(124)
    c = pipe.refine(s1, **kw).latents
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    g1 = pipe.refine(s1, generator=torch.Generator().manual_seed(9), **kw).latents
    assert torch.equal(torch.get_rng_state(), state)  # a generator: nothing from the global RNG
    g2 = pipe.refine(s1, generator=9, **kw).latents
    assert torch.equal(g1, g2)


def test_lora_loaded_without_global_rng_and_stage1_output(ckpt):
    p = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                  mode="distill")
    vid = _frames(12, 40, 72, 8)
    st1 = p(vid, "a cat", num_frames=9, num_cond_frames=5, resolution=(32, 64), num_inference_steps=2,
            generator=1, progress=False)
    assert isinstance(st1, VideoContinuationOutput) and st1.model_frames.shape == (9, 32, 64, 3)
    state = torch.get_rng_state()
    out = p.refine(st1, video=vid, resolution=SIZE, generator=2, progress=False, output_type="latent")
    assert torch.equal(torch.get_rng_state(), state)
    assert REFINEMENT_LORA in p.dit.lora_names
    # default cond frames: 2 x the stage-1 count (5 -> 10) -> 1 + ceil(9/4) = 4 cond latents
    assert out.num_new_frames == 18 - 10 and out.latents.shape[2] == 4 + 4
    assert _state(p) == (["cfg_step_lora"], False)


def test_state_restored_when_refine_raises(pipe, monkeypatch):
    pipe.dit.enable_loras(["cfg_step_lora"]) if "cfg_step_lora" in pipe.dit.lora_names else None
    before = _state(pipe)
    seen = {}

    def boom(*a, **k):
        seen["state"] = _state(pipe)
        raise RuntimeError("boom in the DiT")

    monkeypatch.setattr(pipe.dit, "build_kv_cache", boom)
    with pytest.raises(RuntimeError, match="boom in the DiT"):
        pipe.refine(_frames(5, 36, 64, 0), video=_frames(12, 40, 72, 0), num_cond_frames=5, resolution=SIZE,
                    progress=False)
    assert seen["state"] == ([REFINEMENT_LORA], True)
    assert _state(pipe) == before
    pipe.dit.disable_loras()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(t_thresh=0.0), ValueError, "t_thresh"),
        (dict(t_thresh=1.5), ValueError, "t_thresh"),
        (dict(t_thresh=float("nan")), TypeError, "t_thresh"),
        (dict(num_cond_frames=13), ValueError, "fewer than num_cond_frames"),  # video has 12
        (dict(stage1=_frames(2, 36, 64, 0), num_cond_frames=5), ValueError, "nothing would be refined"),
        (dict(video=None, num_cond_frames=5), ValueError, "needs video"),
        (dict(stage1=_frames(5, 64, 36, 0), resolution="720p"), ValueError, "bucket"),
        (dict(resolution=(60, 64)), ValueError, "multiples of 64"),
    ],
)
def test_bad_input_before_model_work(pipe, monkeypatch, kwargs, err, match):
    args = dict(stage1=_frames(5, 36, 64, 0), video=_frames(12, 40, 72, 0), num_cond_frames=5, resolution=SIZE)
    args.update(kwargs)
    monkeypatch.setattr(pipe, "vae", NoModel())
    monkeypatch.setattr(pipe.dit, "forward", NoModel())
    with pytest.raises(err, match=match):
        pipe.refine(args.pop("stage1"), progress=False, **args)


def test_bucket_check_accepts_upstream_demo_pairing(pipe):
    # upstream's demo: 480x832 stage-1 frames with a 16:9 input video
    a = resolve_refine_args(pipe, _frames(3, 480, 832, 0), _frames(2, 180, 320, 0), 1, "720p", False, 0.5, 50, "np")
    assert a["size"] == (704, 1280) and a["out_size"] == (180, 320)


def test_missing_refinement_lora_is_named(ckpt, tmp_path):
    broken = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, broken)
    os.remove(os.path.join(broken, "lora", "refinement_lora.safetensors"))
    p = VideoContinuationPipeline.from_pretrained(broken, dtype=torch.float32, device="cpu", attn_backend="torch")
    with pytest.raises(CheckpointError, match="refinement_lora.safetensors"):
        p.refine(_frames(5, 36, 64, 0), video=_frames(12, 40, 72, 0), num_cond_frames=5, resolution=SIZE,
                 progress=False)


def test_cli_refine(ckpt, tmp_path, capsys):
    from longcat_vc.cli import main
    from longcat_vc.video_io import read_video, write_video

    s1, vid = str(tmp_path / "s1.mp4"), str(tmp_path / "in.mp4")
    write_video(s1, _frames(6, 32, 64, 3), fps=15)
    write_video(vid, _frames(24, 36, 64, 4), fps=60)  # -> 12 frames at 30 fps
    out = str(tmp_path / "out.mp4")
    base = ["refine", s1, "--video", vid, "--checkpoint", ckpt, "--out", out, "--dtype", "fp32", "--device", "cpu",
            "--attn-backend", "torch", "--no-progress", "--seed", "1"]
    assert main(base + ["--t-thresh", "0"]) == 2 and not os.path.exists(out)
    assert "--t-thresh" in capsys.readouterr().err
    assert main(base + ["--resolution", "64x64", "--cond-frames", "5"]) == 0
    err = capsys.readouterr().err
    assert "timings (s)" in err and "30 fps" in err
    got = read_video(out)
    assert got.frames.shape[0] == 12 + 12 - 5 and got.frames.shape[1:3] == (36, 64)
    assert abs(got.fps - 30) < 0.1


@pytest.mark.skipif(not os.environ.get("LONGCAT_UPSTREAM_DIR"),
                    reason="set LONGCAT_UPSTREAM_DIR to a LongCat-Video checkout (upstream code is not in CI)")
def test_refine_matches_upstream_generate_refine(tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = str(tmp_path / "parity.json")
    r = subprocess.run([sys.executable, os.path.join(repo, "bench", "dev", "refine_upstream_parity.py"),
                        "--upstream", os.environ["LONGCAT_UPSTREAM_DIR"], "--out", out],
                       env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json

    rep = json.load(open(out))
    assert rep["ok"] and rep["worst_max_abs"] < 1e-4


def test_extend_refine_sliding_windows(ckpt, monkeypatch):
    import longcat_vc.refine as rm

    p = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                  mode="distill")
    calls = []
    real = rm.run_refine

    def spy(pipe, stage1, prompt="", **kw):
        calls.append((stage1.shape[0], prompt, None if kw["video"] is None else kw["video"].shape[0],
                      kw["num_cond_frames"]))
        return real(pipe, stage1, prompt, **kw)

    monkeypatch.setattr(rm, "run_refine", spy)
    vid = _frames(9, 40, 72, 9)
    out = p.extend(vid, "a cat", segments=2, num_frames=9, num_cond_frames=5, resolution=(32, 64),
                   num_inference_steps=1, generator=4, progress=False, refine=True, refine_resolution=SIZE)
    # 2 windows of 9 stage-1 frames (start 0 and 4); the second conditioned on the first's 18 refined frames
    assert calls == [(9, "", None, None), (9, "", 18, 10)]
    assert out.fps == 30.0 and len(out.timings["refine"]) == 2
    # refined frames: 18 (first window) + 8 (second, after its 10 cond) minus the 10 refined cond frames
    assert out.frames.shape == (9 + 18 + 8 - 10, 40, 72, 3)
    np.testing.assert_array_equal(out.frames[:9], vid)
    assert _state(p) == (["cfg_step_lora"], False)


def test_cli_missing_refinement_lora_before_load(ckpt, tmp_path, capsys):
    from longcat_vc.cli import main
    from longcat_vc.video_io import write_video

    broken = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, broken)
    os.remove(os.path.join(broken, "lora", "refinement_lora.safetensors"))
    inp = str(tmp_path / "in.mp4")
    write_video(inp, _frames(14, 36, 64, 5), fps=15)
    out = str(tmp_path / "out.mp4")
    for argv in (["refine", inp, "--video", inp], ["continue", inp, "--prompt", "a cat", "--refine"]):
        assert main(argv + ["--checkpoint", broken, "--out", out, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert "refinement_lora.safetensors" in err and not os.path.exists(out)


def test_refine_in_every_memory_mode_gives_the_resident_result(ckpt):
    """Issue 17 (720p refinement within 48 GiB): the refine stage under the streamed memory modes
    (DiT blocks streamed from CPU memory, text encoder streamed; ``low`` also offloads the KV cache)
    equals the resident result exactly, with the refinement LoRA loaded into streamed blocks on first
    use, and leaves the LoRA/BSA state as it found it."""
    vid, s1 = _frames(12, 40, 72, 21), _frames(6, 36, 64, 22)
    kw = dict(video=vid, num_cond_frames=5, resolution=SIZE, generator=5, output_type="latent", progress=False)
    outs = {}
    for memory in ("resident", "balanced", "low"):
        p = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                      memory=memory)
        assert p.memory == memory
        before = _state(p)
        outs[memory] = p.refine(s1, "a cat on a road", **kw).latents
        assert _state(p) == before
        assert torch.isfinite(outs[memory]).all()
        if memory != "resident":
            # a second refine reuses the loaded LoRA in the streamed blocks
            again = p.refine(s1, "a cat on a road", **kw).latents
            assert torch.equal(again, outs[memory])
    for memory in ("balanced", "low"):
        assert torch.equal(outs[memory], outs["resident"]), memory
