"""Hostile round 20 (core): KV caches that a changed model accepted without a word.

A. A parameter replaced twice (``module.weight = nn.Parameter(...)``): the fingerprint named each tensor
   by ``id()``, which CPython hands to the next object once the old one is freed, so the third weight
   got the id of the one the cache was built with (version 0 both) and the stale cache was used
   (rel. L2 6e-2 from the cache-off result).
B. peft adapters injected by ``longcat_vc.training.add_lora``: ``disable_adapter()``, ``set_adapter``,
   ``set_scale`` / ``scale_layer`` change what the DiT computes without touching a parameter or the
   state counter, and a cache built before was used (rel. L2 7e-2 .. 9e-2 from the cache-off result).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from test_dit import make_inputs, rel_l2
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

C, T = 2, 4


def _model(seed=20):
    cfg = tiny_config()
    return cfg, model_from_state_dict(cfg, random_state_dict(cfg, seed=seed))


def _on_off(model, cfg, cache=None, seed=3):
    x, t, y, mask = make_inputs(cfg, B=2, T=T, shared_cond=C, seed=seed)
    ts = t[:, None].repeat(1, T)
    ts[:, :C] = 0
    with torch.no_grad():
        if cache is None:
            cache = model.build_kv_cache(x[:1, :, :C])
        on = model(x[:, :, C:], t, y, mask, kv_cache=cache)
        off = model(x, ts, y, mask, num_cond_latents=C)[:, :, C:]
    return on, off


def _cond(cfg, seed=3):
    x = make_inputs(cfg, B=2, T=T, shared_cond=C, seed=seed)[0]
    return x[:1, :, :C]


# ----------------------------------------------------------------------------- A


def test_a_parameter_replaced_again_and_again_keeps_the_cache_stale():
    cfg, model = _model()
    lin = model.blocks[0].attn.qkv

    def replace():
        lin.weight = nn.Parameter(lin.weight.detach() * 1.5, requires_grad=False)

    replace()
    for n in (1, 2, 3, 4):
        with torch.no_grad():
            cache = model.build_kv_cache(_cond(cfg))
        for _ in range(n):  # back to back: the weight freed by one replacement gives its id to the next
            replace()
        with pytest.raises(ValueError, match=r"kv_cache: stale.*weights changed"):
            _on_off(model, cfg, cache)
    on, off = _on_off(model, cfg)  # a fresh cache is exact
    assert rel_l2(on, off) < 1e-5


def test_the_same_parameter_put_back_keeps_the_cache_usable():
    """Identity, not a value hash: the very tensor the cache was built from is accepted again."""
    cfg, model = _model()
    lin = model.blocks[0].attn.qkv
    orig = lin.weight
    with torch.no_grad():
        cache = model.build_kv_cache(_cond(cfg))
    lin.weight = nn.Parameter(orig.detach() * 1.5, requires_grad=False)
    with pytest.raises(ValueError, match=r"kv_cache: stale"):
        _on_off(model, cfg, cache)
    lin.weight = orig
    on, off = _on_off(model, cfg, cache)
    assert rel_l2(on, off) < 1e-5


# ----------------------------------------------------------------------------- B


def _peft_model(seed=21):
    pytest.importorskip("peft")
    from longcat_vc.training import add_lora, lora_config

    cfg, model = _model(seed)
    pm = add_lora(model, lora_config(rank=4, alpha=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # peft initialises B to 0: the adapter would change nothing
                p.copy_(torch.randn(p.shape, generator=g))
    pm.eval()
    return cfg, model, pm


def _scale(pm, factor):
    for m in pm.modules():
        if hasattr(m, "scale_layer") and hasattr(m, "scaling"):
            m.scale_layer(factor)


@pytest.mark.parametrize("change", ["disable_adapter", "scale_layer", "set_adapter", "disable_adapter_layers"])
def test_peft_adapter_changes_make_the_cache_stale(change):
    cfg, model, pm = _peft_model()
    on, off = _on_off(model, cfg)
    assert rel_l2(on, off) < 1e-5  # unchanged: exact
    with torch.no_grad():
        cache = model.build_kv_cache(_cond(cfg))
    if change == "disable_adapter":
        with pm.disable_adapter():
            with pytest.raises(ValueError, match=r"kv_cache: stale.*adapters"):
                _on_off(model, cfg, cache)
            on, off = _on_off(model, cfg)  # a cache built inside is exact inside
            assert rel_l2(on, off) < 1e-5
        on, off = _on_off(model, cfg, cache)  # back as built: usable again
        assert rel_l2(on, off) < 1e-5
        return
    if change == "scale_layer":
        _scale(pm, 0.25)
    elif change == "set_adapter":
        from longcat_vc.training import lora_config

        pm.add_adapter("other", lora_config(rank=4, alpha=4))
        pm.set_adapter("other")
    else:
        pm.base_model.disable_adapter_layers()
    with pytest.raises(ValueError, match=r"kv_cache: stale.*adapters"):
        _on_off(model, cfg, cache)
    on, off = _on_off(model, cfg)
    assert rel_l2(on, off) < 1e-5


def test_peft_cache_built_with_adapters_disabled_is_stale_once_they_are_back():
    cfg, model, pm = _peft_model()
    with pm.disable_adapter():
        with torch.no_grad():
            cache = model.build_kv_cache(_cond(cfg))
    with pytest.raises(ValueError, match=r"kv_cache: stale.*adapters"):
        _on_off(model, cfg, cache)


# ----------------------------------------------------------------------------- C


def test_dropout_in_training_mode_is_refused_by_the_cache_build_and_makes_a_cache_stale():
    """peft's lora_dropout after ``.train()``: the cache build kept one random draw for every later step,
    and a cache built in eval mode was used beside fresh dropout draws of the noisy tokens."""
    pytest.importorskip("peft")
    from longcat_vc.training import add_lora, lora_config

    cfg, model = _model(22)
    pm = add_lora(model, lora_config(rank=4, alpha=4, dropout=0.5))
    pm.eval()
    with torch.no_grad():
        cache = model.build_kv_cache(_cond(cfg))
    pm.train()
    with pytest.raises(ValueError, match=r"build_kv_cache: dropout is active .*call \.eval\(\) first"):
        model.build_kv_cache(_cond(cfg))
    with pytest.raises(ValueError, match=r"kv_cache: stale.*dropout was switched on"):
        _on_off(model, cfg, cache)
    pm.eval()
    on, off = _on_off(model, cfg, cache)
    assert rel_l2(on, off) < 1e-5
    pm.train()  # p = 0: nothing random, the cache stays usable
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    on, off = _on_off(model, cfg, cache)
    assert rel_l2(on, off) < 1e-5
