"""LongCatDiT: state-dict contract, golden math against a longhand fp64 implementation, bf16, bad input.

The longhand implementation below is written from SPEC 5-6 with plain tensor arithmetic (explicit
angle loops for RoPE, explicit masks for the cond/noisy rule and the text padding, conv3d for the
patch embedding, index loops for unpatchify); it shares no code with ``longcat_vc`` or
``longcat_kernels``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longcat_vc import DiTConfig, KVCache, LongCatDiT
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

F64 = torch.float64


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/inf in output"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ====================================================================== longhand reference (fp64)
def lh_layernorm(x, w=None, b=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w + b
    return y


def lh_rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def lh_rope_angles(T, Hh, Ww, D, t0=0):
    """[T*Hh*Ww, D] angles: [t | h | w] parts of D-4(D//6), 2(D//6), 2(D//6) dims, pairs repeated."""
    dh = 2 * (D // 6)
    dt = D - 2 * dh

    def axis(n, d, start):
        a = torch.zeros(n, d, dtype=F64)
        for p in range(n):
            for i in range(d // 2):
                a[p, 2 * i] = a[p, 2 * i + 1] = (start + p) * 10000.0 ** (-(2 * i) / d)
        return a

    at, ah, aw = axis(T, dt, t0), axis(Hh, dh, 0), axis(Ww, dh, 0)
    rows = []
    for t in range(T):
        for h in range(Hh):
            for w in range(Ww):
                rows.append(torch.cat([at[t], ah[h], aw[w]]))
    return torch.stack(rows)


def lh_rotate(x, ang):
    """x [B, N, heads, D]; pairs (2i, 2i+1) rotated by ang [N, D]."""
    c, s = torch.cos(ang)[None, :, None], torch.sin(ang)[None, :, None]
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c[..., 0::2] - x[..., 1::2] * s[..., 0::2]
    out[..., 1::2] = x[..., 1::2] * c[..., 1::2] + x[..., 0::2] * s[..., 1::2]
    return out


def lh_attention(q, k, v, allowed):
    """q [B,Nq,h,D], k/v [B,Nk,h,D], allowed [B or 1, Nq, Nk] bool."""
    D = q.shape[-1]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


def lh_block(sd, i, cfg, x, temb, y, ymask, grid, P, skip_cross=False):
    """One block. x [B,N,C], temb [B,T,Dt], y [B,L,C] or None, ymask [B,L] bool or None,
    grid (T,Hh,Ww) of x with RoPE frames 0..T-1, P cond tokens at the start of x."""
    p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
    B, N, C = x.shape
    T, Hh, Ww = grid
    nh = cfg.num_heads
    D = C // nh
    frame = torch.arange(N) // (Hh * Ww)
    mod = F.silu(temb) @ p("adaLN_modulation.1.weight").T + p("adaLN_modulation.1.bias")  # [B,T,6C]
    sh1, sc1, g1, sh2, sc2, g2 = [m[:, frame] for m in mod.split(C, dim=-1)]  # [B,N,C]

    h = lh_layernorm(x) * (1 + sc1) + sh1
    qkv = h @ p("attn.qkv.weight").T + p("attn.qkv.bias")
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    q = lh_rms(q.reshape(B, N, nh, D), p("attn.q_norm.weight"))
    k = lh_rms(k.reshape(B, N, nh, D), p("attn.k_norm.weight"))
    v = v.reshape(B, N, nh, D)
    ang = lh_rope_angles(T, Hh, Ww, D)
    q, k = lh_rotate(q, ang), lh_rotate(k, ang)
    qi, ki = torch.arange(N)[:, None], torch.arange(N)[None, :]
    allowed = ((qi >= P) | (ki < P))[None]
    a = lh_attention(q, k, v, allowed).reshape(B, N, C)
    a = a @ p("attn.proj.weight").T + p("attn.proj.bias")
    x = x + g1 * a

    if not skip_cross:
        xn = lh_layernorm(x, p("pre_crs_attn_norm.weight"), p("pre_crs_attn_norm.bias"))
        L = y.shape[1]
        cq = lh_rms((xn @ p("cross_attn.q_linear.weight").T + p("cross_attn.q_linear.bias")).reshape(B, N, nh, D),
                    p("cross_attn.q_norm.weight"))
        kv = y @ p("cross_attn.kv_linear.weight").T + p("cross_attn.kv_linear.bias")
        ck = lh_rms(kv[..., :C].reshape(B, L, nh, D), p("cross_attn.k_norm.weight"))
        cv = kv[..., C:].reshape(B, L, nh, D)
        allowed = torch.ones(B, N, L, dtype=torch.bool) if ymask is None else ymask[:, None, :].expand(B, N, L)
        co = lh_attention(cq, ck, cv, allowed).reshape(B, N, C)
        co = co @ p("cross_attn.proj.weight").T + p("cross_attn.proj.bias")
        co[:, :P] = 0.0  # cond tokens: zero cross output
        x = x + co

    h = lh_layernorm(x) * (1 + sc2) + sh2
    f = (F.silu(h @ p("ffn.w1.weight").T) * (h @ p("ffn.w3.weight").T)) @ p("ffn.w2.weight").T
    return x + g2 * f


def lh_timestep_embedding(sd, cfg, ts):
    """ts [B,T] (already rounded to the weight dtype) -> [B,T,Dt]."""
    half = cfg.frequency_embedding_size // 2
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=F64)
    args = ts.double()[..., None] * freqs
    e = torch.cat([torch.cos(args), torch.sin(args)], -1)
    e = F.silu(e @ sd["t_embedder.mlp.0.weight"].T + sd["t_embedder.mlp.0.bias"])
    return e @ sd["t_embedder.mlp.2.weight"].T + sd["t_embedder.mlp.2.bias"]


def lh_forward(sd, cfg, x, ts, y, ymask, c=0):
    """Whole model in fp64. x [B,16,T,H,W]; ts [B,T]; y [B,1,L,Cc]; ymask [B,L] (1 = valid) or None."""
    sd = {k: v.double() for k, v in sd.items()}
    B, _, T, H, W = x.shape
    Hh, Ww = H // 2, W // 2
    C = cfg.hidden_size
    h = F.conv3d(x.double(), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=(1, 2, 2))
    h = h.flatten(2).transpose(1, 2)  # [B, N, C] in (t, h, w) order
    temb = lh_timestep_embedding(sd, cfg, ts)
    yy = y.double()[:, 0]
    yy = F.gelu(yy @ sd["y_embedder.y_proj.0.weight"].T + sd["y_embedder.y_proj.0.bias"], approximate="tanh")
    yy = yy @ sd["y_embedder.y_proj.2.weight"].T + sd["y_embedder.y_proj.2.bias"]
    if ymask is not None and cfg.text_tokens_zero_pad:
        yy = yy * ymask.double()[..., None]
        km = None
    else:
        km = None if ymask is None else ymask.bool()
    P = c * Hh * Ww
    for i in range(cfg.depth):
        h = lh_block(sd, i, cfg, h, temb, yy, km, (T, Hh, Ww), P)
    frame = torch.arange(h.shape[1]) // (Hh * Ww)
    mod = F.silu(temb) @ sd["final_layer.adaLN_modulation.1.weight"].T + sd["final_layer.adaLN_modulation.1.bias"]
    shift, scale = mod[:, frame, :C], mod[:, frame, C:]
    h = lh_layernorm(h) * (1 + scale) + shift
    h = h @ sd["final_layer.linear.weight"].T + sd["final_layer.linear.bias"]  # [B, N, 4*16]
    out = torch.zeros(B, cfg.out_channels, T, H, W, dtype=F64)
    n = 0
    for t in range(T):
        for a in range(Hh):
            for b in range(Ww):
                for ih in range(2):
                    for iw in range(2):
                        ch = (ih * 2 + iw) * cfg.out_channels
                        out[:, :, t, 2 * a + ih, 2 * b + iw] = h[:, n, ch:ch + cfg.out_channels]
                n += 1
    return out


# ====================================================================== fixtures
def make_inputs(cfg, B=2, T=3, H=4, W=6, L=7, seed=None, shared_cond=0):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    if shared_cond:
        x[1:, :, :shared_cond] = x[:1, :, :shared_cond]
    t = torch.rand(B, generator=g) * 1000
    y = torch.randn(B, 1, L, cfg.caption_channels, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, L - 2:] = 0  # sample 0 has 2 padded tokens
    return x, t, y, mask


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=0)
    return cfg, sd, model_from_state_dict(cfg, sd)


# ====================================================================== state dict contract
SPEC6_TABLE = {
    "x_embedder.proj.weight": (4096, 16, 1, 2, 2),
    "x_embedder.proj.bias": (4096,),
    "t_embedder.mlp.0.weight": (512, 256),
    "t_embedder.mlp.0.bias": (512,),
    "t_embedder.mlp.2.weight": (512, 512),
    "t_embedder.mlp.2.bias": (512,),
    "y_embedder.y_proj.0.weight": (4096, 4096),
    "y_embedder.y_proj.0.bias": (4096,),
    "y_embedder.y_proj.2.weight": (4096, 4096),
    "y_embedder.y_proj.2.bias": (4096,),
    "final_layer.adaLN_modulation.1.weight": (8192, 512),
    "final_layer.adaLN_modulation.1.bias": (8192,),
    "final_layer.linear.weight": (64, 4096),
    "final_layer.linear.bias": (64,),
}
SPEC6_BLOCK = {
    "adaLN_modulation.1.weight": (24576, 512),
    "adaLN_modulation.1.bias": (24576,),
    "pre_crs_attn_norm.weight": (4096,),
    "pre_crs_attn_norm.bias": (4096,),
    "attn.qkv.weight": (12288, 4096),
    "attn.qkv.bias": (12288,),
    "attn.q_norm.weight": (128,),
    "attn.k_norm.weight": (128,),
    "attn.proj.weight": (4096, 4096),
    "attn.proj.bias": (4096,),
    "cross_attn.q_linear.weight": (4096, 4096),
    "cross_attn.q_linear.bias": (4096,),
    "cross_attn.kv_linear.weight": (8192, 4096),
    "cross_attn.kv_linear.bias": (8192,),
    "cross_attn.proj.weight": (4096, 4096),
    "cross_attn.proj.bias": (4096,),
    "cross_attn.q_norm.weight": (128,),
    "cross_attn.k_norm.weight": (128,),
    "ffn.w1.weight": (11008, 4096),
    "ffn.w3.weight": (11008, 4096),
    "ffn.w2.weight": (4096, 11008),
}


def test_state_dict_matches_released_13b_on_meta():
    model = LongCatDiT(DiTConfig.longcat_video(), device="meta")
    sd = model.state_dict()
    expected = dict(SPEC6_TABLE)
    for i in range(48):
        expected.update({f"blocks.{i}.{k}": v for k, v in SPEC6_BLOCK.items()})
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == expected
    assert len(sd) == 1022
    assert sum(v.numel() for v in sd.values()) == 13_581_071_424
    assert DiTConfig.longcat_video().ffn_hidden_size == 11008


def test_lora_and_cache_leave_state_dict_names_alone(tiny, tmp_path):
    from tiny_ckpt import write_longcat_lora

    cfg, sd, model = tiny
    keys = list(model.state_dict())
    p = str(tmp_path / "l.safetensors")
    write_longcat_lora(p, cfg)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(p, "x")
    m.enable_loras(["x"])
    assert list(m.state_dict()) == keys


def test_config_from_json_upstream_and_fastvideo(tmp_path):
    import json

    up = {"in_channels": 16, "out_channels": 16, "hidden_size": 64, "depth": 2, "num_heads": 2,
          "caption_channels": 32, "mlp_ratio": 4, "adaln_tembed_dim": 32, "frequency_embedding_size": 32,
          "patch_size": [1, 2, 2], "enable_flashattn3": False, "enable_flashattn2": True, "enable_xformers": False,
          "enable_bsa": False, "bsa_params": {"sparsity": 0.9375, "cdf_threshold": None,
                                               "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
          "cp_split_hw": [1, 1], "text_tokens_zero_pad": True, "_class_name": "LongCatVideoTransformer3DModel",
          "_diffusers_version": "0.35.0"}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(up))
    c = DiTConfig.from_json(str(p))
    assert (c.hidden_size, c.num_heads, c.patch_size, c.text_tokens_zero_pad) == (64, 2, (1, 2, 2), True)
    assert c.attn_backend == "auto"
    assert c.bsa_settings() == {"sparsity": 0.9375, "cdf_threshold": None, "chunk_q": (4, 4, 4), "chunk_k": (4, 4, 4)}
    fv = dict(up)
    fv["num_attention_heads"] = fv.pop("num_heads")
    fv["_class_name"] = "LongCatTransformer3DModel"
    p.write_text(json.dumps(fv))
    assert DiTConfig.from_json(str(tmp_path)).num_heads == 2
    with pytest.raises(ValueError, match="attn_backend"):
        DiTConfig.tiny(attn_backend="flash2")
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig.tiny(hidden_size=64, num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig.tiny(patch_size=(2, 2, 2))
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DiTConfig.from_json(str(p))


# ====================================================================== golden math
def _captured_blocks(model):
    records = []
    hooks = [b.register_forward_hook(lambda m, args, out: records.append((args, out))) for b in model.blocks]
    return records, hooks


@pytest.mark.parametrize("c", [0, 1, 2])
@pytest.mark.parametrize("zero_pad", [False, True])
def test_each_block_matches_longhand(c, zero_pad):
    cfg = tiny_config(text_tokens_zero_pad=zero_pad, num_heads=2)
    sd = random_state_dict(cfg, seed=3)
    model = model_from_state_dict(cfg, sd)
    x, t, y, mask = make_inputs(cfg, T=3)
    ts = t[:, None].repeat(1, 3)
    ts[:, :c] = 0
    records, hooks = _captured_blocks(model)
    with torch.no_grad():
        model(x, ts, y, mask, num_cond_latents=c)
    for h in hooks:
        h.remove()
    sd64 = {k: v.double() for k, v in sd.items()}
    assert len(records) == cfg.depth
    for i, (args, out) in enumerate(records):
        xin, temb, yy, ymask, plan, layer = args
        assert layer == i and plan.prefix_tokens == c * 6
        ref = lh_block(sd64, i, cfg, xin.double(), temb.double(), yy.double(),
                       None if ymask is None else ymask, (3, 2, 3), plan.prefix_tokens)
        assert rel_l2(out, ref) < 1e-5, f"block {i}"
        assert (ymask is None) == (zero_pad or c == 3)


@pytest.mark.parametrize("c", [0, 2])
@pytest.mark.parametrize("zero_pad", [False, True])
def test_forward_matches_longhand(c, zero_pad):
    cfg = tiny_config(text_tokens_zero_pad=zero_pad, num_heads=4, hidden_size=128)  # head_dim 32
    sd = random_state_dict(cfg, seed=5)
    model = model_from_state_dict(cfg, sd)
    x, t, y, mask = make_inputs(cfg, T=3, H=4, W=6)
    ts = torch.stack([torch.tensor([0.0, 10.5, 999.0]), torch.tensor([0.0, 0.0, 250.25])])
    with torch.no_grad():
        out = model(x, ts, y, mask, num_cond_latents=c)
    ref = lh_forward(sd, cfg, x, ts, y, mask, c)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel_l2(out, ref) < 1e-5


def test_timestep_vector_equals_per_frame_and_per_frame_matters(tiny):
    cfg, sd, model = tiny
    x, t, y, mask = make_inputs(cfg, T=3)
    with torch.no_grad():
        a = model(x, t, y, mask)
        b = model(x, t[:, None].expand(2, 3), y, mask)
        ts = t[:, None].repeat(1, 3)
        ts[:, 1] += 100
        c = model(x, ts, y, mask)
    assert torch.equal(a, b)
    assert rel_l2(c, a) > 1e-3


def test_timestep_is_rounded_to_weight_dtype_first():
    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=2), dtype=torch.bfloat16)
    x, _, y, mask = make_inputs(cfg, T=2)
    t = torch.tensor([999.7, 501.3])
    with torch.no_grad():
        a = model(x, t, y, mask)
        b = model(x, t.to(torch.bfloat16).float(), y, mask)
        c = model(x, t + 8.0, y, mask)  # a different bf16 value
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cond_tokens_ignore_text_and_noisy_tokens(tiny):
    cfg, sd, model = tiny
    x, t, y, mask = make_inputs(cfg, T=3)
    ts = t[:, None].repeat(1, 3)
    ts[:, :1] = 0
    with torch.no_grad():
        a = model(x, ts, y, mask, num_cond_latents=1)
        x2 = x.clone()
        x2[:, :, 1:] = torch.randn_like(x2[:, :, 1:])
        b = model(x2, ts, torch.randn_like(y), mask, num_cond_latents=1)
    assert torch.equal(a[:, :, :1], b[:, :, :1])
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:])


