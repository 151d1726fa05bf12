"""Round 79: mutation testing of ``longcat_vc/`` (do the tests catch wrong code?).

78 single-point mutants of the model / pipeline semantics fixed by SPEC 6-11, each applied alone and run against the
tests that name the code it touches (grep of tests/vc). 63 were killed by the existing tests, 3 are equivalent, 12
survived as real gaps; the 10 tests below kill those 12 (each verified: fails with its mutant, passes without).
No product bug was found: every survivor was a missing check, not wrong behaviour.

Survivors -> the test here that kills them:

* schedule.vc_timesteps enhance_hf ``t > 500`` -> ``>=`` (a base timestep of exactly 500, shift 3 x 334 steps
  or shift 1 x 1000, ran twice) -> test_enhance_hf_keeps_only_timesteps_above_500_when_one_is_exactly_500
* schedule.cfg_zero ``+ 1e-8`` dropped (all-zero uncond: NaN) -> test_cfg_zero_keeps_the_1e8_in_its_denominator
* pipeline MODE_DEFAULTS basic guidance 4.0 -> 5.0 -> test_basic_mode_default_guidance_is_4
* pipeline.denormalize_latents ``z*std + mean`` -> ``- mean`` -> test_decode_denormalises_with_the_vae_latent_stats
* refine mixing ``(1-t) z + t noise`` -> weights swapped (the same at the default 0.5)
  -> test_refine_latents_mix_clip_and_noise_with_weights_1_minus_t_and_t
* text.clean_prompt one html.unescape instead of two (ftfy unescapes itself unless the text holds ``<``)
  -> test_clean_prompt_unescapes_twice_after_ftfy_even_where_ftfy_leaves_entities
* refine decode ``[cond_added : cond_added + 2F]`` -> ``[:2F]`` (front padding kept)
  -> test_refine_output_drops_the_front_padding_and_the_cond_frames
* refine cond latents ``posterior.sample(generator)`` -> ``.mode()``; refine normalisation ``* (1/std)`` -> ``* std``
  -> test_refine_cond_latents_are_a_posterior_sample_drawn_third_from_the_generator
* stages._denoise ``uncond, cond = pred.chunk(2)`` swapped; ``__call__`` default num_cond_frames 13 -> 9
  -> test_cfg_combines_uncond_first_half_and_default_13_cond_frames
* attention cache mode block-sparse for ``T > 1`` noisy frames -> ``T > 2``
  -> test_block_sparse_cache_on_equals_off_with_two_noisy_frames

Equivalent (left alone): loading.load_dit ``strict=True`` default -> False (its one caller, from_pretrained, always
passes strict; that default's mutant is killed by test_loading); loading._is_fastvideo ``>`` -> ``>=`` (a tie needs as
many model tensors under each layout's names: missing keys refused either way under strict loading);
dit._step_plan ``skip_cross=(c == T)`` -> False (with every frame cond the prefix path runs cross-attention on an
empty slice: same output).

Killed by existing tests (mutant -> first failing test): adaLN ``1 + scale`` dropped, shift/scale swapped, gate_msa /
gate_mlp swapped, gate dropped, cross-attn pre-norm without affine, cond tokens given cross output, text zero-pad
inverted, padded text not zeroed, cross k/v swapped -> test_dit::test_each_block_matches_longhand /
test_forward_matches_longhand; timestep sin/cos order, freq ``/half`` -> ``/(half-1)``, final-layer shift/scale swap,
unpatchify h/w swap, patch-embed h/w swap -> test_forward_matches_longhand; timestep not rounded to the weight dtype
-> test_timestep_is_rounded_to_weight_dtype_first; cache build at t=1, cached RoPE frame offset 0, last-block
build with shift/scale swapped -> test_dit (bf16 vs fp32) / test_dit_cache; freshness check skipped ->
round30_cache; cache dtype unchecked -> test_bad_cache_raises; shift formula, base sigmas to 0, enhance tail
with 0, distill ascending / arange from 0 -> test_schedule; Euler sign -> test_euler_step_fp32; CFG without st,
st over the whole batch -> test_cfg_zero_matches_longhand; distill default 15 steps, CFG at guidance 1 ->
test_distill_mode_defaults; cond timestep not 0, cond frames stepped (cache off) -> test_cache_on_equals_cache_off;
posterior mode, normalise ``* std``, first (not last) cond frames, pixels not in [-1, 1] ->
test_generator_order_and_cond_latents; new frames from ``nc - 1`` -> test_basic_schedule_cfg_batch_and_timesteps;
num_frames rounded up -> test_num_frames_rounded_down; ``num_frames <= nc`` -> ``<`` -> test_bad_input; fps stride
floor -> test_video_io::test_subsampling; TARGET_FPS 16 -> test_path_input_is_subsampled_and_output_size; bucket
ratio w/h -> test_buckets; text length 256 -> test_basic_schedule_cfg_batch_and_timesteps; extend conditioned on the
input again -> test_extend_chains_segments; window step, window cond count swapped -> round76_extend; negative
prompt at guidance 1 accepted -> round2::test_ignored_arguments_raise; refine ``t < th`` -> ``<=``, t_thresh 1
refused, no cond padding to 4, trilinear align_corners False -> round31_refine; refine nc 2x swapped, stage-1 cond
count, fps swapped, new frames from ``nc - 1`` -> test_refine; LoRA default alpha 1.0, multiplier dropped (unfused
and fused), FastVideo alpha not divided by r, up blocks on rank 0, unfuse adds -> test_lora / round26_lora;
SwiGLU width ceil -> round5_load; from_pretrained ``strict`` default False -> test_loading.

Each test's references come from SPEC 6-11 written out here in fp64 (or from the VAE config and the recorded
inputs), never from the code under test.
"""

