"""Hostile audit, round 57: float16 end to end (older GPUs, diffusers' fp16 pipelines), CPU backends.

fp64 references computed from the same fp16 inputs. Verified and pinned: every attention op keeps scores
and softmax statistics in fp32 (|q.k| past 65504 with scale 1, outputs at fp16 max, subnormal values; lse
fp32; two partial results merge exactly), the q/k RMSNorm squares in fp32 (|x| > 256), gating scores in
fp32, and a tiny fp16 DiT agrees with its fp32 twin. Two bugs: an unfused LoRA adapter applied its
``alpha_scale * multiplier`` after ``up(down(x))``, which overflowed fp16 to Inf where the scaled update
(and the fused weights) were finite; and ``decode_latents`` turned NaN pixels of an overflowing fp16 VAE
into black frames without a word.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import longcat_kernels as lk

_TRITON = pytest.param("triton", marks=pytest.mark.triton_interpret)
_VC = str(Path(__file__).resolve().parent / "vc")


def _vc_path():
    if _VC not in sys.path:
        sys.path.insert(0, _VC)


def _backend(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    return backend


def _ref(q, k, v, scale, prefix=0):
    """fp64 attention (queries before ``prefix`` see keys before it only) -> (out, lse [B, H, Sq])."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if prefix:
        s[:, :, :prefix, prefix:] = float("-inf")
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double()), torch.logsumexp(s, -1)


def _rand(*shape, mag=1.0):
    return ((torch.rand(*shape) * 2 - 1) * mag).half()


GRID, CHUNK = (2, 4, 4), (1, 2, 2)


@pytest.mark.parametrize("backend", ["torch", _TRITON])
@pytest.mark.parametrize("mag", [40.0, 200.0])
def test_attention_ops_keep_fp16_scores_past_65504_in_fp32(backend, mag):
    """|q.k| well past fp16's range at scale 1 and at the default scale: no Inf score, no NaN row; out
    and lse (fp32) match fp64 of the same fp16 inputs on every attention entry."""
    be = _backend(backend)
    B, S, H, D = 1, 32, 2, 16
    q, k, v = _rand(B, S, H, D, mag=mag), _rand(B, S, H, D, mag=mag), _rand(B, S, H, D)
    assert (torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()).abs().max() > 65504) == (mag == 200.0)
    for scale in (1.0, None):
        sc = D ** -0.5 if scale is None else scale
        ro, rl = _ref(q, k, v, sc)
        calls = {
            "dense": lambda: lk.attn_with_kv_cache(q, k, v, scale=scale, backend=be, return_lse=True),
            "cache": lambda: lk.attn_with_kv_cache(q, k[:, 16:], v[:, 16:], k[:, :16], v[:, :16], scale=scale,
                                                   backend=be, return_lse=True),
            "bsa": lambda: lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.0, scale=scale,
                                                backend=be, return_lse=True),
            "flash": lambda: lk.flash_attn_with_kvcache(q, k, v, softmax_scale=scale, return_softmax_lse=True,
                                                        backend=be),
        }
        for name, call in calls.items():
            o, lse = call()
            assert o.dtype == torch.float16 and lse.dtype == torch.float32, name
            assert torch.isfinite(o).all() and torch.isfinite(lse).all(), name
            assert (o.double() - ro).abs().max() <= 2e-3, name
            # fp32 scores sum terms of up to |q||k| ~ 4e4 that can cancel to a small lse: bound by the largest lse
            # (fp16 scores would be off by ulp(65504) = 32)
            assert ((lse.double() - rl).abs() <= 1e-6 * rl.abs().max() + 1e-4).all(), name
        o, lse = lk.prefix_attn(q, k, v, 8, scale=scale, backend=be, return_lse=True)
        ro, rl = _ref(q, k, v, sc, prefix=8)
        assert torch.isfinite(o).all() and (o.double() - ro).abs().max() <= 2e-3
        assert ((lse.double() - rl).abs() <= 1e-6 * rl.abs().max() + 1e-4).all()


@pytest.mark.parametrize("backend", ["torch", _TRITON])
def test_fp16_outputs_at_fp16_max_and_subnormal_values(backend):
    be = _backend(backend)
    B, S, H, D = 1, 32, 2, 16
    q, k = _rand(B, S, H, D), _rand(B, S, H, D)
    v = torch.full((B, S, H, D), 65504.0, dtype=torch.half)
    v[..., 1::2] = -65504.0
    for o in (lk.attn_with_kv_cache(q, k, v, backend=be),
              lk.attn_with_kv_cache(q, k[:, 16:], v[:, 16:], k[:, :16], v[:, :16], backend=be),
              lk.prefix_attn(q, k, v, 8, backend=be),
              lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=be)):
        assert torch.equal(o, v)  # every weighted mean of +-65504 rounds back to it, never to Inf
    v = _rand(B, S, H, D, mag=1e-6)  # subnormal in fp16 (below 6.1e-5)
    o = lk.attn_with_kv_cache(q, k, v, backend=be)
    ro, _ = _ref(q, k, v, D ** -0.5)
    assert (o.double() - ro).abs().max() <= 6e-8  # one fp16 subnormal step (5.96e-8)


