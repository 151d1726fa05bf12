"""Pipeline logic on tiny real VAE / UMT5 / tokenizer with the interface twin of the DiT.

These tests pin what the pipeline itself computes (generator order, schedule fed to the DiT,
CFG batch, Euler updates, cache on == off, extend chaining, bad input), independently of the DiT.
End-to-end tests with the real tiny LongCatDiT and a checkpoint folder are in
test_pipeline_e2e.py.
"""

import numpy as np
import pytest
import torch

from longcat_vc.pipeline import (
    VCOutOfMemoryError,
    VideoContinuationPipeline,
    bucket_size,
)
from longcat_vc.schedule import vc_timesteps
from longcat_vc.text import DEFAULT_NEGATIVE_PROMPT, clean_prompt
from longcat_vc.video_io import VideoFrames
from vc_components import StandInDiT, build_text_encoder, build_tokenizer, build_vae, write_lora_file

H, W = 32, 48
SIZE = (32, 48)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = build_tokenizer(str(d / "tokenizer"))
    lora = str(d / "lora.safetensors")
    write_lora_file(lora)
    return {"tok": tok, "te": build_text_encoder(), "vae": build_vae(), "lora": lora}


def make_pipe(parts, mode="basic", shift=12.0):
    dit = StandInDiT().eval()
    pipe = VideoContinuationPipeline(dit, parts["vae"], parts["te"], parts["tok"], {"shift": shift})
    if mode == "distill":
        pipe.set_mode("distill", lora_path=parts["lora"])
    return pipe


def video(n=9, h=H, w=W, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_buckets():
    assert bucket_size(1080, 1920, "480p") == (480, 832)
    assert bucket_size(1080, 1920, "720p") == (704, 1312)
    assert bucket_size(720, 720, "480p") == (608, 640)  # 1.00 is between 0.95 and 1.05: first wins
    assert bucket_size(1920, 1080, "480p") == (832, 480)
    with pytest.raises(ValueError, match="resolution"):
        bucket_size(10, 10, "1080p")


def test_clean_prompt():
    assert clean_prompt("  a   cat\n\t rides &amp;amp; the\u00a0road ") == "a cat rides & the road"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy mojibake fix
    with pytest.raises(TypeError):
        clean_prompt(None)


def test_generator_order_and_cond_latents(parts):
    """Noise first, then the posterior sample of the last cond frames, same generator (SPEC 7)."""
    pipe = make_pipe(parts)
    v = video(9)
    g = torch.Generator().manual_seed(123)
    lat = pipe.prepare_latents(v, SIZE, 17, 5, g)
    assert lat.shape == (1, 16, 5, 4, 6) and lat.dtype == torch.float32

    g2 = torch.Generator().manual_seed(123)
    noise = torch.randn((1, 16, 5, 4, 6), generator=g2)
    px = torch.from_numpy(v[-5:]).float().div(255).mul(2).sub(1).permute(3, 0, 1, 2)[None]
    z = parts["vae"].encode(px).latent_dist.sample(generator=g2)
    mean = torch.tensor(parts["vae"].config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(parts["vae"].config.latents_std).view(1, 16, 1, 1, 1)
    c = 2
    torch.testing.assert_close(lat[:, :, c:], noise[:, :, c:], rtol=0, atol=0)
    torch.testing.assert_close(lat[:, :, :c], (z - mean) / std, rtol=1e-5, atol=1e-5)
    # the next draw of both generators agrees: same amount of randomness consumed
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=g2))


def _record_dit(pipe):
    seen = []
    orig = pipe.dit.forward

    def fwd(x, t, enc, mask, **kw):
        seen.append({"x": x.shape, "t": t.clone(), "enc": enc.shape, "mask": mask.clone(), **kw})
        return orig(x, t, enc, mask, **kw)

    pipe.dit.forward = fwd
    return seen


def test_basic_schedule_cfg_batch_and_timesteps(parts):
    pipe = make_pipe(parts)
    seen = _record_dit(pipe)
    out = pipe(video(9), "a cat rides", resolution=SIZE, num_frames=17, num_cond_frames=5,
               generator=torch.Generator().manual_seed(0), progress=False)
    ts, _ = vc_timesteps(50, 12.0, "enhance_hf")
    assert len(seen) == 56 == out.timings["steps"] == len(out.timings["denoise_steps"])
    for s, t in zip(seen, ts):
        assert s["x"] == (2, 16, 3, 4, 6)  # CFG batch, noisy latents only (cache on)
        assert s["t"].shape == (2, 3) and torch.all(s["t"] == t.to(pipe.dtype))
        assert s["enc"] == (2, 1, 512, 32)
        assert s["num_cond_latents"] == 2 and s["kv_cache"] is not None
    # [uncond; cond]: the default negative prompt first
    neg, _ = pipe.encode_text([DEFAULT_NEGATIVE_PROMPT])
    assert torch.equal(seen[0]["mask"][0], pipe.encode_text([DEFAULT_NEGATIVE_PROMPT])[1][0])
    assert torch.equal(seen[0]["mask"][1], pipe.encode_text(["a cat rides"])[1][0])
    assert out.frames.shape == (9 + 12, H, W, 3) and out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.frames[:9], video(9))
    for key in ("text", "vae_encode", "cache_build", "denoise", "decode", "total"):
        assert out.timings[key] >= 0


