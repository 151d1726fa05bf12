"""Round 30 (the conditioning KV cache): a cache must be refused once what it was built from changed.

* a model created (or loaded) under ``torch.inference_mode()`` could not build a cache at all:
  ``state_fingerprint`` read ``_version`` of its inference tensors and raised torch's bare
  "Inference tensors do not track version counter." (the pipeline's default ``use_kv_cache`` too);
* LoRA adapter tensors (``down`` / ``up``, plain attributes, not parameters) edited in place were
  not part of the fingerprint: the cache built before the edit was used silently (the cache-off
  forward sees the edited adapter, the cached one the old K/V);
* the same in-place edit while the LoRA was fused into the weights (assignment is refused then):
  ``unfuse_lora`` subtracted another delta than the fuse added, and the base weights were lost.
"""

from __future__ import annotations

import pytest
import torch

from longcat_vc.lora import LoRALinear
from test_dit import make_inputs, rel_l2
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _off_on(m, cfg, c=2, T=4, cache=None):
    x, t, y, mask = make_inputs(cfg, B=2, T=T, shared_cond=c)
    ts = t[:, None].repeat(1, T)
    ts[:, :c] = 0
    with torch.no_grad():
        off = m(x, ts, y, mask, num_cond_latents=c)[:, :, c:]
        cache = m.build_kv_cache(x[:1, :, :c]) if cache is None else cache
        on = m(x[:, :, c:], t, y, mask, kv_cache=cache)
    return off, on, x


def test_model_made_under_inference_mode_builds_and_uses_a_cache():
    """A model created under ``torch.inference_mode()`` (its weights are inference tensors) raised
    "Inference tensors do not track version counter." from build_kv_cache; now the cache builds, equals
    the cache-off forward, and a replaced weight still makes it stale."""
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=_seed())
    with torch.inference_mode():
        m = model_from_state_dict(cfg, sd)
        off, on, x = _off_on(m, cfg)
        assert rel_l2(on, off) < 1e-5
        cache = m.build_kv_cache(x[:1, :, :2])
        w = m.blocks[0].attn.qkv.weight
        m.blocks[0].attn.qkv.weight = torch.nn.Parameter(w * 1.5, requires_grad=False)
        with pytest.raises(ValueError, match="stale"):
            _off_on(m, cfg, cache=cache)
    off, on, _ = _off_on(m, cfg)  # and outside inference mode
    assert rel_l2(on, off) < 1e-5


@pytest.fixture
def lora_model(tmp_path):
    cfg = tiny_config()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    path = str(tmp_path / "l.safetensors")
    write_longcat_lora(path, cfg, seed=_seed())
    m.load_lora(path, "a")
    m.enable_loras(["a"])
    return cfg, m


@pytest.mark.parametrize("which", ["down", "up"])
def test_in_place_edit_of_an_active_lora_makes_the_cache_stale(lora_model, which):
    """``adapter.down.mul_(3)`` / ``part.up.mul_(3)`` on an active LoRA changed what the model computes
    but not the fingerprint: the cache built before was used without a word (off by 7% / 70%)."""
    cfg, m = lora_model
    x, t, y, mask = make_inputs(cfg, B=2, T=4, shared_cond=2)
    cache = m.build_kv_cache(x[:1, :, :2])
    mods = [mod for mod in m.modules() if isinstance(mod, LoRALinear) and mod.lora_active]
    assert mods
    with torch.no_grad():
        for mod in mods:
            for a in mod.lora_active:
                if which == "down":
                    a.down.mul_(3)
                else:
                    for p in a.parts:
                        p.up.mul_(3)
    off, on, _ = _off_on(m, cfg)  # a fresh cache agrees with the edited model
    assert rel_l2(on, off) < 1e-5
    with pytest.raises(ValueError, match="stale"):
        with torch.no_grad():
            m(x[:, :, 2:], t, y, mask, kv_cache=cache)


def test_lora_cache_stays_fresh_without_edits(lora_model):
    """The LoRA tensors in the fingerprint do not make an unchanged cache stale (many steps)."""
    cfg, m = lora_model
    x, t, y, mask = make_inputs(cfg, B=2, T=4, shared_cond=2)
    ts = t[:, None].repeat(1, 4)
    ts[:, :2] = 0
    with torch.no_grad():
        cache = m.build_kv_cache(x[:1, :, :2])
        off = m(x, ts, y, mask, num_cond_latents=2)[:, :, 2:]
        for _ in range(2):
            assert rel_l2(m(x[:, :, 2:], t, y, mask, kv_cache=cache), off) < 1e-5



def test_unfuse_refuses_after_an_in_place_edit_of_a_fused_lora(lora_model):
    """``fuse_lora(); adapter.down.mul_(3); unfuse_lora()`` left base weights off by the difference of the
    two deltas (no error); now unfuse raises before any module changed, and an untouched fuse/unfuse
    round trip still gives the base weights back."""
    cfg, m = lora_model
    base = {k: v.clone() for k, v in m.state_dict().items()}
    m.fuse_lora()
    m.unfuse_lora()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=1e-5)
    m.fuse_lora()
    fused = {k: v.clone() for k, v in m.state_dict().items()}
    mod = next(mod for mod in m.modules() if isinstance(mod, LoRALinear) and mod.lora_fused)
    with torch.no_grad():
        mod.lora_fused[0].down.mul_(3)
    with pytest.raises(RuntimeError, match="edited in place while fused"):
        m.unfuse_lora()
    for k, v in m.state_dict().items():  # nothing was unfused
        assert torch.equal(v, fused[k]), k
