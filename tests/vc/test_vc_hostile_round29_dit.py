"""Round 29 (``LongCatDiT`` called directly): argument and config hostility.

* a timestep of bool or complex dtype ran (bool as t = 1 / 0, complex with its imaginary part dropped);
* integer text states ran as if they were embeddings (``hidden_states`` already had to be floating);
* ``LongCatDiT(config, dtype=torch.float8_e4m3fn)`` failed in torch's initialiser
  ("check_uniform_bounds" not implemented), or on ``device="meta"`` only at the first forward;
* ``DiTConfig.from_dict`` ignored FastVideo's ``attention_head_dim`` / ``num_channels_latents`` even
  where they contradicted ``hidden_size / num_heads`` / ``in_channels``.

Plus a positive check the earlier golden tests did not cover: patch sizes other than (1, 2, 2), other
``out_channels``, per-sample per-frame timesteps, a non-binary mask and every ``num_cond_latents``
against an fp64 longhand with a general patch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longcat_vc import DiTConfig, LongCatDiT
from test_dit import lh_block, lh_layernorm, lh_timestep_embedding, rel_l2
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _inputs(cfg, B=2, T=2, H=4, W=4, L=5):
    g = torch.Generator().manual_seed(_seed())
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    y = torch.randn(B, 1, L, cfg.caption_channels, generator=g)
    return x, y


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(attn_backend="torch")
    return cfg, model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))


# ---------------------------------------------------------------------- timestep / text dtypes
@pytest.mark.parametrize("ts", [torch.tensor([True, False]), torch.tensor([500 + 3j, 250 + 0j])],
                         ids=["bool", "complex"])
def test_timestep_of_bool_or_complex_dtype_is_refused(tiny, ts):
    """A bool timestep tensor ran as t = 1.0 / 0.0 (it equalled ``model(x, tensor([1., 0.]))``), a complex
    one with its imaginary part silently dropped (only torch's ComplexWarning); now a TypeError naming
    ``timestep``."""
    cfg, model = tiny
    x, y = _inputs(cfg)
    with torch.no_grad(), pytest.raises(TypeError, match="timestep"):
        model(x, ts, y)
    with torch.no_grad():  # ints and every float dtype still mean the same timesteps
        a = model(x, torch.tensor([500.0, 250.0]), y)
        assert torch.equal(model(x, torch.tensor([500, 250]), y), a)
        assert torch.equal(model(x, torch.tensor([500.0, 250.0], dtype=torch.float64), y), a)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_text_states_are_refused(tiny, dtype):
    """``encoder_hidden_states`` of an integer (or bool) dtype, e.g. token ids or a mask passed in the
    wrong slot with the right shape, were cast to the weight dtype and used as text embeddings; the
    latents already had to be floating. Now a TypeError naming the argument."""
    cfg, model = tiny
    x, y = _inputs(cfg)
    bad = (y > 0) if dtype is torch.bool else (y * 10).to(dtype)
    with torch.no_grad(), pytest.raises(TypeError, match="encoder_hidden_states"):
        model(x, 500.0, bad)


# ---------------------------------------------------------------------- constructor dtype
@pytest.mark.parametrize("device", [None, "meta"])
def test_constructor_refuses_8bit_float_dtype(device):
    """``LongCatDiT(cfg, dtype=torch.float8_e4m3fn)`` raised NotImplementedError from torch's weight
    initialiser ("check_uniform_bounds"), or on ``meta`` built a model whose first forward failed deep in
    GELU; now the ValueError of ``from_pretrained`` (pointing to fp8 quantisation), before any work."""
    with pytest.raises(ValueError, match="16 bits or more"):
        LongCatDiT(tiny_config(), device=device, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="dtype"):
        LongCatDiT(tiny_config(), device="meta", dtype="bf16")
    assert LongCatDiT(tiny_config(), device="meta", dtype=torch.float16).dtype == torch.float16


# ---------------------------------------------------------------------- config.json consistency
@pytest.mark.parametrize("key,value,match", [
    ("attention_head_dim", 16, "attention_head_dim"),
    ("num_channels_latents", 8, "num_channels_latents"),
])
def test_from_dict_refuses_fastvideo_keys_contradicting_the_model(key, value, match):
    """FastVideo's ``config.json`` also carries ``attention_head_dim`` and ``num_channels_latents``; they
    were ignored even when they contradicted ``hidden_size / num_heads`` or ``in_channels`` (a config
    missing ``hidden_size`` built a 4096-wide model with head_dim 2048 and failed only at the state
    dict's shapes). Now a ValueError naming both; consistent values still load."""
    d = tiny_config().to_dict()
    d["num_attention_heads"] = d.pop("num_heads")
    ok = dict(d, attention_head_dim=32, num_channels_latents=16)
    assert DiTConfig.from_dict(ok) == DiTConfig.from_dict(d)
    with pytest.raises(ValueError, match=match):
        DiTConfig.from_dict(dict(ok, **{key: value}))
    no_hidden = dict(ok)
    no_hidden.pop("hidden_size")
    with pytest.raises(ValueError, match="attention_head_dim"):
        DiTConfig.from_dict(no_hidden)


# ---------------------------------------------------------------------- fp64 golden, general patch
def _lh_forward(sd, cfg, x, ts, y, ymask, c):
    """``test_dit.lh_forward`` for any ``(1, ph, pw)`` patch and ``out_channels``; mask nonzero = valid."""
    sd = {k: v.double() for k, v in sd.items()}
    _, ph, pw = cfg.patch_size
    B, _, T, H, W = x.shape
    Hh, Ww, C, co = H // ph, W // pw, cfg.hidden_size, cfg.out_channels
    h = F.conv3d(x.double(), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=(1, ph, pw))
    h = h.flatten(2).transpose(1, 2)
    temb = lh_timestep_embedding(sd, cfg, ts)
    yy = F.gelu(y.double()[:, 0] @ sd["y_embedder.y_proj.0.weight"].T + sd["y_embedder.y_proj.0.bias"],
                approximate="tanh")
    yy = yy @ sd["y_embedder.y_proj.2.weight"].T + sd["y_embedder.y_proj.2.bias"]
    km = ymask != 0
    if cfg.text_tokens_zero_pad:
        yy, km = yy * km.double()[..., None], None
    for i in range(cfg.depth):
        h = lh_block(sd, i, cfg, h, temb, yy, km, (T, Hh, Ww), c * Hh * Ww, skip_cross=(c == T))
    frame = torch.arange(h.shape[1]) // (Hh * Ww)
    mod = F.silu(temb) @ sd["final_layer.adaLN_modulation.1.weight"].T + sd["final_layer.adaLN_modulation.1.bias"]
    h = lh_layernorm(h) * (1 + mod[:, frame, C:]) + mod[:, frame, :C]
    h = h @ sd["final_layer.linear.weight"].T + sd["final_layer.linear.bias"]
    out = torch.zeros(B, co, T, H, W, dtype=torch.float64)
    n = 0
    for t in range(T):
        for a in range(Hh):
            for b in range(Ww):
                for ih in range(ph):
                    for iw in range(pw):
                        ch = (ih * pw + iw) * co
                        out[:, :, t, ph * a + ih, pw * b + iw] = h[:, n, ch:ch + co]
                n += 1
    return out


@pytest.mark.parametrize("patch,out_channels,zero_pad", [((1, 1, 3), 16, False), ((1, 3, 1), 8, True)])
def test_general_patch_matches_fp64_longhand(patch, out_channels, zero_pad):
    cfg = tiny_config(patch_size=patch, out_channels=out_channels, text_tokens_zero_pad=zero_pad,
                      attn_backend="torch")
    sd = random_state_dict(cfg, seed=_seed())
    model = model_from_state_dict(cfg, sd)
    x, y = _inputs(cfg, T=2, H=2 * patch[1], W=2 * patch[2])
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    mask[1, 0], mask[1, 1] = 0.5, 3.0  # nonzero = valid
    ts = torch.rand(2, 2) * 1000
    for c in range(3):
        with torch.no_grad():
            out = model(x, ts, y, mask, num_cond_latents=c)
        assert rel_l2(out, _lh_forward(sd, cfg, x, ts, y, mask, c)) < 1e-5, c
    assert math.isfinite(float(out.sum()))


# ---------------------------------------------------------------------- config mutated after construction
@pytest.mark.parametrize("field", ["enable_bsa", "text_tokens_zero_pad"])
@pytest.mark.parametrize("value", ["false", "no", 1, None])
def test_bool_config_fields_are_checked_when_assigned(field, value):
    """``model.config.enable_bsa`` is a documented switch (the KV cache fingerprint and the pipeline's
    BSA toggle change it on a built model), but only ``__post_init__`` checked the bool fields:
    ``model.config.enable_bsa = "false"`` (truthy) switched block-sparse attention ON and
    ``text_tokens_zero_pad = "no"`` switched zero padding ON, silently. Assignment now checks them."""
    cfg = tiny_config(attn_backend="torch")
    with pytest.raises(TypeError, match=field):
        setattr(cfg, field, value)
    assert getattr(cfg, field) is False
    setattr(cfg, field, True)  # real bools still switch
    assert getattr(cfg, field) is True


def test_model_output_follows_a_valid_bool_switch_only(tiny):
    """The forward with ``enable_bsa`` set to False equals the forward before (a refused assignment left
    the config as it was)."""
    cfg = tiny_config(attn_backend="torch", bsa_params={"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2]})
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    x, y = _inputs(cfg, B=1, T=4, H=8, W=8)
    with torch.no_grad():
        dense = model(x, 500.0, y)
        with pytest.raises(TypeError):
            model.config.enable_bsa = "false"
        assert torch.equal(model(x, 500.0, y), dense)
        model.config.enable_bsa = True
        assert not torch.equal(model(x, 500.0, y), dense)


def test_to_json_failing_on_a_value_leaves_the_existing_file_intact(tmp_path):
    """``DiTConfig.to_json`` streamed ``json.dump`` into the opened file: a value JSON cannot write (a
    numpy int in ``bsa_params["chunk_3d_shape_q"]``, which the config accepts) raised half-way and left
    the previous, valid ``config.json`` truncated mid-object. Now the text is built first: the
    TypeError comes before the file is opened."""
    np = pytest.importorskip("numpy")
    path = tmp_path / "config.json"
    good = tiny_config()
    good.to_json(path)
    before = path.read_text()
    bad = tiny_config(bsa_params={"sparsity": 0.5, "chunk_3d_shape_q": [np.int64(2), 2, 2]})
    with pytest.raises(TypeError):
        bad.to_json(path)
    assert path.read_text() == before
    assert DiTConfig.from_json(path) == good


def test_model_converted_to_an_8bit_float_says_so_at_the_forward():
    """``model.to(torch.float8_e4m3fn)`` (or ``.to(dtype)`` with any 8-bit float) converts every weight;
    the forward then failed deep in the caption MLP ("GeluKernelImpl" not implemented for
    'Float8_e4m3fn') and ``build_kv_cache`` likewise. Now a TypeError naming the weight dtype and the fp8
    path (``longcat_vc.fp8``), before any work."""
    cfg = tiny_config(attn_backend="torch")
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed())).to(torch.float8_e4m3fn)
    x, y = _inputs(cfg, B=1)
    with torch.no_grad():
        with pytest.raises(TypeError, match="float8_e4m3fn.*fp8"):
            model(x, 500.0, y)
        with pytest.raises(TypeError, match="float8_e4m3fn.*fp8"):
            model.build_kv_cache(x)