def test_distill_mode_defaults(parts):
    pipe = make_pipe(parts, mode="distill")
    assert pipe.dit.active == ["cfg_step_lora"]
    seen = _record_dit(pipe)
    out = pipe(video(9), "a dog", resolution=SIZE, num_frames=13, num_cond_frames=5, generator=1,
               progress=False)
    ts, _ = vc_timesteps(16, 12.0, "distill")
    assert len(seen) == 16
    assert all(s["x"][0] == 1 for s in seen)  # guidance 1.0: no CFG batch
    assert torch.equal(torch.stack([s["t"][0, 0] for s in seen]), ts.to(pipe.dtype))
    assert out.frames.shape == (9 + 8, H, W, 3)
    pipe.set_mode("basic")
    assert pipe.dit.active == []


def test_cache_on_equals_cache_off_fp32(parts):
    pipe = make_pipe(parts)
    outs = {}
    for cache in (True, False):
        seen = _record_dit(pipe)
        outs[cache] = pipe(video(9), "a cat", resolution=SIZE, num_frames=17, num_cond_frames=5,
                           num_inference_steps=6, guidance_scale=1.0, use_kv_cache=cache,
                           generator=torch.Generator().manual_seed(7), output_type="latent", progress=False)
        pipe.dit.forward = type(pipe.dit).forward.__get__(pipe.dit)
        if not cache:
            # cache off: all latents, cond frames at timestep 0
            assert seen[0]["x"] == (1, 16, 5, 4, 6) and seen[0]["kv_cache"] is None
            assert torch.all(seen[0]["t"][:, :2] == 0) and torch.all(seen[0]["t"][:, 2:] == 1000)
    a, b = outs[True].latents, outs[False].latents
    assert a.shape == (1, 16, 5, 4, 6)
    assert torch.isfinite(a).all()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-5, rel


def test_euler_integration_constant_prediction(parts):
    """With a constant prediction P, x_end = x_0 + sigma_0 * P = noise + P on the noisy frames."""
    pipe = make_pipe(parts)
    P = 0.25
    pipe.dit.forward = lambda x, t, enc, mask, **kw: torch.full(x.shape, P)
    out = pipe(video(9), "a cat", resolution=SIZE, num_frames=17, num_cond_frames=5, num_inference_steps=5,
               guidance_scale=1.0, generator=torch.Generator().manual_seed(3), output_type="latent",
               progress=False)
    lat0 = pipe.prepare_latents(video(9), SIZE, 17, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.latents[:, :, 2:], lat0[:, :, 2:] + P, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.latents[:, :, :2], lat0[:, :, :2])


def test_extend_chains_segments(parts):
    pipe = make_pipe(parts)
    calls = []
    orig = pipe.encode_text
    # (and under no_grad, as every pipeline call: a decorator moved off extend once, silently)
    pipe.encode_text = lambda p, **kw: (calls.append((p, torch.is_grad_enabled())), orig(p, **kw))[1]
    kw = dict(resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=3, progress=False)
    long = pipe.extend(video(9), "a cat", segments=2, generator=torch.Generator().manual_seed(5), **kw)
    assert long.frames.shape == (9 + 2 * 8, H, W, 3)
    assert len(long.timings["segments"]) == 2
    assert len(calls) == 1  # the prompt is encoded once and reused by segment 2
    assert calls[0][1] is False  # without grad
    # == two chained calls with one generator
    g = torch.Generator().manual_seed(5)
    frames = video(9)
    for p in ["a cat", "a cat"]:
        frames = pipe(frames, p, generator=g, **kw).frames
    np.testing.assert_array_equal(long.frames, frames)
    with pytest.raises(ValueError, match="segments"):
        pipe.extend(video(9), ["a", "b"], segments=3, **kw)


