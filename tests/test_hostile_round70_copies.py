"""Copies, serialisation and dtype / device moves of models carrying our kernels (audit 70x, 2026-12-08).

A. ``load_lora`` into a DiT whose weights are on the meta device (a ``LongCatDiT(cfg, device="meta")``
   skeleton, before ``load_state_dict(..., assign=True)``) failed with "Tensor.item() cannot be called on
   meta tensors" (the adapters were moved to meta, their values gone); now a ValueError naming the module.
B. ``to_empty()`` of a DiT moved to meta with a LoRA loaded failed deep in ``LoRALinear._apply`` with torch's
   "Cannot copy out of meta tensor; no data!"; now a RuntimeError naming the LoRA and what to do.
C. A shallow ``copy.copy(dit)`` took its original's LoRA adapters over (``__setstate__`` relinked them to the
   copy): once the copy was gone, a multiplier change bumped no model and a KV cache built before was used
   silently (no error, stale conditioning).
D. A dtype conversion of a submodule alone (``dit.blocks[0].half()``, or ``.half().float()``) kept every
   parameter's identity and version counter and never ran ``LongCatDiT._apply``: a KV cache built before was
   used as fresh. The fingerprint now holds each tensor's dtype and the linears' conversion counts.
Pinned (verified correct): deep copy and ``torch.save`` / ``torch.load`` of a DiT with a LoRA loaded,
fused or fp8-quantised give the original's output and their own LoRA state; the state dict keeps the
upstream names; a whole-model ``.double()`` round trip refuses a cache; the diffusers integration's copies
run their own grid state and uninstall cleanly.
"""

from __future__ import annotations

import copy
import gc
import io
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vc"))
try:
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora
finally:
    sys.path.pop(0)

from longcat_vc.dit import LongCatDiT  # noqa: E402
from longcat_vc.fp8 import quantize_dit_fp8  # noqa: E402


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _inputs(cfg, B=2, T=3, H=4, W=6, L=5):
    g = torch.Generator().manual_seed(_seed())
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    y = torch.randn(B, 1, L, cfg.caption_channels, generator=g)
    return x, t, y, torch.ones(B, L, dtype=torch.long)


def _model(tmp_path, lora=True):
    cfg = tiny_config(attn_backend="torch")
    sd = random_state_dict(cfg, seed=_seed())
    m = model_from_state_dict(cfg, sd)
    path = str(tmp_path / "l.safetensors")
    if lora:
        write_longcat_lora(path, cfg, seed=_seed())
        m.load_lora(path, "a")
        m.enable_loras(["a"])
    return cfg, sd, m, path


def _copies(m):
    """``copy.deepcopy(m)`` and ``m`` through ``torch.save`` / ``torch.load(weights_only=False)``."""
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return copy.deepcopy(m), torch.load(buf, weights_only=False)


def _run(m, inp, **kw):
    with torch.no_grad():
        out = m(*inp, **kw)
    assert torch.isfinite(out).all()
    return out