@pytest.mark.parametrize("backend", ["torch", _TRITON])
def test_fp16_partial_results_merge_through_lse(backend):
    """SPEC 12: two fp16 partial results over disjoint key sets merge to the full attention."""
    be = _backend(backend)
    B, S, H, D = 1, 16, 2, 16
    q, k, v = _rand(B, S, H, D, mag=30.0), _rand(B, 32, H, D, mag=30.0), _rand(B, 32, H, D)
    o1, l1 = lk.flash_attn_with_kvcache(q, k[:, :20], v[:, :20], softmax_scale=1.0, return_softmax_lse=True, backend=be)
    o2, l2 = lk.flash_attn_with_kvcache(q, k[:, 20:], v[:, 20:], softmax_scale=1.0, return_softmax_lse=True, backend=be)
    lse = torch.logaddexp(l1, l2)
    w1, w2 = (l1 - lse).exp().transpose(1, 2)[..., None], (l2 - lse).exp().transpose(1, 2)[..., None]
    out = o1.float() * w1 + o2.float() * w2
    ro, rl = _ref(q, k, v, 1.0)
    assert torch.isfinite(out).all() and (out.double() - ro).abs().max() <= 2e-3
    assert ((lse.double() - rl).abs() <= 1e-6 * rl.abs().max() + 1e-4).all()


@pytest.mark.parametrize("backend", ["torch", _TRITON])
@pytest.mark.parametrize("mag", [300.0, 6e4])
def test_fp16_qk_rmsnorm_squares_in_fp32(backend, mag):
    """|x| > 256: x**2 overflows fp16; the mean of squares is fp32, so the norm is finite and exact."""
    be = _backend(backend)
    B, S, H, D = 1, 16, 2, 32
    q, k = _rand(B, S, H, D, mag=mag), _rand(B, S, H, D, mag=mag)
    w = (torch.rand(D) + 0.5).half()
    rope = lk.Rope3D((1, 4, 4), D)
    for weight in (w, w.repeat(H)):  # per head (LongCat), all heads (Wan)
        oq, ok = lk.qk_norm_rope(q, k, weight, weight, None, backend=be)
        for x, o in ((q, oq), (k, ok)):
            xd = x.double().reshape(B, S, -1, weight.numel())
            r = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).half().double() * weight.double()
            assert torch.isfinite(o).all()
            assert (o.double() - r.reshape(o.shape)).abs().max() <= 4e-3
        oq, ok = lk.qk_norm_rope(q, k, weight, weight, rope, backend=be)
        assert torch.isfinite(oq).all() and torch.isfinite(ok).all()


@pytest.mark.parametrize("backend", ["torch", _TRITON])
def test_fp16_gating_of_large_norm_blocks_matches_the_oracle(backend):
    """Pooled fp16 blocks whose scores pass 65504 (fp32 scores): same selection as the fp64 oracle."""
    be = _backend(backend)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_hostile_round55_gating import _oracle

    q, k = _rand(1, 32, 2, 16, mag=3e4), _rand(1, 32, 2, 16, mag=3e4)
    for sp, cdf in ((0.5, None), (None, 0.9), (0.75, 0.5)):
        sel = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=sp, cdf_threshold=cdf, backend=be)
        mask, cnt = _oracle(q, k, GRID, GRID, CHUNK, CHUNK, sp, cdf)
        assert torch.equal(sel.to_mask(), mask) and torch.equal(sel.counts.long(), cnt)


def test_fp16_rope_is_fp32_math_rounded_once():
    D = 32
    rope = lk.Rope3D(GRID, D)
    assert all(t.dtype == torch.float32 for t in rope.tables())
    x = _rand(1, 32, 2, D, mag=100.0)
    o = lk.apply_rope_3d(x, rope)
    r = lk.apply_rope_3d(x.double(), rope)
    assert o.dtype == torch.float16
    # fp32 math rounded once: the fp64 result rounded to fp16, except where the fp64 value sits within fp32's
    # error of an fp16 rounding boundary (one ulp off, rare); fp16 math rounds every product
    same = o == r.half()
    assert same.float().mean() >= 0.99
    # (plus fp32's error on the terms, ~|x| 2^-23, where x cos - y sin cancels to a small value)
    assert ((o.double() - r).abs() <= r.abs() * 2 ** -10 + 2 ** -20 * x.abs().max().double()).all()


