"""Round 57 (batches through longcat_vc: the DiT, the KV cache, the VC pipeline's CFG batch):

* ``VideoContinuationPipeline.decode_latents`` took a batch of clips ``[B, 16, T, h, w]`` and returned the
  first clip's frames, the others dropped without a word. It now refuses anything but one clip
  ``[1, z_dim, T, h, w]``, naming ``latents``.

Plus pins (fresh random inputs, fp32): each sample of a batch-3 DiT forward equals its batch-1 forward in every
attention mode (full, cond prefix, KV cache of batch B and of batch 1, dense and block-sparse, per-sample
timesteps and text masks, expanded / strided batches); the pipeline's CFG batch equals running its uncond and
cond halves one at a time (cache on and off); batch text encoding equals one prompt at a time; lists where the
pipeline takes one prompt / generator raise naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longcat_vc.schedule import cfg_zero, euler_step
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

_RNG = np.random.default_rng()
BSA = dict(enable_bsa=True, bsa_params=dict(sparsity=0.5, chunk_3d_shape_q=[2, 2, 2], chunk_3d_shape_k=[2, 2, 2]))


def _seed() -> int:
    return int(_RNG.integers(0, 2**31))


def _rel(a, b) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


def _model(bsa: bool, **kw):
    cfg = tiny_config(attn_backend="torch", **(BSA if bsa else {}), **kw)
    return model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))


def _inputs(B=3, T=6, H=8, W=8, L=7):
    g = torch.Generator().manual_seed(_seed())
    x = torch.randn(B, 16, T, H, W, generator=g)
    y = torch.randn(B, 1, L, 32, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:] = 0  # per-sample padding: 5, 7 and 3 valid tokens
    mask[2, 3:] = 0
    t = torch.rand(B, generator=g) * 1000  # a different timestep per sample
    return x, t, y, mask


# ---------------------------------------------------------------- the bug fixed this round


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pytest.importorskip("diffusers")
    from longcat_vc.pipeline import VideoContinuationPipeline
    from vc_components import full_checkpoint_in

    root = full_checkpoint_in(tmp_path_factory, "ckpt57")
    return VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", mode="basic",
                                                     progress=False)


def test_decode_latents_refuses_a_batch_of_clips(pipe):
    """A [2, 16, T, h, w] batch decoded to the first clip's frames alone (the second dropped silently)."""
    lat = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(_seed()))
    one = pipe.decode_latents(lat)
    assert one.shape == (5, 32, 48, 3) and one.dtype == np.uint8
    for bad in (torch.cat([lat, torch.randn_like(lat)]), lat[0], torch.randn(1, 8, 2, 4, 6)):
        with pytest.raises(ValueError, match=r"latents: expected one clip \[1, 16, T, h, w\]"):
            pipe.decode_latents(bad)


# ---------------------------------------------------------------- pins: the DiT per sample


@pytest.mark.parametrize("bsa,zero_pad", [(False, False), (True, False), (False, True)])
def test_dit_batch_equals_each_sample_alone(bsa, zero_pad):
    """(``text_tokens_zero_pad``: the released config, padded text tokens attended as zero vectors.)"""
    m = _model(bsa, text_tokens_zero_pad=zero_pad)
    x, t, y, mask = _inputs()
    B, c, T = x.shape[0], 2, x.shape[2]
    tt = t[:, None].expand(B, T).clone()
    tt[:, :c] = 0
    with torch.no_grad():
        full = m(x, t, y, mask)
        full_1 = torch.cat([m(x[i:i + 1], t[i:i + 1], y[i:i + 1], mask[i:i + 1]) for i in range(B)])
        assert _rel(full, full_1) < 1e-5
        pre = m(x, tt, y, mask, num_cond_latents=c)
        pre_1 = torch.cat([m(x[i:i + 1], tt[i:i + 1], y[i:i + 1], mask[i:i + 1], num_cond_latents=c)
                           for i in range(B)])
        assert _rel(pre, pre_1) < 1e-5
        cache = m.build_kv_cache(x[:, :, :c])  # batch B: one cache row per sample
        assert cache.batch == B
        on = m(x[:, :, c:], t, y, mask, kv_cache=cache)
        on_1 = torch.cat([m(x[i:i + 1, :, c:], t[i:i + 1], y[i:i + 1], mask[i:i + 1],
                            kv_cache=m.build_kv_cache(x[i:i + 1, :, :c])) for i in range(B)])
        assert _rel(on, on_1) < 1e-5 and _rel(on, pre[:, :, c:]) < 1e-5
        # the same cache reused: same answer
        assert torch.equal(m(x[:, :, c:], t, y, mask, kv_cache=cache), on)
    assert _rel(full, pre) > 1e-3  # the modes differ: the comparisons above are not vacuous