# ---------------------------------------------------------------------------------------------- A
def test_a_load_lora_into_a_meta_skeleton_is_refused_by_name(tmp_path):
    cfg, sd, _, path = _model(tmp_path, lora=False)
    write_longcat_lora(path, cfg, seed=_seed())
    m = LongCatDiT(cfg, device="meta")
    with pytest.raises(ValueError, match=r"load_lora\(.*\): the weights of .* are on the meta device.*load the weights first"):
        m.load_lora(path, "a")
    assert m.lora_names == []  # nothing changed
    m.load_state_dict(sd, assign=True)
    m.load_lora(path, "a")  # after the weights: fine, and equal to a model built with its weights
    m.enable_loras(["a"])
    ref = model_from_state_dict(cfg, sd)
    ref.load_lora(path, "a")
    ref.enable_loras(["a"])
    inp = _inputs(cfg)
    torch.testing.assert_close(_run(m, inp), _run(ref, inp), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- B
def test_b_to_empty_after_meta_names_the_lost_lora(tmp_path):
    cfg, sd, m, _ = _model(tmp_path)
    m.to("meta")
    with pytest.raises(RuntimeError, match=r"LoRALinear: LoRA \['a'\] moved to the meta device .* load_lora\(\) after"):
        m.to_empty(device="cpu")


def test_b_meta_round_trip_without_lora_and_fp8_still_work(tmp_path):
    cfg, sd, m, _ = _model(tmp_path, lora=False)
    inp = _inputs(cfg)
    ref = _run(m, inp)
    m.to("meta")
    m.to_empty(device="cpu")
    m.load_state_dict(sd)
    torch.testing.assert_close(_run(m, inp), ref, rtol=0, atol=0)
    quantize_dit_fp8(m, emulate=True)
    ref8, s8 = _run(m, inp), m.state_dict()
    m.to("meta")
    m.to_empty(device="cpu")
    m.load_state_dict(s8)
    torch.testing.assert_close(_run(m, inp), ref8, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- C
def test_c_shallow_copy_does_not_take_the_originals_adapters(tmp_path):
    cfg, sd, m, _ = _model(tmp_path)
    x, t, y, mask = _inputs(cfg)
    cache = m.build_kv_cache(x[:1, :, :1])
    shallow = copy.copy(m)
    del shallow
    gc.collect()
    adapter = m.blocks[0].attn.qkv.lora_adapters["a"]
    before = m._state_version
    adapter.multiplier = 3.0  # changes what the model computes
    assert m._state_version > before
    with pytest.raises(ValueError, match="kv_cache: stale"):
        _run(m, (x[:, :, 1:], t, y, mask), kv_cache=cache)


def test_c_deepcopy_and_pickle_relink_to_the_copy(tmp_path):
    cfg, sd, m, _ = _model(tmp_path)
    inp = _inputs(cfg)
    ref = _run(m, inp)
    for c in _copies(m):
        torch.testing.assert_close(_run(c, inp), ref, rtol=0, atol=0)
        a = c.blocks[0].attn.qkv.lora_adapters["a"]
        v, vm = c._state_version, m._state_version
        a.multiplier = 0.5
        assert c._state_version > v and m._state_version == vm  # the copy's, not the original's
        assert m.blocks[0].attn.qkv.lora_adapters["a"].multiplier == 1.0
        torch.testing.assert_close(_run(m, inp), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- D
@pytest.mark.parametrize("how", ["half", "half_float", "double_float_block", "whole_double_float"])
def test_d_dtype_conversions_make_a_kv_cache_stale(tmp_path, how):
    cfg, sd, m, _ = _model(tmp_path, lora=False)
    x, t, y, mask = _inputs(cfg)
    x[1:, :, :1] = x[:1, :, :1]  # one cond frame shared by the batch (a cache of batch 1)
    cache = m.build_kv_cache(x[:1, :, :1])
    _run(m, (x[:, :, 1:], t, y, mask), kv_cache=cache)  # fresh: used
    if how == "half":
        m.blocks[0].half()
    elif how == "half_float":
        m.blocks[1].half().float()
    elif how == "double_float_block":
        m.blocks[0].attn.double().float()
    else:
        m.double().float()
    with pytest.raises(ValueError, match="kv_cache: stale"):
        _run(m, (x[:, :, 1:], t, y, mask), kv_cache=cache)
    fresh = m.build_kv_cache(x[:1, :, :1])  # rebuilt: used, and equal to the cache-off forward's noisy frames
    full = _run(m, (x, t[:, None].expand(-1, 3).clone().index_fill_(1, torch.tensor([0]), 0), y, mask),
                num_cond_latents=1)
    torch.testing.assert_close(_run(m, (x[:, :, 1:], t, y, mask), kv_cache=fresh), full[:, :, 1:],
                               rtol=1e-4, atol=1e-4)


def test_d_device_moves_keep_a_cache_fresh(tmp_path):
    cfg, sd, m, _ = _model(tmp_path)
    x, t, y, mask = _inputs(cfg)
    cache = m.build_kv_cache(x[:1, :, :1])
    ref = _run(m, (x[:, :, 1:], t, y, mask), kv_cache=cache)
    m.to("cpu").float()  # no-ops: no state change
    m.blocks[0].to("cpu")
    torch.testing.assert_close(_run(m, (x[:, :, 1:], t, y, mask), kv_cache=cache), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- pinned
def test_fused_copies_unfuse_to_the_base_and_keep_upstream_names(tmp_path):
    cfg, sd, m, _ = _model(tmp_path)
    inp = _inputs(cfg)
    ref = _run(m, inp)
    base = _run(model_from_state_dict(cfg, sd), inp)
    m.fuse_lora()
    assert set(m.state_dict()) == set(sd)  # no adapter keys; fused weights under the base names
    for c in _copies(m):
        torch.testing.assert_close(_run(c, inp), ref, rtol=1e-5, atol=1e-5)
        c.disable_loras()  # unfuses the copy only
        torch.testing.assert_close(_run(c, inp), base, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="fused into the weights"):
            m.load_state_dict(sd)  # the original is still fused
    m.unfuse_lora()
    torch.testing.assert_close({k: v for k, v in m.state_dict().items()}, sd, rtol=1e-6, atol=1e-6)


def test_fp8_copies_and_state_dict_round_trip(tmp_path):
    cfg, sd, m, _ = _model(tmp_path, lora=False)
    quantize_dit_fp8(m, emulate=True)
    inp = _inputs(cfg)
    ref = _run(m, inp)
    for c in _copies(m):
        torch.testing.assert_close(_run(c, inp), ref, rtol=0, atol=0)
    for assign in (False, True):
        other = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
        quantize_dit_fp8(other, emulate=True)
        other.load_state_dict(m.state_dict(), assign=assign)
        torch.testing.assert_close(_run(other, inp), ref, rtol=0, atol=0)


def test_diffusers_copies_run_their_own_state_and_uninstall():
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "tests" / "integrations"))
    try:
        from test_diffusers_hostile import P, _model as wan, _run as wan_run, _untouched
    finally:
        sys.path.pop(0)
    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention, remove_block_sparse_attention

    m = wan()
    apply_block_sparse_attention(m, P(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    c = copy.deepcopy(m)
    hook = next(iter(c.rope._forward_hooks.values()))
    assert hook.args[1] is c._longcat_block_sparse.state  # the copy's rope hook tags the copy's state
    assert hook.args[1] is not m._longcat_block_sparse.state
    seed = _seed()
    out = wan_run(c, 2, 8, 12, seed)
    assert torch.isfinite(out).all()
    remove_block_sparse_attention(c)
    assert _untouched(c) and hasattr(m, "_longcat_block_sparse")
    torch.testing.assert_close(wan_run(m, 2, 8, 12, seed), out, rtol=0, atol=0)
