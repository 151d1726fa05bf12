"""Hostile-user round 13: silently wrong results from stale KV caches and LoRA state (a LoRA part's
scale changed while a cache or a fuse depends on it, a fuse that overflows the weight dtype, a
stale cache handed to a ``torch.compile``d model)."""

from __future__ import annotations

import copy

import pytest
import torch

from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_CFG_STEP, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = tiny_config()
    lora = str(tmp_path_factory.mktemp("lora13") / "a.safetensors")
    write_longcat_lora(lora, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=5)
    return cfg, random_state_dict(cfg, seed=3), lora


def _model(base, dtype=torch.float32, multiplier=1.0):
    cfg, sd, lora = base
    m = model_from_state_dict(cfg, copy.deepcopy(sd), dtype=dtype)
    m.load_lora(lora, "a", multiplier=multiplier)
    m.enable_loras(["a"])
    return m


@pytest.mark.parametrize("edit", ["scale", "up"])
def test_changing_a_lora_parts_scale_or_up_makes_the_cache_stale(base, edit):
    m = _model(base)
    x, t, y, mask = make_inputs(base[0], B=1, T=3)
    part = m.blocks[0].attn.qkv.lora_adapters["a"].parts[0]
    with torch.no_grad():
        cache = m.build_kv_cache(x[:, :, :1])
        if edit == "scale":
            part.scale = part.scale * 5
        else:
            part.up = part.up * 5
        with pytest.raises(ValueError, match="kv_cache: stale.*LoRA"):
            m(x[:, :, 1:], t, y, mask, kv_cache=cache)


@pytest.mark.parametrize("edit", ["scale", "up"])
def test_changing_a_fused_lora_parts_scale_or_up_is_refused_and_unfuse_restores(base, edit):
    m = _model(base)
    w0 = m.blocks[0].attn.qkv.weight.detach().clone()
    m.fuse_lora()
    part = m.blocks[0].attn.qkv.lora_adapters["a"].parts[0]
    with pytest.raises(RuntimeError, match="fused"):
        if edit == "scale":
            part.scale = 5.0
        else:
            part.up = part.up * 5
    m.unfuse_lora()
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight.detach(), w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5"])
def test_a_non_finite_or_non_float_part_scale_is_refused(base, scale):
    part = _model(base).blocks[0].attn.qkv.lora_adapters["a"].parts[0]
    with pytest.raises((ValueError, TypeError), match="LoRAPart.scale"):
        part.scale = scale


@pytest.mark.parametrize("dtype,multiplier", [(torch.float16, 1e7), (torch.float32, 3e38)])
def test_a_fuse_overflowing_the_weight_dtype_is_refused_and_changes_nothing(base, dtype, multiplier):
    # before: Inf weights, and unfuse_lora left them Inf (the base weights were gone)
    m = _model(base, dtype=dtype, multiplier=multiplier)
    with torch.no_grad():
        m.blocks[0].attn.qkv.lora_adapters["a"].down.mul_(1e4)  # make fp32 overflow too
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"fuse_lora: .*overflow.*blocks\.0\.attn\.qkv.*a=") as e:
        m.fuse_lora()
    assert "nothing was fused" in str(e.value)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(mod.lora_fused for mod in m.modules() if hasattr(mod, "lora_fused"))


def test_a_large_but_finite_fuse_still_works(base):
    m = _model(base, dtype=torch.float16, multiplier=10.0)
    m.fuse_lora()
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("change", ["enable", "multiplier", "load_state_dict", "bsa"])
def test_a_stale_cache_is_refused_by_a_compiled_model(base, change):
    # forward skips its checks while traced: a stale cache was used without a word under torch.compile
    cfg, sd, _ = base
    m = _model(base)
    m.config = copy.deepcopy(m.config)
    m.disable_loras()
    cm = torch.compile(m, backend="eager")
    x, t, y, mask = make_inputs(cfg, B=1, T=3)
    with torch.no_grad():
        cache = m.build_kv_cache(x[:, :, :1])
        cm(x[:, :, 1:], t, y, mask, kv_cache=cache)  # fresh: accepted
        if change == "enable":
            m.enable_loras(["a"])
        elif change == "multiplier":
            m.enable_loras(["a"])
            cache = m.build_kv_cache(x[:, :, :1])
            cm(x[:, :, 1:], t, y, mask, kv_cache=cache)
            m.blocks[0].attn.qkv.lora_adapters["a"].multiplier = 0.25
        elif change == "load_state_dict":
            m.load_state_dict(copy.deepcopy(sd))
        else:
            m.config.enable_bsa = True
            m.config.bsa_params = {"sparsity": 0.5, "chunk_3d_shape_q": [1, 2, 2]}
        with pytest.raises(ValueError, match="kv_cache: stale"):
            cm(x[:, :, 1:], t, y, mask, kv_cache=cache)
        fresh = m.build_kv_cache(x[:, :, :1])
        out = cm(x[:, :, 1:], t, y, mask, kv_cache=fresh)
        ref = m(x[:, :, 1:], t, y, mask, kv_cache=fresh)
    torch.testing.assert_close(out, ref)