import math

import numpy as np
import pytest
import torch

from longcat_vc import schedule as sched
from longcat_vc.pipeline import VideoContinuationPipeline
from vc_components import (StandInDiT, build_text_encoder, build_tokenizer, build_vae, random_frames,
                           write_refine_checkpoint)


def _seed() -> int:
    return int(np.random.default_rng().integers(0, 2 ** 31))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok79")
    return VideoContinuationPipeline(StandInDiT().eval(), build_vae(), build_text_encoder(),
                                     build_tokenizer(str(d / "tokenizer")), {"shift": 12.0})


@pytest.fixture(scope="module")
def refine_pipe(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_refine79"))
    write_refine_checkpoint(root)
    return VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                     progress=False)


# ------------------------------------------------------------------ schedule (SPEC 7)
def _plain_fp32(n: int, shift: float) -> torch.Tensor:
    """SPEC 7's plain timesteps in fp32 (the precision the schedule is defined in)."""
    s = torch.linspace(1.0, 0.001, n, dtype=torch.float32)
    return shift * s / (1 + (shift - 1) * s) * 1000


def test_enhance_hf_keeps_only_timesteps_above_500_when_one_is_exactly_500():
    """SPEC 7: "keep the base timesteps above 500, then append linspace(500, 0, 10, endpoint=False)". Where a
    base timestep is exactly 500 it must not be kept (the tail starts at 500): 500 twice is a wasted DiT step
    of length 0 and a schedule that is not strictly decreasing. (Mutant: ``>`` -> ``>=``.)"""
    seed = _seed()
    rng = np.random.default_rng(seed)
    hits = [(sh, n) for sh in (1.0, 3.0) for n in range(2, 1001) if bool((_plain_fp32(n, sh) == 500).any())]
    assert hits, "no (shift, steps) with a base timestep of exactly 500 in fp32: the test lost its case"
    shift, n = hits[rng.integers(len(hits))]
    plain = _plain_fp32(n, shift)
    ts, sig = sched.vc_timesteps(n, shift, "enhance_hf")
    kept = plain[plain > 500]
    tail = torch.tensor([500.0 - 50.0 * i for i in range(10)], dtype=torch.float32)
    msg = f"seed={seed} shift={shift} n={n}"
    assert torch.equal(ts, torch.cat([kept, tail])), msg
    assert int((ts == 500).sum()) == 1 and bool((ts[1:] < ts[:-1]).all()), msg
    assert torch.equal(sig, torch.cat([ts / 1000, torch.zeros(1)])), msg


