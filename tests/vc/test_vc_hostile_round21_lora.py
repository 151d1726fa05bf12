"""Round 21 (LoRA, SPEC 8, and the long-video windows of SPEC 11): hostile inputs that gave wrong or failed results."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config


def _fastvideo_qkv_targets(path, model, names, r=2, seed=0):
    qkv = model.blocks[0].attn.qkv
    C, o = qkv.in_features, qkv.out_features // 3
    g = torch.Generator().manual_seed(seed)
    t = {}
    for nm in names:
        t[f"blocks.0.self_attn.{nm}.lora_A"] = 0.2 * torch.randn(r, C, generator=g)
        t[f"blocks.0.self_attn.{nm}.lora_B"] = 0.2 * torch.randn(o, r, generator=g)
    save_file(t, path)
    return qkv


def _assert_fuse_keeps_output(model, qkv):
    """``fuse_lora`` leaves the module's output as it was unfused."""
    x = torch.randn(5, qkv.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unfused = qkv(x)
        model.fuse_lora()
        fused = qkv(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_fuse_of_a_fastvideo_lora_on_part_of_a_split_target(tmp_path):
    """A FastVideo LoRA adapting to_q and to_k only (peft's target_modules may leave out to_v) is one
    adapter on the fused ``attn.qkv`` whose parts end before its last output row: its dense delta was
    sized by the last part's rows, ``W [3C] + delta [2C]`` failed in fuse_lora with a shape error (and
    with a single part it would broadcast over every row). Fused must equal unfused, and unfuse restore."""
    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=3))
    path = str(tmp_path / "fv.safetensors")
    qkv = _fastvideo_qkv_targets(path, model, ("to_q", "to_k"))
    model.load_lora(path, "a")
    w0 = qkv.weight.detach().clone()
    model.enable_loras(["a"])
    _assert_fuse_keeps_output(model, qkv)
    # the rows of to_v are untouched by the fuse
    o = qkv.out_features // 3
    assert torch.equal(qkv.weight[2 * o:], w0[2 * o:])
    model.unfuse_lora()
    torch.testing.assert_close(qkv.weight, w0, rtol=0, atol=1e-6)


def test_fuse_of_two_loras_covering_different_parts(tmp_path):
    """Two active adapters on one module, one on to_q only and one on all of q/k/v: their deltas had
    different heights ([C] and [3C]) and summing them failed."""
    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=3))
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    qkv = _fastvideo_qkv_targets(pa, model, ("to_q",), seed=4)
    _fastvideo_qkv_targets(pb, model, ("to_q", "to_k", "to_v"), seed=5)
    model.load_lora(pa, "a")
    model.load_lora(pb, "b")
    model.enable_loras(["a", "b"])
    _assert_fuse_keeps_output(model, qkv)