@pytest.mark.parametrize("bsa", [False, True])
def test_batch_one_cache_shared_over_the_batch(bsa):
    """The CFG case: one video's cache (batch 1) serves a batch of different noisy latents / prompts."""
    m = _model(bsa)
    x, t, y, mask = _inputs()
    B, c = x.shape[0], 2
    x[1:, :, :c] = x[:1, :, :c]  # one video's cond frames
    with torch.no_grad():
        c1 = m.build_kv_cache(x[:1, :, :c])
        cb = m.build_kv_cache(x[:, :, :c])
        assert c1.batch == 1
        shared = m(x[:, :, c:], t, y, mask, kv_cache=c1)
        assert _rel(shared, m(x[:, :, c:], t, y, mask, kv_cache=cb)) < 1e-5
        each = torch.cat([m(x[i:i + 1, :, c:], t[i:i + 1], y[i:i + 1], mask[i:i + 1], kv_cache=c1) for i in range(B)])
        assert _rel(shared, each) < 1e-5
        with pytest.raises(ValueError, match=r"kv_cache: batch 3, expected 1 or 6"):
            m(torch.cat([x, x])[:, :, c:], torch.cat([t, t]), torch.cat([y, y]), torch.cat([mask, mask]), kv_cache=cb)


def test_expanded_and_strided_batches_equal_contiguous_ones():
    m = _model(True)
    x, t, y, mask = _inputs()
    B, c = x.shape[0], 2
    xe, ye, me = x[:1].expand(B, -1, -1, -1, -1), y[:1].expand(B, -1, -1, -1), mask[:1].expand(B, -1)
    xs = torch.stack([x, torch.full_like(x, float("nan"))], dim=1)[:, 0]  # batch stride 2 samples
    with torch.no_grad():
        ref = m(x[:1, :, c:].contiguous(), t[:1], y[:1], mask[:1], kv_cache=m.build_kv_cache(x[:1, :, :c].contiguous()))
        out = m(xe[:, :, c:], t[:1].expand(B), ye, me, kv_cache=m.build_kv_cache(xe[:, :, :c]))
        assert all(_rel(out[i:i + 1], ref) < 1e-5 for i in range(B))
        assert _rel(m(xs, t, y, mask), m(x, t, y, mask)) < 1e-6  # (NaN neighbours never read)


def test_mismatched_batch_sizes_name_the_argument():
    m = _model(False)
    x, t, y, mask = _inputs()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"timestep: expected shape \[3\]"):
            m(x, t[:2], y, mask)
        with pytest.raises(ValueError, match=r"encoder_hidden_states: expected shape \[3, 1, L"):
            m(x, t, y[:1], mask[:1])
        with pytest.raises(ValueError, match=r"encoder_attention_mask: expected shape \[3, 7\]"):
            m(x, t, y, mask[:2])


# ---------------------------------------------------------------- pins: the pipeline's CFG batch