def test_varlen_text_equals_truncated_text_and_zero_pad_differs():
    cfg = tiny_config(text_tokens_zero_pad=False)
    sd = random_state_dict(cfg, seed=4)
    model = model_from_state_dict(cfg, sd)
    x, t, y, _ = make_inputs(cfg, B=2, T=2, L=6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[:, 4:] = 0
    with torch.no_grad():
        a = model(x, t, y, mask)
        b = model(x, t, y[:, :, :4], None)
        y2 = y.clone()
        y2[:, :, 4:] = 100 * torch.randn_like(y2[:, :, 4:])
        c = model(x, t, y2, mask)
    assert rel_l2(a, b) < 1e-6
    assert torch.equal(a, c)
    # zero-pad mode: padded tokens are zero vectors that are still attended.
    cfgz = tiny_config(text_tokens_zero_pad=True)
    mz = model_from_state_dict(cfgz, sd)
    with torch.no_grad():
        az = mz(x, t, y, mask)
        cz = mz(x, t, y2, mask)
    assert torch.equal(az, cz)
    assert rel_l2(az, a) > 1e-4
    assert rel_l2(az, lh_forward(sd, cfgz, x, t[:, None].expand(2, 2), y, mask)) < 1e-5


def test_unpatchify_channel_order(tiny):
    cfg, _, model = tiny
    B, T, Nh, Nw = 1, 2, 2, 3
    x = torch.arange(B * T * Nh * Nw * 64, dtype=torch.float32).view(B, T * Nh * Nw, 64)
    out = model.unpatchify(x, T, Nh, Nw)
    assert out.shape == (1, 16, 2, 4, 6)
    for (t, h, w, c) in [(0, 0, 0, 0), (1, 3, 5, 15), (0, 1, 2, 7), (1, 2, 1, 3)]:
        n = (t * Nh + h // 2) * Nw + w // 2
        ch = ((h % 2) * 2 + (w % 2)) * 16 + c
        assert out[0, c, t, h, w] == x[0, n, ch]


# ====================================================================== dtypes
def test_bf16_runs_close_to_fp32():
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=6)
    m32 = model_from_state_dict(cfg, sd)
    m16 = model_from_state_dict(cfg, sd, dtype=torch.bfloat16)
    x, t, y, mask = make_inputs(cfg, T=3, shared_cond=1)
    t = t.to(torch.bfloat16).float()  # same rounded timesteps for both
    ts = t[:, None].repeat(1, 3)
    ts[:, :1] = 0
    with torch.no_grad():
        ref = m32(x, ts, y, mask, num_cond_latents=1)
        out = m16(x, ts, y, mask, num_cond_latents=1)
        cache = m16.build_kv_cache(x[:1, :, :1])
        on = m16(x[:, :, 1:], t, y, mask, kv_cache=cache)
    assert out.dtype == torch.float32
    assert cache.dtype == torch.bfloat16 and cache.keys[0].dtype == torch.bfloat16
    assert rel_l2(out, ref) < 1e-2
    assert rel_l2(on, ref[:, :, 1:]) < 1e-2


# ====================================================================== bad input
def test_bad_inputs_raise_clear_errors(tiny):
    cfg, _, model = tiny
    x, t, y, mask = make_inputs(cfg, T=3)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"hidden_states: expected shape \[B, 16, T, H, W\]"):
            model(x[:, :8], t, y, mask)
        with pytest.raises(ValueError, match="hidden_states: expected shape"):
            model(x[:, :, 0], t, y, mask)
        with pytest.raises(TypeError, match="hidden_states"):
            model(x.numpy(), t, y, mask)
        with pytest.raises(ValueError, match="divisible by the patch"):
            model(x[..., :5], t, y, mask)
        with pytest.raises(ValueError, match=r"timestep: expected shape \[2\] or \[2, 3\]"):
            model(x, t[:, None].repeat(1, 2), y, mask)
        with pytest.raises(ValueError, match="timestep"):
            model(x, t[:1], y, mask)
        with pytest.raises(ValueError, match="num_cond_latents: expected 0 <= num_cond_latents <= T=3"):
            model(x, t, y, mask, num_cond_latents=4)
        with pytest.raises(ValueError, match="num_cond_latents"):
            model(x, t, y, mask, num_cond_latents=-1)
        with pytest.raises(TypeError, match="num_cond_latents"):
            model(x, t, y, mask, num_cond_latents=1.0)
        with pytest.raises(ValueError, match="encoder_hidden_states: expected shape"):
            model(x, t, y[..., :16], mask)
        with pytest.raises(ValueError, match="encoder_attention_mask: expected shape"):
            model(x, t, y, mask[:, :3])
        zero = mask.clone()
        zero[1] = 0
        with pytest.raises(ValueError, match="at least one valid text token"):
            model(x, t, y, zero)