def test_cfg_zero_keeps_the_1e8_in_its_denominator():
    """SPEC 7: ``st = <cond, uncond> / (||uncond||^2 + 1e-8)``. An all-zero uncond prediction gives st = 0 and
    ``pred = g * cond`` (without the 1e-8: 0/0 = NaN everywhere); an uncond of squared norm ~1e-8 gets half the st.
    (Mutant: the 1e-8 dropped.)"""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    g = 1.5 + 4 * float(torch.rand((), generator=gen))
    cond = torch.randn(3, 4, 2, 3, 5, generator=gen, dtype=torch.float64)
    uncond = torch.randn(3, 4, 2, 3, 5, generator=gen, dtype=torch.float64)
    uncond[0] = 0
    uncond[1] *= 1e-4 / uncond[1].norm()  # ||u||^2 = 1e-8
    out = sched.cfg_zero(uncond, cond, g)
    c, u = cond.reshape(3, -1), uncond.reshape(3, -1)
    st = (c * u).sum(1) / ((u * u).sum(1) + 1e-8)
    want = (u * st[:, None] + g * (c - u * st[:, None])).reshape(cond.shape)
    msg = f"seed={seed} g={g}"
    assert torch.isfinite(out).all(), msg
    assert torch.equal(out[0], g * cond[0]), msg
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=msg)
    # fp32 inputs (the pipeline's): the same answer to fp32 rounding
    torch.testing.assert_close(sched.cfg_zero(uncond.float(), cond.float(), g), want.float(), rtol=1e-5, atol=1e-5,
                               msg=msg)


# ------------------------------------------------------------------ pipeline defaults and the VAE (SPEC 7)
def _record_cfg(monkeypatch):
    seen = []
    orig = sched.cfg_zero

    def rec(uncond, cond, guidance_scale):
        seen.append(guidance_scale)
        return orig(uncond, cond, guidance_scale)

    monkeypatch.setattr(sched, "cfg_zero", rec)
    return seen


def test_basic_mode_default_guidance_is_4(pipe, monkeypatch):
    """SPEC 7: basic VC guidance 4.0 by default: CFG-zero runs with g = 4 at every step. (Mutant: the default
    changed; no test called the pipeline in basic mode without a guidance_scale and looked at the g it used.)"""
    seed = _seed()
    v = random_frames(5, 32, 48, seed % 1000)
    kw = dict(resolution=(32, 48), num_frames=9, num_cond_frames=5, num_inference_steps=1, progress=False,
              output_type="latent")
    seen = _record_cfg(monkeypatch)
    out = pipe(v, "a cat", generator=seed, **kw)
    assert seen and set(seen) == {4.0}, f"seed={seed}: {seen}"  # one per step (enhance_hf: 1 + 10 steps)
    assert len(seen) == out.timings["steps"] and bool(torch.isfinite(out.latents).all()), f"seed={seed}"