@pytest.mark.parametrize("use_kv_cache,g", [(True, 3.5), (False, 3.5), (True, 1.0)])
def test_pipeline_cfg_batch_equals_its_halves_run_alone(pipe, use_kv_cache, g):
    """[uncond; cond] in one batch, the cond frames' cache of batch 1 shared: each half equals the DiT run on
    that half alone (not swapped, not mixed), CFG-zero over noisy frames (cache) or all frames (no cache).
    Guidance 1 (as distilled VC): no uncond half, one forward of the prompt per step."""
    from vc_components import random_frames

    video = random_frames(9, 32, 48, seed=_seed())
    seed = _seed()
    prompt, neg = "a cat walks on the road", ("blurred static" if g > 1 else None)
    kw = dict(resolution=(32, 48), num_frames=13, num_cond_frames=5, num_inference_steps=2, guidance_scale=g,
              progress=False, output_type="latent", use_kv_cache=use_kv_cache)
    out = pipe(video, prompt, neg, generator=torch.Generator().manual_seed(seed), **kw).latents

    dit = pipe.dit
    lat = pipe.prepare_latents(video, (32, 48), 13, 5, torch.Generator().manual_seed(seed))
    c = 2
    e_neg, m_neg = pipe.encode_text(neg or "")
    e_pos, m_pos = pipe.encode_text(prompt)
    timesteps, sigmas = pipe._schedule(2)
    with torch.no_grad():
        cache = dit.build_kv_cache(lat[:, :, :c]) if use_kv_cache else None
        x = lat[:, :, c:].clone() if use_kv_cache else lat.clone()
        for i in range(len(timesteps)):
            tstep = torch.full((1, x.shape[2]), float(timesteps[i]))
            if not use_kv_cache:
                tstep[:, :c] = 0
            kw_d = dict(kv_cache=cache) if use_kv_cache else dict(num_cond_latents=c)
            u = dit(x, tstep, e_neg, m_neg, **kw_d)
            p = dit(x, tstep, e_pos, m_pos, **kw_d)
            pred = cfg_zero(u, p, g) if g > 1 else p
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            if use_kv_cache:
                x = euler_step(x, pred, s, s_next)
            else:
                x[:, :, c:] = euler_step(x[:, :, c:], pred[:, :, c:], s, s_next)
        ref = torch.cat([lat[:, :, :c], x], dim=2) if use_kv_cache else x
        swapped = cfg_zero(p, u, g)  # the halves exchanged: must not match
    assert _rel(out, ref) < 1e-5
    if g > 1:
        assert _rel(swapped, pred) > 1e-3


def test_batch_text_encoding_equals_one_prompt_at_a_time(pipe):
    words = "a the cat dog person rides road water forest red blue sky car walks runs".split()
    prompts = [" ".join(_RNG.choice(words, size=int(_RNG.integers(1, 9)))) for _ in range(3)] + [""]
    embeds, mask = pipe.encode_text(prompts)
    assert embeds.shape[0] == mask.shape[0] == len(prompts)
    for i, p in enumerate(prompts):
        e1, m1 = pipe.encode_text(p)
        assert torch.equal(m1, mask[i:i + 1]) and torch.allclose(e1, embeds[i:i + 1], atol=1e-6, rtol=0)


def test_lists_where_the_pipeline_takes_one_raise_naming_the_argument(pipe):
    from vc_components import random_frames

    video = random_frames(9, 32, 48, seed=_seed())
    kw = dict(resolution=(32, 48), num_frames=13, num_cond_frames=5, progress=False, output_type="latent")
    with pytest.raises(TypeError, match="prompt must be a str, got list"):
        pipe(video, ["a cat", "a dog"], **kw)
    with pytest.raises(TypeError, match="negative_prompt must be a str or None, got list"):
        pipe(video, "a cat", ["x", "y"], **kw)
    with pytest.raises(TypeError, match="generator must be a torch.Generator, an int seed or None, got list"):
        pipe(video, "a cat", generator=[torch.Generator(), torch.Generator()], **kw)
    with pytest.raises(ValueError, match=r"video: frame array must be \[F, H, W, 3\]"):
        pipe(np.stack([video, video]), "a cat", **kw)
    with pytest.raises(ValueError, match="prompts has 3 entries but segments=2"):
        pipe.extend(video, ["a", "b", "c"], segments=2, resolution=(32, 48), num_frames=13, num_cond_frames=5)