def test_bad_cache_raises(tiny):
    cfg, sd, model = tiny
    x, t, y, mask = make_inputs(cfg, T=3, shared_cond=1)
    with torch.no_grad():
        cache = model.build_kv_cache(x[:1, :, :1])
        assert isinstance(cache, KVCache)
        with pytest.raises(ValueError, match=r"kv_cache: built for a token grid \(2, 3\)"):
            model(torch.randn(2, 16, 2, 6, 6), t, y, mask, kv_cache=cache)
        with pytest.raises(ValueError, match="num_cond_latents: with a kv_cache of 1 frames"):
            model(x[:, :, 1:], t, y, mask, kv_cache=cache, num_cond_latents=2)
        m16 = model_from_state_dict(cfg, sd, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="kv_cache: dtype torch.float32, model dtype torch.bfloat16"):
            m16(x[:, :, 1:], t, y, mask, kv_cache=cache)
        deeper = model_from_state_dict(tiny_config(depth=3), random_state_dict(tiny_config(depth=3)))
        with pytest.raises(ValueError, match="kv_cache: built for depth 2, model depth 3"):
            deeper(x[:, :, 1:], t, y, mask, kv_cache=cache)
        c3 = model.build_kv_cache(torch.randn(3, 16, 1, 4, 6))
        with pytest.raises(ValueError, match="kv_cache: batch 3, expected 1 or 2"):
            model(x[:, :, 1:], t, y, mask, kv_cache=c3)
        with pytest.raises(TypeError, match="kv_cache: expected a KVCache"):
            model(x[:, :, 1:], t, y, mask, kv_cache={0: None})
        with pytest.raises(ValueError, match="cond_latents: expected shape"):
            model.build_kv_cache(x[:1, :3, :1])


