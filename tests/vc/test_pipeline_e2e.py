"""End to end on CPU: a tiny checkpoint in the upstream layout (real tiny LongCatDiT, tiny
AutoencoderKLWan, tiny UMT5 + tokenizer, scheduler config, cfg-step LoRA) written by the test,
loaded with from_pretrained, run in both modes with the cache on and off, written to mp4 and read
back."""

import os
import shutil

import numpy as np
import pytest
import torch

from longcat_vc import CheckpointError, LongCatDiT
from longcat_vc.pipeline import VideoContinuationPipeline, check_checkpoint
from longcat_vc.video_io import read_video, write_video
from vc_components import write_full_checkpoint

SIZE = (32, 48)
IN_H, IN_W = 40, 56  # input size differs from the model size: output is resized back


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    write_full_checkpoint(root)
    return root


@pytest.fixture(scope="module")
def in_video(tmp_path_factory):
    """18 frames at 30 fps -> 9 frames after subsampling to ~15 fps."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:IN_H, 0:IN_W]
    frames = []
    for i in range(18):
        img = np.stack([(xx * 4 + i * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3 + i) % 256], -1)
        frames.append((img + rng.integers(0, 8, img.shape)).clip(0, 255).astype(np.uint8))
    path = str(tmp_path_factory.mktemp("in") / "in.mp4")
    write_video(path, np.stack(frames), fps=30)
    return path


@pytest.mark.parametrize(
    "rel, mode",
    [
        ("dit/config.json", "basic"),
        ("dit/diffusion_pytorch_model-00001-of-00002.safetensors", "basic"),
        ("vae/diffusion_pytorch_model.safetensors", "basic"),
        ("vae/config.json", "basic"),
        ("text_encoder/model.safetensors", "basic"),
        ("tokenizer/tokenizer.json", "basic"),
        ("scheduler/scheduler_config.json", "basic"),
        ("lora/cfg_step_lora.safetensors", "distill"),
    ],
)
def test_missing_component_is_named(ckpt, tmp_path, rel, mode):
    broken = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, broken)
    check_checkpoint(broken, mode)  # complete: passes
    os.remove(os.path.join(broken, rel))
    with pytest.raises(CheckpointError) as ei:
        VideoContinuationPipeline.from_pretrained(broken, dtype=torch.float32, device="cpu", mode=mode)
    msg = str(ei.value)
    if rel.startswith("dit/diffusion"):
        # the index names a shard that is gone: the DiT loader names it
        assert "00001-of-00002" in msg
    else:
        assert rel in msg, msg


def test_basic_mode_lora_not_needed(ckpt, tmp_path):
    broken = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, broken)
    shutil.rmtree(os.path.join(broken, "lora"))
    check_checkpoint(broken, "basic")
    with pytest.raises(CheckpointError, match="not found"):
        check_checkpoint(str(tmp_path / "nope"))


def _run(pipe, video, cache, **kw):
    args = dict(resolution=SIZE, num_frames=13, num_cond_frames=5, guidance_scale=1.0,
                use_kv_cache=cache, generator=torch.Generator().manual_seed(11), progress=False)
    args.update(kw)
    return pipe(video, "a person rides a motorcycle on the road", **args)


@pytest.mark.parametrize("mode, steps", [("distill", 3), ("basic", 1)])
def test_end_to_end_cache_on_off_mp4(ckpt, in_video, tmp_path, mode, steps):
    pipe = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode=mode)
    assert isinstance(pipe.dit, LongCatDiT)
    assert pipe.shift == 12.0
    if mode == "distill":
        assert pipe.dit.active_loras == ["cfg_step_lora"]
    on = _run(pipe, in_video, True, num_inference_steps=steps)
    off = _run(pipe, in_video, False, num_inference_steps=steps)
    expected_steps = 3 if mode == "distill" else 11  # enhance_hf: 1 base step above 500 + 10 tail
    assert on.timings["steps"] == off.timings["steps"] == expected_steps
    assert on.latents.shape == (1, 16, 4, 4, 6)
    assert torch.isfinite(on.latents).all()
    rel = ((on.latents - off.latents).norm() / off.latents.norm()).item()
    assert rel < 1e-5, f"cache on vs off rel. L2 {rel}"
    diff = np.abs(on.frames.astype(int) - off.frames.astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-2
    # output: 9 input frames (30 fps subsampled) + 8 new, at the input's size
    assert on.frames.shape == (9 + 8, IN_H, IN_W, 3)
    src = read_video(in_video).frames[::2]
    np.testing.assert_array_equal(on.frames[:9], src)
    out_path = str(tmp_path / f"out_{mode}.mp4")
    write_video(out_path, on.frames, on.fps)
    back = read_video(out_path)
    assert back.frames.shape == (17, IN_H, IN_W, 3) and back.fps == 15.0
    assert np.abs(back.frames.astype(int) - on.frames.astype(int)).mean() < 20


def test_lora_changes_the_result_and_cfg_runs(ckpt, in_video):
    pipe = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="distill")
    with_lora = _run(pipe, in_video, True, num_inference_steps=2, output_type="latent")
    pipe.set_mode("basic")
    assert pipe.dit.active_loras == []
    # basic mode, default guidance 4.0 (CFG batch of 2 through the real DiT), 1 requested step
    cfg = _run(pipe, in_video, True, num_inference_steps=1, guidance_scale=None, output_type="latent")
    assert cfg.frames is None and torch.isfinite(cfg.latents).all()
    pipe.set_mode("distill")  # LoRA already loaded: re-enabled by name
    again = _run(pipe, in_video, True, num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(again.latents, with_lora.latents, rtol=0, atol=0)
    pipe.dit.disable_loras()
    no_lora = _run(pipe, in_video, True, num_inference_steps=2, output_type="latent")
    assert not torch.allclose(no_lora.latents[:, :, 2:], with_lora.latents[:, :, 2:], atol=1e-4)
    # the cond latents are the same either way
    torch.testing.assert_close(no_lora.latents[:, :, :2], with_lora.latents[:, :, :2])


def test_bsa_fused_lora_and_backend(ckpt, in_video):
    pipe = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="distill",
                                                     attn_backend="torch")
    assert pipe.dit.config.attn_backend == "torch"
    dense = _run(pipe, in_video, True, num_inference_steps=2, output_type="latent")
    bsa_on = _run(pipe, in_video, True, num_inference_steps=2, use_bsa=True, output_type="latent")
    bsa_off = _run(pipe, in_video, False, num_inference_steps=2, use_bsa=True, output_type="latent")
    assert pipe.dit.config.enable_bsa is False  # only for the call
    rel = ((bsa_on.latents - bsa_off.latents).norm() / bsa_off.latents.norm()).item()
    assert rel < 1e-5, rel
    assert not torch.allclose(bsa_on.latents, dense.latents, atol=1e-4)  # BSA really ran
    pipe.set_mode("distill", fuse_lora=True)
    fused = _run(pipe, in_video, True, num_inference_steps=2, output_type="latent")
    rel = ((fused.latents - dense.latents).norm() / dense.latents.norm()).item()
    assert rel < 1e-5, rel
    pipe.set_mode("basic")
    assert pipe.dit.active_loras == []