def test_path_input_is_subsampled_and_output_size(parts, tmp_path):
    from longcat_vc.video_io import write_video

    pipe = make_pipe(parts)
    path = str(tmp_path / "in.mp4")
    write_video(path, video(20, 40, 56), fps=30)
    out = pipe(path, "a cat", resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=2,
               guidance_scale=1.0, progress=False)
    assert out.num_input_frames == 10 and out.frames.shape == (10 + 8, 40, 56, 3)
    assert out.size == SIZE and out.fps == 15.0
    vf = VideoFrames(video(20, 40, 56), 30.0)
    out = pipe(vf, "a cat", resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=1,
               guidance_scale=1.0, progress=False)
    assert out.num_input_frames == 10


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_cond_frames=13, num_frames=17), ValueError, "fewer than num_cond_frames=13"),
        (dict(num_frames=5), ValueError, r"num_frames \(5\) must be greater than num_cond_frames \(5\)"),
        (dict(resolution="1080p"), ValueError, "resolution"),
        (dict(resolution=(30, 48)), ValueError, "multiples of 16"),
        (dict(guidance_scale=0.5), ValueError, "guidance_scale must be >= 1"),
        (dict(num_cond_frames=6), ValueError, "4k\\+1"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(output_type="pil"), ValueError, "output_type"),
        (dict(generator="x"), TypeError, "generator"),
    ],
)
def test_bad_input(parts, kwargs, exc, match):
    pipe = make_pipe(parts)
    args = dict(resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pipe(video(9), "a cat", **args)


def test_bad_video_inputs(parts, tmp_path):
    from longcat_vc.video_io import VideoReadError

    pipe = make_pipe(parts)
    kw = dict(resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=1, progress=False)
    with pytest.raises(VideoReadError, match="no frames|empty"):
        pipe([], "a", **kw)
    (tmp_path / "e.mp4").write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty"):
        pipe(str(tmp_path / "e.mp4"), "a", **kw)
    with pytest.raises(FileNotFoundError):
        pipe(str(tmp_path / "missing.mp4"), "a", **kw)


def test_num_frames_rounded_down(parts):
    pipe = make_pipe(parts)
    with pytest.warns(UserWarning, match="rounding down to 13"):
        out = pipe(video(9), "a", resolution=SIZE, num_frames=15, num_cond_frames=5, num_inference_steps=1,
                   guidance_scale=1.0, progress=False)
    assert out.frames.shape[0] == 9 + 8


def test_oom_in_cache_build_hints_offload(parts):
    pipe = make_pipe(parts)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    pipe.dit.build_kv_cache = oom
    with pytest.raises(VCOutOfMemoryError, match="offload-kv-cache"):
        pipe(video(9), "a", resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=1,
             progress=False)


def test_bsa_flag_toggles_config_for_the_call(parts):
    pipe = make_pipe(parts)
    pipe(video(9), "a", resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=2,
         guidance_scale=1.0, use_bsa=True, progress=False)
    n = len(vc_timesteps(2, 12.0, "enhance_hf")[0])
    assert [c["bsa"] for c in pipe.dit.calls] == [True] * n
    assert pipe.dit.config.enable_bsa is False


def test_bsa_flag_false_switches_a_config_bsa_off_and_none_keeps_it(parts):
    # use_bsa defaulted to False and meant "leave it": a config with enable_bsa true ran block-sparse
    # attention under use_bsa=False, silently
    pipe = make_pipe(parts)
    pipe.dit.config.enable_bsa = True
    n = len(vc_timesteps(2, 12.0, "enhance_hf")[0])
    for flag, want in ((False, False), (None, True)):
        pipe.dit.calls.clear()
        pipe(video(9), "a", resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=2,
             guidance_scale=1.0, use_bsa=flag, progress=False)
        assert [c["bsa"] for c in pipe.dit.calls] == [want] * n
        assert pipe.dit.config.enable_bsa is True


def test_offload_flag_reaches_cache(parts):
    pipe = make_pipe(parts)
    got = []
    orig = pipe.dit.build_kv_cache
    pipe.dit.build_kv_cache = lambda x, offload=False: (got.append((tuple(x.shape), offload)), orig(x, offload=offload))[1]
    pipe(video(9), "a", resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=1,
         guidance_scale=4.0, offload_kv_cache=True, progress=False)
    assert got == [((1, 16, 2, 4, 6), True)]  # batch 1 regardless of CFG


def test_unknown_mode(parts):
    with pytest.raises(ValueError, match="mode must be one of"):
        VideoContinuationPipeline(StandInDiT(), parts["vae"], parts["te"], parts["tok"], {"shift": 12.0}, mode="turbo")
    with pytest.raises(ValueError, match="mode must be one of"):
        VideoContinuationPipeline.from_pretrained("/nonexistent", mode="turbo")
    pipe = make_pipe(parts)
    with pytest.raises(ValueError, match="mode must be one of"):
        pipe.set_mode("fast")
    with pytest.raises(ValueError, match="distill mode needs the cfg-step LoRA"):
        pipe.set_mode("distill")  # no LoRA loaded under that name