# ====================================================================== FLOP formula
def test_flops_reproduce_spec10_ideal_cache_speedups():
    from longcat_vc import dit_forward_flops

    cfg = DiTConfig.longcat_video()
    hw = 30 * 52
    n = 24 * hw
    for c, ideal in zip((4, 8, 12, 16, 20), (1.09, 1.28, 1.65, 2.48, 5.17)):
        off = dit_forward_flops(cfg, n, n, 512, 2, prefix_tokens=c * hw)
        on = dit_forward_flops(cfg, n - c * hw, n, 512, 2)
        assert abs(off / on - ideal) < 0.006, (c, off / on)
    # one block's matmuls, counted by hand for a tiny config
    t = tiny_config(depth=1)
    C, Fh = 64, t.ffn_hidden_size
    f = dit_forward_flops(t, 10, 10, 3, 1)
    by_hand = 10 * (8 * C * C + 6 * C * Fh) + 4 * C * 100 + 10 * (4 * C * C + 4 * C * 3) + 3 * 4 * C * C
    by_hand += 10 * 2 * C * 64 * 2 + 3 * 2 * (32 * C + C * C)
    assert f == by_hand
    with pytest.raises(ValueError, match="prefix_tokens"):
        dit_forward_flops(t, 10, 10, 3, 1, prefix_tokens=11)