def test_decode_denormalises_with_the_vae_latent_stats(pipe, monkeypatch):
    """SPEC 7: "Decode after denormalising": the VAE gets ``z * latents_std + latents_mean`` (VAE config).
    (Mutant: ``- mean``; the round trip normalise -> denormalise does not see a mutant of one side only if both
    are wrong, so the VAE's input is checked against the config.)"""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, 16, 2, 4, 6, generator=gen)
    mean = torch.tensor(pipe.vae.config.latents_mean, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std, dtype=torch.float64).view(1, 16, 1, 1, 1)
    assert bool((mean != 0).any()) and bool((std != 1).any())  # else the test sees nothing
    got = []
    orig = pipe.vae.decode

    def rec(z, *a, **k):
        got.append(z.clone())
        return orig(z, *a, **k)

    monkeypatch.setattr(pipe.vae, "decode", rec)
    frames = pipe.decode_latents(lat)
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
    torch.testing.assert_close(got[0].double(), lat.double() * std + mean, rtol=1e-6, atol=1e-6, msg=f"seed={seed}")
    # and normalise is its inverse against the same stats
    torch.testing.assert_close(pipe.normalize_latents(got[0]).double(), lat.double(), rtol=1e-5, atol=1e-5,
                               msg=f"seed={seed}")


# ------------------------------------------------------------------ refinement latents (SPEC 11)
def test_refine_latents_mix_clip_and_noise_with_weights_1_minus_t_and_t(pipe):
    """SPEC 11: ``z = (1 - t_thresh) * z + t_thresh * noise``. The draws (posterior sample, then the noise) do not
    depend on ``t_thresh`` nor on the frames' content, so for two clips A and B under one seed
    ``L_A(t) - L_B(t) = (1 - t) (z_A - z_B)``, and ``t_thresh = 1`` is pure noise (the same for both clips).
    The default 0.5 cannot tell the weights apart. (Mutant: the weights swapped.)"""
    from longcat_vc.refine import prepare_refine_latents

    seed = _seed()
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    t1, t2 = (float(v) for v in rng.uniform(0.05, 0.45, 2))

    def lat(frames, t):
        out, pad = prepare_refine_latents(pipe, frames, None, (32, 32), 5, 0, t, torch.Generator().manual_seed(seed))
        assert pad["cond_latents"] == 0 and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
        return out.double()

    msg = f"seed={seed} t={t1:.3f},{t2:.3f}"
    assert torch.equal(lat(a, 1.0), lat(b, 1.0)), msg  # t_thresh 1: noise only
    d1, d2 = lat(a, t1) - lat(b, t1), lat(a, t2) - lat(b, t2)
    assert float(d2.abs().max()) > 1e-3, msg
    torch.testing.assert_close(d1 * (1 - t2), d2 * (1 - t1), rtol=1e-4, atol=1e-5, msg=msg)


# ------------------------------------------------------------------ prompt cleaning (SPEC 7)
def test_clean_prompt_unescapes_twice_after_ftfy_even_where_ftfy_leaves_entities():
    """SPEC 7: "ftfy fix, HTML unescape twice, whitespace collapsed". ftfy unescapes entities itself unless the
    text holds a literal ``<`` (it takes it for HTML then): only such a prompt shows the two unescapes. The existing
    ``&amp;amp;`` case passes with one. (Mutant: one ``html.unescape``.)"""
    import html

    from longcat_vc.text import clean_prompt

    seed = _seed()
    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "road", "a", "the", "red", "sky"]
    chars = ["&", "<", ">"]
    parts, want = ["x < y"], ["x < y"]
    for _ in range(6):
        w = words[rng.integers(len(words))]
        ch = chars[rng.integers(len(chars))]
        parts.append(w + html.escape(html.escape(ch)) + w)  # e.g. "cat&amp;amp;cat"
        want.append(w + ch + w)
    text = "  " + " \n\t ".join(parts) + " "
    assert clean_prompt(text) == " ".join(want), f"seed={seed} {text!r}"


