"""LoRA (SPEC 8): LongCat split/plain files and FastVideo's converted files == merged-weight math."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from test_dit import make_inputs, rel_l2
from tiny_ckpt import (
    LORA_TARGETS_CFG_STEP,
    LORA_TARGETS_REFINEMENT,
    fastvideo_lora_tensors,
    lora_merged_state_dict,
    model_from_state_dict,
    random_state_dict,
    tiny_config,
    write_fastvideo_lora,
    write_longcat_lora,
)


@pytest.fixture(scope="module")
def base():
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=41)
    return cfg, sd


def _run(model, cfg, inputs, c=1):
    x, t, y, mask = inputs
    ts = t[:, None].repeat(1, x.shape[2])
    ts[:, :c] = 0
    with torch.no_grad():
        off = model(x, ts, y, mask, num_cond_latents=c)
        on = model(x[:, :, c:], t, y, mask, kv_cache=model.build_kv_cache(x[:1, :, :c]))
    return off, on


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("targets", ["cfg_step", "refinement"])
def test_longcat_lora_equals_merged_weights(tmp_path, base, split, targets):
    cfg, sd = base
    tg = LORA_TARGETS_CFG_STEP if targets == "cfg_step" else LORA_TARGETS_REFINEMENT
    path = str(tmp_path / "lora.safetensors")
    tensors = write_longcat_lora(path, cfg, targets=tg, split=split, alpha_scale=0.5, rank=3, seed=7)
    if split:
        assert any(".lora_up.blocks.2.weight" in k for k in tensors)
    model = model_from_state_dict(cfg, sd)
    adapted = model.load_lora(path, "cfg", multiplier=0.8)
    assert len(adapted) == len({k.split(".")[0] for k in tensors})
    merged = model_from_state_dict(cfg, lora_merged_state_dict(sd, tensors, multiplier=0.8))
    inputs = make_inputs(cfg, T=3, shared_cond=1)
    base_off, _ = _run(model, cfg, inputs)
    model.enable_loras(["cfg"])
    off, on = _run(model, cfg, inputs)
    ref_off, ref_on = _run(merged, cfg, inputs)
    assert rel_l2(off, ref_off) < 1e-5
    assert rel_l2(on, ref_on) < 1e-5
    assert rel_l2(off, base_off) > 1e-3  # the LoRA does change the output
    model.disable_loras()
    assert torch.equal(_run(model, cfg, inputs)[0], base_off)


@pytest.mark.parametrize("weight_suffix,prefix", [(False, ""), (True, "diffusion_model.")])
def test_fastvideo_lora_equals_longcat_lora(tmp_path, base, weight_suffix, prefix):
    cfg, sd = base
    lc = str(tmp_path / "lc.safetensors")
    fv = str(tmp_path / "fv.safetensors")
    tensors = write_longcat_lora(lc, cfg, targets=LORA_TARGETS_REFINEMENT, split=True, alpha_scale=0.25, rank=2, seed=8)
    fvt = write_fastvideo_lora(fv, tensors, weight_suffix=weight_suffix, prefix=prefix)
    assert f"{prefix}blocks.0.self_attn.to_k.lora_A{'.weight' if weight_suffix else ''}" in fvt
    assert f"{prefix}final_layer.adaln_linear.lora_alpha" in fvt
    a = model_from_state_dict(cfg, sd)
    a.load_lora(lc, "x")
    a.enable_loras(["x"])
    b = model_from_state_dict(cfg, sd)
    b.load_lora(fv, "x")
    b.enable_loras(["x"])
    merged = model_from_state_dict(cfg, lora_merged_state_dict(sd, tensors))
    inputs = make_inputs(cfg, T=3, shared_cond=1)
    oa, ob, om = _run(a, cfg, inputs)[0], _run(b, cfg, inputs)[0], _run(merged, cfg, inputs)[0]
    assert rel_l2(ob, om) < 1e-5
    assert rel_l2(oa, ob) < 1e-5


def test_alpha_scale_from_file_multiplier_and_default(tmp_path, base):
    cfg, sd = base
    inputs = make_inputs(cfg, T=2)
    for alpha in (0.25, None):
        p = str(tmp_path / f"a{alpha}.safetensors")
        t = write_longcat_lora(p, cfg, targets=LORA_TARGETS_CFG_STEP, alpha_scale=alpha, rank=2, seed=9)
        m = model_from_state_dict(cfg, sd)
        m.load_lora(p, "a", multiplier=1.5)
        m.enable_loras(["a"])
        # None: no alpha_scale in the file -> upstream default 64/128 = 0.5
        ref = model_from_state_dict(cfg, lora_merged_state_dict(sd, t, multiplier=1.5, default_alpha_scale=0.5))
        with torch.no_grad():
            assert rel_l2(m(*inputs), ref(*inputs)) < 1e-5


def test_two_loras_add_up_and_switching(tmp_path, base):
    cfg, sd = base
    p1, p2 = str(tmp_path / "1.safetensors"), str(tmp_path / "2.safetensors")
    t1 = write_longcat_lora(p1, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=10)
    t2 = write_longcat_lora(p2, cfg, targets=LORA_TARGETS_REFINEMENT, rank=3, seed=11, split=False)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(p1, "cfg_step")
    m.load_lora(p2, "refine", multiplier=0.5)
    assert m.lora_names == ["cfg_step", "refine"]
    both = lora_merged_state_dict(lora_merged_state_dict(sd, t1), t2, multiplier=0.5)
    inputs = make_inputs(cfg, T=2)
    with torch.no_grad():
        m.enable_loras(["cfg_step", "refine"])
        assert m.active_loras == ["cfg_step", "refine"]
        assert rel_l2(m(*inputs), model_from_state_dict(cfg, both)(*inputs)) < 1e-5
        m.enable_loras(["refine"])
        ref2 = model_from_state_dict(cfg, lora_merged_state_dict(sd, t2, multiplier=0.5))
        assert rel_l2(m(*inputs), ref2(*inputs)) < 1e-5
        with pytest.raises(ValueError, match=r"unknown LoRA name\(s\) \['nope'\]"):
            m.enable_loras(["nope"])


def test_fuse_unfuse(tmp_path, base):
    cfg, sd = base
    p = str(tmp_path / "f.safetensors")
    write_longcat_lora(p, cfg, targets=LORA_TARGETS_REFINEMENT, rank=2, seed=12)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(p, "f")
    m.enable_loras(["f"])
    inputs = make_inputs(cfg, T=2)
    with torch.no_grad():
        unfused = m(*inputs)
        m.fuse_lora()
        assert not torch.equal(m.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
        fused = m(*inputs)
        m.unfuse_lora()
        again = m(*inputs)
        m.fuse_lora()
        m.disable_loras()  # unfuses
        plain = m(*inputs)
    assert rel_l2(fused, unfused) < 1e-5
    assert rel_l2(again, unfused) < 1e-6
    for k, v in sd.items():
        assert torch.allclose(m.state_dict()[k], v, atol=1e-6, rtol=0), k
    with torch.no_grad():
        assert rel_l2(plain, model_from_state_dict(cfg, sd)(*inputs)) < 1e-6


def test_bf16_lora_runs(tmp_path, base):
    cfg, sd = base
    p = str(tmp_path / "b.safetensors")
    t = write_longcat_lora(p, cfg, targets=LORA_TARGETS_REFINEMENT, rank=2, seed=13)
    m = model_from_state_dict(cfg, sd, dtype=torch.bfloat16)
    m.load_lora(p, "b")
    m.enable_loras(["b"])
    assert m.blocks[0].attn.qkv.lora_adapters["b"].down.dtype == torch.bfloat16
    ref = model_from_state_dict(cfg, lora_merged_state_dict(sd, t))
    x, tt, y, mask = make_inputs(cfg, T=2)
    tt = tt.to(torch.bfloat16).float()
    with torch.no_grad():
        assert rel_l2(m(x, tt, y, mask), ref(x, tt, y, mask)) < 2e-2


def test_bad_lora_files_list_keys(tmp_path, base):
    cfg, sd = base
    m = model_from_state_dict(cfg, sd)
    t = write_longcat_lora(str(tmp_path / "ok.safetensors"), cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=14)
    bad = dict(t)
    bad["lora___lorahyphen___blocks___lorahyphen___7___lorahyphen___attn___lorahyphen___qkv.lora_down.weight"] = torch.zeros(6, 64)
    bad["lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___q_norm.lora_down.weight"] = torch.zeros(2, 32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as e:
        m.load_lora(str(tmp_path / "bad.safetensors"), "bad")
    msg = str(e.value)
    assert "2 key(s) match no Linear module" in msg
    assert "blocks___lorahyphen___7___lorahyphen___attn___lorahyphen___qkv.lora_down.weight" in msg
    assert "q_norm.lora_down.weight" in msg
    shape = dict(t)
    k = "lora___lorahyphen___blocks___lorahyphen___1___lorahyphen___ffn___lorahyphen___w2.lora_up.weight"
    shape[k] = torch.zeros(64, 5)
    save_file(shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"blocks.1.ffn.w2: lora_up.weight shape \(64, 5\), expected \(64, 2\)"):
        m.load_lora(str(tmp_path / "shape.safetensors"), "s")
    fv = fastvideo_lora_tensors(t)
    fv["blocks.0.self_attn.to_nowhere.lora_A"] = torch.zeros(2, 64)
    save_file(fv, str(tmp_path / "fv.safetensors"))
    with pytest.raises(ValueError, match="blocks.0.self_attn.to_nowhere.lora_A"):
        m.load_lora(str(tmp_path / "fv.safetensors"), "fv")
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(ValueError, match="neither LongCat LoRA"):
        m.load_lora(str(tmp_path / "foo.safetensors"), "foo")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        m.load_lora(str(tmp_path / "junk.safetensors"), "junk")
    assert m.lora_names == []