PUBLISHED_DIT_CONFIG = {  # LongCat-Video dit/config.json as published (diffusers 0.35.2)
    "_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": "0.35.2",
    "_name_or_path": "/somewhere/snapshots/x", "adaln_tembed_dim": 512,
    "bsa_params": {"chunk_3d_shape_k": [4, 4, 4], "chunk_3d_shape_q": [4, 4, 4], "sparsity": 0.9375},
    "caption_channels": 4096, "cp_split_hw": None, "depth": 48, "enable_bsa": False, "enable_flashattn2": True,
    "enable_flashattn3": False, "enable_xformers": False, "frequency_embedding_size": 256, "hidden_size": 4096,
    "in_channels": 16, "mlp_ratio": 4, "num_heads": 32, "out_channels": 16, "patch_size": [1, 2, 2],
    "text_tokens_zero_pad": True,
}


@pytest.mark.parametrize("fastvideo", [False, True])
def test_published_configs_build_the_13b_model(fastvideo):
    d = dict(PUBLISHED_DIT_CONFIG)
    if fastvideo:  # FastVideo's transformer/config.json
        d["num_attention_heads"] = d.pop("num_heads")
        d["_class_name"] = "LongCatTransformer3DModel"
        d.pop("enable_xformers")
    cfg = DiTConfig.from_dict(d)
    assert cfg == DiTConfig.longcat_video(bsa_params=d["bsa_params"])
    assert cfg.bsa_settings()["cdf_threshold"] is None
    sd = LongCatDiT(cfg, device="meta").state_dict()
    assert len(sd) == 1022 and sum(v.numel() for v in sd.values()) == 13_581_071_424
