"""Round 50: the VC pipeline's seeds and generators, KV cache on/off per mode, edge frame/step counts, and state
across calls on one pipeline (tiny random checkpoint; each run draws fresh input videos and seeds)."""

import contextlib

import numpy as np
import pytest
import torch

from longcat_vc.schedule import check_scheduler_config, vc_timesteps

pytest.importorskip("diffusers")

from longcat_vc.pipeline import VideoContinuationPipeline  # noqa: E402
from vc_components import full_checkpoint_in, random_frames  # noqa: E402

_RNG = np.random.default_rng()


def _seed() -> int:
    return int(_RNG.integers(0, 2**31))


def _video(n=9, h=32, w=48):
    return random_frames(n, h, w, seed=_seed())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return full_checkpoint_in(tmp_path_factory, "ckpt50")


def _pipe(ckpt, mode="basic"):
    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode=mode,
                                                     progress=False)


@pytest.fixture(scope="module")
def pipes(ckpt):
    return {m: _pipe(ckpt, m) for m in ("basic", "distill")}


def _lat(pipe, video, **kw):
    args = dict(resolution=(32, 48), num_frames=13, num_cond_frames=5, guidance_scale=1.0, num_inference_steps=1,
                progress=False, output_type="latent", generator=torch.Generator().manual_seed(kw.pop("seed", 11)))
    args.update(kw)
    out = pipe(video, "a person rides a motorcycle", **args).latents
    assert torch.isfinite(out).all()
    return out