# ---------------------------------------------------------------------- longcat_vc in fp16
def _lora_linear(scale, multiplier, up_mag):
    from longcat_vc.lora import LoRAAdapter, LoRALinear, LoRAPart

    IN, OUT, R = 32, 16, 4
    lin = LoRALinear(IN, OUT, bias=True, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(OUT, IN) * 0.05)
        lin.bias.copy_(torch.randn(OUT) * 0.1)
    down, up = (torch.randn(R, IN) * 2).half(), (torch.randn(OUT, R) * up_mag).half()
    a = LoRAAdapter("x", down, [LoRAPart(0, OUT // 2, 0, R // 2, up[:OUT // 2, :R // 2], scale),
                                LoRAPart(OUT // 2, OUT, R // 2, R, up[OUT // 2:, R // 2:], scale)], multiplier)
    lin.lora_adapters["x"] = a
    lin.lora_active = [a]
    x = torch.randn(3, IN).half()
    d = (x.double() @ down.double().T)
    delta = torch.cat([d[:, :R // 2] @ up[:OUT // 2, :R // 2].double().T,
                       d[:, R // 2:] @ up[OUT // 2:, R // 2:].double().T], -1) * scale * multiplier
    ref = x.double() @ lin.weight.double().T + lin.bias.double() + delta
    return lin, x, ref


@pytest.mark.parametrize("scale, multiplier", [(1 / 128, 1.0), (0.5, 0.01)])
def test_unfused_fp16_lora_with_a_small_scale_does_not_overflow(scale, multiplier):
    """``up(down(x))`` of ~1e5 times alpha_scale 1/128 (FastVideo alpha/rank) or multiplier 0.01 is a few
    thousand, well inside fp16: the unfused adapter scaled after ``up`` and gave Inf (then NaN video),
    while the fused weights (fp32 delta) were finite."""
    lin, x, ref = _lora_linear(scale, multiplier, up_mag=3000.0)
    assert ref.abs().max() < 10000
    y = lin(x)
    assert torch.isfinite(y).all()
    # against the largest entry (fp16 rounds each of the few-thousand terms and the output to ~1e-3 of it:
    # an elementwise relative bound failed where the terms cancel to a small entry)
    top = ref.abs().max()
    assert (y.double() - ref).abs().max() <= 3e-3 * top
    lin._fuse()
    yf = lin(x)
    assert torch.isfinite(yf).all() and (yf.double() - ref).abs().max() <= 5e-3 * top


@pytest.mark.parametrize("scale, multiplier", [(0.5, 1.0), (1.0, 4.0), (2.0, -3.0)])
def test_unfused_fp16_lora_matches_fp64_for_any_scale(scale, multiplier):
    lin, x, ref = _lora_linear(scale, multiplier, up_mag=1.0)
    y = lin(x)
    assert torch.isfinite(y).all() and (y.double() - ref).abs().max() <= 3e-3 * ref.abs().max()


def test_decode_refuses_nan_pixels_of_an_overflowing_fp16_vae(tmp_path):
    """Finite latents, NaN pixels (the VAE overflowing fp16): cast to uint8 they were black frames,
    returned and written without a word."""
    _vc_path()
    from longcat_vc.pipeline import VideoContinuationPipeline
    from vc_components import StandInDiT, build_text_encoder, build_tokenizer, build_vae

    vae = build_vae()
    pipe = VideoContinuationPipeline(StandInDiT().eval(), vae, build_text_encoder(),
                                     build_tokenizer(str(tmp_path / "tok")), {"shift": 12.0})
    lat = torch.randn(1, 16, 2, 4, 6)
    frames = pipe.decode_latents(lat)  # finite: decodes as before
    assert frames.dtype.name == "uint8" and frames.shape[0] == 5
    dec = vae.decode
    vae.decode = lambda z, return_dict=False: (dec(z, return_dict=False)[0] * float("inf"),)
    with pytest.raises(FloatingPointError, match="VAE decoded finite latents to NaN/Inf pixels"):
        pipe.decode_latents(lat)


def test_tiny_fp16_dit_matches_its_fp32_twin():
    """Same (fp16-rounded) weights and inputs: the fp16 DiT (fp32 islands: adaLN, norms, gates, timestep
    embedding, final linear) stays within fp16 rounding of the fp32 one, cache off and on."""
    _vc_path()
    from test_dit import make_inputs
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

    cfg = tiny_config(attn_backend="torch")
    sd16 = {k: v.half() for k, v in random_state_dict(cfg, seed=int(torch.randint(0, 1000, ()))).items()}
    m16 = model_from_state_dict(cfg, sd16, dtype=torch.float16)
    m32 = model_from_state_dict(cfg, {k: v.float() for k, v in sd16.items()}, dtype=torch.float32)
    x, t, y, mask = make_inputs(cfg, B=2, T=2)
    with torch.no_grad():
        o16 = m16(x, t, y.half(), mask)
        o32 = m32(x, t.half().float(), y.half().float(), mask)
        assert o16.dtype == torch.float32 and torch.isfinite(o16).all()
        assert (o16 - o32).abs().max() <= 1e-2 * o32.abs().max()
        c16, c32 = m16.build_kv_cache(x[:1, :, :1]), m32.build_kv_cache(x[:1, :, :1])
        o16 = m16(x[:, :, 1:], t, y.half(), mask, kv_cache=c16)
        o32 = m32(x[:, :, 1:], t.half().float(), y.half().float(), mask, kv_cache=c32)
        assert torch.isfinite(o16).all() and (o16 - o32).abs().max() <= 1e-2 * o32.abs().max()
    assert math.isfinite(float(o16.abs().max()))