@pytest.mark.filterwarnings("ignore:block-sparse gating")  # the tiny grid's cond part has one key block
def test_refine_output_drops_the_front_padding_and_the_cond_frames(refine_pipe):
    """SPEC 11: "decode, drop the front padding, keep 2F frames"; the written video is the input followed by the
    refined frames after the cond ones. The front padding (copies of the first cond frame) is
    ``1 + (ceil4(1 + ceil((nc - 1) / 4)) - 1) * 4 - nc`` frames, written out here. (Mutants: the padding kept,
    ``decoded[:2F]``; the new frames taken from ``nc - 1``. The refine tests checked counts and shapes only.)"""
    seed = _seed()
    rng = np.random.default_rng(seed)
    nc = int(rng.choice([1, 2, 3, 5]))
    f1 = 3
    n_ref = 2 * f1
    c_lat = 1 + math.ceil((nc - 1) / 4)
    added = 1 + (4 * math.ceil(c_lat / 4) - 1) * 4 - nc
    vid = rng.integers(0, 256, (nc + 2, 64, 64, 3), dtype=np.uint8)  # at the model size: no resize on output
    s1 = rng.integers(0, 256, (f1, 64, 64, 3), dtype=np.uint8)
    out = refine_pipe.refine(s1, "a cat", video=vid, num_cond_frames=nc, resolution=(64, 64), generator=seed,
                             num_inference_steps=2, progress=False)
    msg = f"seed={seed} nc={nc} f1={f1} added={added}"
    every = refine_pipe.decode_latents(out.latents)
    assert added > 0 and every.shape[0] >= added + n_ref, msg
    np.testing.assert_array_equal(out.model_frames, every[added:added + n_ref], err_msg=msg)
    assert out.frames.shape == (len(vid) + n_ref - nc, 64, 64, 3), msg
    np.testing.assert_array_equal(out.frames[:len(vid)], vid, err_msg=msg)
    np.testing.assert_array_equal(out.frames[len(vid):], every[added + nc:added + n_ref], err_msg=msg)


def test_refine_cond_latents_are_a_posterior_sample_drawn_third_from_the_generator(pipe):
    """SPEC 11: the cond latents are "replaced by the encoded cond frames of the original video (same rule as VC,
    SPEC 7)": a posterior *sample* of the front-padded cond frames, drawn from the generator after the clip's
    posterior sample and the mixing noise, normalised. Rebuilt here from the VAE, the config stats and the
    generator. (Mutant: the posterior mean, ``.mode()``; no refine test looked at the cond latents' values.)"""
    from longcat_vc.refine import prepare_refine_latents

    seed = _seed()
    rng = np.random.default_rng(seed)
    nc = int(rng.choice([1, 2, 5]))
    c_lat = 4 * math.ceil((1 + math.ceil((nc - 1) / 4)) / 4)
    added = 1 + (c_lat - 1) * 4 - nc
    clip = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    vid = rng.integers(0, 256, (nc + 1, 32, 32, 3), dtype=np.uint8)  # at the size: no resize
    t = float(rng.uniform(0.2, 0.8))
    lat, pad = prepare_refine_latents(pipe, clip, vid, (32, 32), 8, nc, t, torch.Generator().manual_seed(seed))
    msg = f"seed={seed} nc={nc} t={t:.3f}"
    assert (pad["cond_latents"], pad["cond_added"]) == (c_lat, added), msg

    g = torch.Generator().manual_seed(seed)
    torch.randn(lat.shape, generator=g)  # draw 1: the clip's posterior sample
    torch.randn(lat.shape, generator=g)  # draw 2: the mixing noise
    px = torch.from_numpy(vid[-nc:]).double().div(255).mul(2).sub(1).permute(3, 0, 1, 2)[None]
    px = torch.cat([px[:, :, :1].repeat(1, 1, added, 1, 1), px], dim=2)
    with torch.no_grad():
        zc = pipe.vae.encode(px.float()).latent_dist.sample(generator=g)  # draw 3
    mean = torch.tensor(pipe.vae.config.latents_mean, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std, dtype=torch.float64).view(1, 16, 1, 1, 1)
    want = (zc.double() - mean) / std
    assert want.shape[2] == c_lat, msg
    torch.testing.assert_close(lat[:, :, :c_lat].double(), want, rtol=1e-4, atol=1e-4, msg=msg)