def _rel(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- bugs fixed this round


def test_vc_timesteps_takes_a_numpy_int_step_count():
    """vc_timesteps(np.int64(16), ...) was refused as "num_steps must be an int, got int64" (its
    num_train_timesteps takes numpy ints); it now gives the int's schedule."""
    n = int(_RNG.integers(1, 51))
    for mode in ("distill", "enhance_hf", "plain"):
        ts, sg = vc_timesteps(np.int64(n), 12.0, mode)
        ts_ref, sg_ref = vc_timesteps(n, 12.0, mode)
        assert torch.equal(ts, ts_ref) and torch.equal(sg, sg_ref)
    with pytest.raises(TypeError, match="num_steps"):
        vc_timesteps(np.bool_(True), 12.0, "plain")
    with pytest.raises(TypeError, match="num_steps"):
        vc_timesteps(np.float64(4.0), 12.0, "plain")
    with pytest.raises(ValueError, match="num_steps"):
        vc_timesteps(np.int64(0), 12.0, "plain")


def test_scheduler_config_takes_a_numpy_shift(pipes):
    """A scheduler_config dict with shift=np.float32(12.0) was refused as "'shift' must be a positive number, got
    np.float32(12.0)" (check_shift, which the same check then calls, takes any real number); bad ones still fail."""
    for shift in (np.float32(12.0), np.int64(12), np.float64(12.0)):
        assert check_scheduler_config({"shift": shift})["shift"] == shift
    for bad in (np.bool_(True), np.float32("nan"), np.float32(-1.0), "12", None):
        with pytest.raises(ValueError, match="'shift'"):
            check_scheduler_config({"shift": bad})
    # a pipeline built with it samples as with the float
    p = pipes["basic"]
    other = VideoContinuationPipeline(p.dit, p.vae, p.text_encoder, p.tokenizer,
                                      dict(p.scheduler_config, shift=np.float32(p.shift)))
    assert other.shift == p.shift
    assert torch.equal(other._schedule(3)[0], p._schedule(3)[0])


# ---------------------------------------------------------------- seeds and generators (verified correct)


def test_same_seed_same_latents_and_seed_forms_agree(pipes):
    v, s = _video(), _seed()
    p = pipes["basic"]
    a = _lat(p, v, seed=s)
    assert torch.equal(a, _lat(p, v, seed=s))
    assert torch.equal(a, _lat(p, v, generator=s))
    assert torch.equal(a, _lat(p, v, generator=np.int64(s)))
    assert not torch.equal(a, _lat(p, v, seed=s + 1))
    torch.manual_seed(s)
    b = _lat(p, v, generator=None)
    torch.manual_seed(s)
    assert torch.equal(b, _lat(p, v, generator=None))


def test_generator_advances_by_the_noise_then_the_posterior_draw_only(pipes):
    """The documented order: noise latents, then the posterior sample of the cond frames, from the same
    generator; nothing else drawn from it, and the global RNG untouched."""
    p = pipes["basic"]
    v, s = _video(), _seed()
    g = torch.Generator().manual_seed(s)
    torch.manual_seed(_seed())
    global_state = torch.get_rng_state()
    lat = _lat(p, v, generator=g)
    assert torch.equal(torch.get_rng_state(), global_state)
    r = torch.Generator().manual_seed(s)
    noise = torch.randn(lat.shape, generator=r)
    torch.randn((1, lat.shape[1], 2) + tuple(lat.shape[3:]), generator=r)  # the posterior of 2 cond latents
    assert torch.equal(g.get_state(), r.get_state())
    # only the noisy latents moved off their noise; the cond ones are not noise
    assert not torch.equal(lat[:, :, :2], noise[:, :, :2])
    # the same generator through two calls continues its stream: another result
    assert not torch.equal(_lat(p, v, generator=g), lat)


@pytest.mark.parametrize("bad", [[torch.Generator()], 1.5, "3", True, np.bool_(True), 2**64, -(2**63) - 1])
def test_bad_generators_are_named(pipes, bad):
    with pytest.raises((TypeError, ValueError), match="generator"):
        _lat(pipes["basic"], _video(), generator=bad)


# ---------------------------------------------------------------- cache on/off, edge counts


@pytest.mark.parametrize("mode", ["basic", "distill"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("frames", [(5, 1), (6, 1), (13, 9), (9, 5)])
def test_cache_on_off_agree_at_guidance_1(pipes, mode, steps, frames):
    nf, nc = frames
    v, s = _video(), _seed()
    kw = dict(num_frames=nf, num_cond_frames=nc, num_inference_steps=steps, seed=s)
    rounds = (nf - 1) % 4 != 0

    def run(**extra):
        with pytest.warns(UserWarning, match="rounding down") if rounds else contextlib.nullcontext():
            return _lat(pipes[mode], v, **kw, **extra)

    on, off = run(), run(use_kv_cache=False)
    assert on.shape == (1, 16, (nf - 1) // 4 + 1, 4, 6)
    assert _rel(on, off) < 1e-5
    c = 1 + (nc - 1) // 4
    assert torch.equal(on[:, :, :c], off[:, :, :c])
    assert torch.equal(run(offload_kv_cache=True), on)  # offloading the cache is exact


@pytest.mark.parametrize("mode", ["basic", "distill"])
def test_cache_on_off_under_guidance_differ_only_by_cfg_zero_scale(pipes, mode):
    v, s = _video(), _seed()
    on = _lat(pipes[mode], v, guidance_scale=2.5, seed=s)
    off = _lat(pipes[mode], v, guidance_scale=2.5, seed=s, use_kv_cache=False)
    assert torch.equal(on[:, :, :2], off[:, :, :2])
    assert 0 < _rel(on, off) < 0.3
    assert torch.equal(on, _lat(pipes[mode], v, guidance_scale=2.5, seed=s))


# ---------------------------------------------------------------- state across calls


def test_calls_on_one_pipeline_do_not_leak_into_the_next(ckpt, pipes):
    """Earlier calls at another size, frame count, guidance, cache setting or BSA, and on another video,
    leave no state behind: the next call equals a fresh pipeline's."""
    p = pipes["basic"]
    v2, s = _video(), _seed()
    fresh = _lat(_pipe(ckpt), v2, seed=s)
    for kw in (dict(resolution=(48, 32)), dict(num_frames=9), dict(guidance_scale=2.0), dict(num_cond_frames=1),
               dict(use_kv_cache=False), dict(use_bsa=True)):
        _lat(p, _video(), **kw)
        assert torch.equal(_lat(p, v2, seed=s), fresh), kw
    assert p.dit.config.enable_bsa is False


def test_an_interrupted_call_leaves_nothing_behind(pipes, monkeypatch):
    p = pipes["basic"]
    v, s = _video(), _seed()
    ref = _lat(p, v, seed=s)
    orig = type(p.dit).forward
    calls = []

    def boom(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(type(p.dit), "forward", boom)
    with pytest.raises(KeyboardInterrupt):
        _lat(p, v, seed=s, use_bsa=True)
    monkeypatch.undo()
    assert p.dit.config.enable_bsa is False and not p.dit.training
    assert torch.equal(_lat(p, v, seed=s), ref)


def test_output_frames_dtype_range_and_extend_of_one_segment(pipes):
    p = pipes["distill"]
    v, s = _video(), _seed()
    kw = dict(resolution=(32, 48), num_frames=13, num_cond_frames=5, guidance_scale=1.0, num_inference_steps=2,
              progress=False)
    out = p(v, "a cat", generator=s, **kw)
    assert out.frames.dtype == np.uint8 and out.frames.shape == (9 + 8, 32, 48, 3)
    assert np.array_equal(out.frames[:9], v)
    assert out.model_frames.shape == (13, 32, 48, 3) and out.model_frames.dtype == np.uint8
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    lat = p(v, "a cat", generator=s, output_type="latent", **kw)
    assert lat.frames is None and torch.equal(lat.latents, out.latents)
    ext = p.extend(v, "a cat", generator=s, **kw)
    assert np.array_equal(ext.frames, out.frames)