def test_cfg_combines_uncond_first_half_and_default_13_cond_frames(pipe):
    """SPEC 7: the CFG batch is ``[uncond; cond]`` and ``pred = uncond*st + g*(cond - uncond*st)``; ``num_cond_frames``
    defaults to 13 (4 cond latents). Every Euler step is rebuilt in fp64 from the DiT's recorded input and output
    (sigma = t / 1000 for enhance_hf, a final 0). (Mutants: the halves swapped when the prediction is split; the
    default of 13 changed. Cache on == off and the schedule tests do not see either.)"""
    seed = _seed()
    rng = np.random.default_rng(seed)
    g = float(rng.uniform(2.0, 6.0))
    v = random_frames(14, 32, 48, seed % 1000)
    calls = []
    orig = pipe.dit.forward

    def rec(x, t, enc, mask, **kw):
        out = orig(x, t, enc, mask, **kw)
        calls.append((x.double(), t.double(), enc, kw["num_cond_latents"], out.double()))
        return out

    neg = "ugly blurred"
    pipe.dit.forward = rec
    try:
        res = pipe(v, "a dog runs", neg, resolution=(32, 48), num_frames=17, num_inference_steps=1, guidance_scale=g,
                   generator=seed, progress=False, output_type="latent")
    finally:
        del pipe.dit.forward
    msg = f"seed={seed} g={g:.3f}"
    assert calls and all(c[3] == 4 for c in calls), msg  # 13 cond frames -> 4 cond latents
    assert res.latents.shape[2] == 5 and calls[0][0].shape[2] == 1, msg  # 17 frames -> 5 latents, 1 noisy
    assert torch.equal(calls[0][2][0], pipe.encode_text([neg])[0][0]), msg  # the negative prompt is half 0
    xs = [c[0][0] for c in calls] + [res.latents[0, :, 4:].double()]
    for i, (x, t, _, _, out) in enumerate(calls):
        assert torch.equal(x[0], x[1]), msg
        u, c = out[0].flatten(), out[1].flatten()
        st = (u @ c) / (u @ u + 1e-8)
        pred = (u * st + g * (c - u * st)).view_as(out[0])
        s = float(t[0, 0]) / 1000
        s_next = float(calls[i + 1][1][0, 0]) / 1000 if i + 1 < len(calls) else 0.0
        torch.testing.assert_close(xs[i + 1], x[0] - (s_next - s) * pred, rtol=1e-5, atol=1e-5, msg=f"{msg} step {i}")


# ------------------------------------------------------------------ DiT: block-sparse KV cache (SPEC 3/4, 11)
def test_block_sparse_cache_on_equals_off_with_two_noisy_frames():
    """With ``enable_bsa`` every attention call whose query grid has more than one frame is block-sparse, the cached
    noisy part included: cache on == cache off also for exactly 2 noisy latent frames, where BSA really drops
    blocks. The existing test runs 3 and 4 noisy frames only. (Mutant: the cached path block-sparse only above 2
    noisy frames.)"""
    from test_dit import rel_l2
    from test_dit_cache import _cache_off_on
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

    seed = _seed()
    c = int(np.random.default_rng(seed).integers(1, 4))
    bsa = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}
    cfg = tiny_config(enable_bsa=True, bsa_params=bsa)
    sd = random_state_dict(cfg, seed=seed)
    torch.manual_seed(seed)  # make_inputs draws its own seed from the global RNG
    off, on, _ = _cache_off_on(model_from_state_dict(cfg, sd), cfg, c, T=c + 2)
    torch.manual_seed(seed)
    off_dense, _, _ = _cache_off_on(model_from_state_dict(tiny_config(), sd), cfg, c, T=c + 2)
    msg = f"seed={seed} c={c}"
    assert on.shape[2] == 2 and bool(torch.isfinite(on).all()), msg
    assert rel_l2(off[:, :, c:], off_dense[:, :, c:]) > 1e-4, msg  # sparsity 0.5 drops blocks of the noisy part
    assert rel_l2(on, off[:, :, c:]) < 1e-5, msg
