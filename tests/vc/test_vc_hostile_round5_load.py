"""Hostile inputs of checkpoint loading, LoRA files and APIs, peft training and fp8 that used to give a
silently wrong model or a misleading error (audit 5, loading side), one test per finding:

A. A FastVideo checkpoint whose split parts have unequal rows (``to_q`` one row longer, ``to_k`` one
   shorter) summing to the fused shape was loaded with every q/k/v row boundary shifted.
B. A sharded checkpoint whose index and shards disagree (a shard key the index lists nowhere, or in
   another shard) was read with the key skipped: a model key was reported "missing" though the shard
   holds it, and an unlisted extra tensor passed ``strict=True`` without a word.
C. An fp8 (``F8_E4M3``) tensor in a checkpoint was refused as "non-floating".
D. A LongCat LoRA naming one up block twice (``lora_up.blocks.1`` and ``lora_up.blocks.01``) loaded
   whichever was read last.
E. ``.to(device)`` of a DiT with LoRAs loaded moved the weights and left the adapters behind (the
   first forward failed deep in ``F.linear`` on mixed devices).
F. ``enable_loras`` given a generator read it up in its checks and enabled nothing, silently.
G. ``add_lora`` (peft training) on an fp8-quantised DiT: the fp8 linears quantise their input without a
   gradient, so most adapters got a zero or no gradient while the loss still went down.
H. ``quantize_dit_fp8(emulate="no")`` took the truthiness and emulated instead of refusing the device.
I. A peft adapter file (``PeftModel.save_pretrained``: ``base_model.model.<path>.lora_A.weight``, its
   scale only in ``adapter_config.json``) given to ``load_lora`` was refused as keys that "match no
   Linear module", with no word of ``save_longcat_lora``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_ckpt import (LORA_TARGETS_CFG_STEP, longcat_lora_tensors, model_from_state_dict, tiny_config,
                       write_fastvideo_transformer, write_longcat_lora, write_upstream_dit)

from longcat_vc.dit import LongCatDiT
from longcat_vc.fp8 import quantize_dit_fp8
from longcat_vc.loading import CheckpointError




# ---------------------------------------------------------------------------- A
def test_fastvideo_split_parts_of_unequal_rows_are_refused(tmp_path, tiny_base):
    cfg, sd = tiny_base
    write_fastvideo_transformer(str(tmp_path), cfg, sd)
    f = str(tmp_path / "model.safetensors")
    t = load_file(f)
    q, k = t["blocks.0.self_attn.to_q.weight"], t["blocks.0.self_attn.to_k.weight"]
    t["blocks.0.self_attn.to_q.weight"], t["blocks.0.self_attn.to_k.weight"] = torch.cat([q, k[:1]]), k[1:]
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight: checkpoint "
                                              r"blocks\.0\.self_attn\.to_q\.weight\[65, 64\] \+ .*"
                                              r"\(3 equal parts of \[64, 64\]\)"):
        LongCatDiT.from_pretrained(str(tmp_path), progress=False)


# ---------------------------------------------------------------------------- B
SHARD1 = "diffusion_pytorch_model-00001-of-00002.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def test_index_omitting_a_key_its_shard_holds_names_the_shard(tmp_path, tiny_base):
    cfg, sd = tiny_base
    write_upstream_dit(str(tmp_path), cfg, sd, shards=2)
    j = json.loads((tmp_path / INDEX).read_text())
    key = next(k for k, v in j["weight_map"].items() if v == SHARD1)
    del j["weight_map"][key]
    (tmp_path / INDEX).write_text(json.dumps(j))
    with pytest.raises(CheckpointError, match=rf"does not match the shards: .*{key} in {SHARD1} \(the index does not list it\)"):
        LongCatDiT.from_pretrained(str(tmp_path), progress=False, strict=False)


@pytest.mark.parametrize("listed_elsewhere", [False, True])
def test_shard_tensor_the_index_does_not_place_there_is_refused(tmp_path, tiny_base, listed_elsewhere):
    cfg, sd = tiny_base
    write_upstream_dit(str(tmp_path), cfg, sd, shards=2)
    t = load_file(str(tmp_path / SHARD1))
    j = json.loads((tmp_path / INDEX).read_text())
    # an unlisted extra tensor, or a stale second copy of a key the index places in the other shard
    key = next(k for k, v in j["weight_map"].items() if v != SHARD1) if listed_elsewhere else "junk.weight"
    t[key] = torch.zeros(3) if key == "junk.weight" else sd[key] + 1
    save_file(t, str(tmp_path / SHARD1))
    where = r"the index places it in .*-of-00002\.safetensors" if listed_elsewhere else "the index does not list it"
    with pytest.raises(CheckpointError, match=rf"{INDEX}: the index's weight_map does not match the shards: 1 "
                                              rf"tensor.*{key} in {SHARD1} \({where}\)"):
        LongCatDiT.from_pretrained(str(tmp_path), progress=False)


# ---------------------------------------------------------------------------- C
def test_fp8_checkpoint_tensor_is_named_as_fp8(tmp_path, tiny_base):
    cfg, sd = tiny_base
    bad = dict(sd, **{"blocks.0.attn.qkv.weight": sd["blocks.0.attn.qkv.weight"].to(torch.float8_e4m3fn)})
    write_upstream_dit(str(tmp_path), cfg, bad, shards=1)
    with pytest.raises(CheckpointError, match=r"1 8-bit float tensor\(s\).*quantize_dit_fp8\): "
                                              r"blocks\.0\.attn\.qkv\.weight \(F8_E4M3\)") as e:
        LongCatDiT.from_pretrained(str(tmp_path), progress=False)
    assert "non-floating" not in str(e.value)


# ---------------------------------------------------------------------------- D
def test_longcat_lora_up_block_spelt_twice_is_refused(tmp_path, tiny_base):
    cfg, sd = tiny_base
    t = longcat_lora_tensors(cfg, targets=LORA_TARGETS_CFG_STEP)
    key = next(k for k in t if k.endswith("qkv.lora_up.blocks.1.weight"))
    t[key.replace("blocks.1.weight", "blocks.01.weight")] = torch.zeros_like(t[key])
    save_file(t, str(tmp_path / "l.safetensors"))
    m = model_from_state_dict(cfg, sd)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: .*lora_up\.blocks\.01\.weight' and .*"
                                         r"lora_up\.blocks\.1\.weight' name the same up block"):
        m.load_lora(str(tmp_path / "l.safetensors"), "a")
    assert m.lora_names == []


# ---------------------------------------------------------------------------- E
def test_lora_adapters_follow_the_weights_device(tmp_path, tiny_base):
    cfg, sd = tiny_base
    write_longcat_lora(str(tmp_path / "l.safetensors"), cfg)  # the refinement set: final_layer too
    m = model_from_state_dict(cfg, sd)
    m.load_lora(str(tmp_path / "l.safetensors"), "a")
    m.enable_loras(["a"])
    version = m._state_version
    m.to("meta")  # (the CPU stand-in for .to("cuda"))
    adapters = [a for mod in m.modules() for a in getattr(mod, "lora_adapters", {}).values()]
    assert len(adapters) == 8 * cfg.depth + 2
    assert {t.device.type for a in adapters for t in [a.down] + [p.up for p in a.parts]} == {"meta"}
    assert m._state_version == version  # a device move is no state change (a KV cache stays valid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="[cuda] moves a DiT with LoRAs to a CUDA device")
def test_lora_adapters_follow_the_weights_to_cuda_and_give_the_cpu_output(tmp_path, tiny_base):
    from test_dit import make_inputs, rel_l2

    cfg, sd = tiny_base
    write_longcat_lora(str(tmp_path / "l.safetensors"), cfg)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(str(tmp_path / "l.safetensors"), "a")
    m.enable_loras(["a"])
    x, t, y, mask = make_inputs(cfg, T=2)
    with torch.no_grad():
        want = m(x, t, y, mask)
        m.to("cuda")
        got = m(*(v.cuda() for v in (x, t, y, mask))).cpu()
    assert torch.isfinite(got).all() and rel_l2(got, want) < 2e-3  # (fp32 kernels on the GPU may use tf32)


# ---------------------------------------------------------------------------- F
def test_enable_loras_takes_any_iterable(tmp_path, tiny_base):
    cfg, sd = tiny_base
    write_longcat_lora(str(tmp_path / "l.safetensors"), cfg, targets=LORA_TARGETS_CFG_STEP)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(str(tmp_path / "l.safetensors"), "a")
    m.enable_loras(n for n in ["a"])
    assert m.active_loras == ["a"] and len(m.blocks[0].attn.qkv.lora_active) == 1


# ---------------------------------------------------------------------------- I
def test_peft_adapter_file_points_to_save_longcat_lora(tmp_path, tiny_base):
    pytest.importorskip("peft")
    from longcat_vc.training import add_lora, lora_config

    cfg, sd = tiny_base
    add_lora(model_from_state_dict(cfg, sd), lora_config(rank=4, alpha=8)).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"match no Linear module .* \| this is a peft adapter file "
                                         r"\(PeftModel\.save_pretrained\); write the adapter with "
                                         r"longcat_vc\.training\.save_longcat_lora"):
        model_from_state_dict(cfg, sd).load_lora(str(tmp_path / "adapter_model.safetensors"), "a")


# ---------------------------------------------------------------------------- G
def test_peft_training_on_an_fp8_dit_is_refused(tiny_base):
    pytest.importorskip("peft")
    from longcat_vc.training import add_lora, lora_config

    cfg, sd = tiny_base
    m = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(m, emulate=True)
    with pytest.raises(ValueError, match=r"add_lora: the DiT's weights are fp8 .*no gradient flows; train on the "
                                         r"unquantised DiT"):
        add_lora(m, lora_config(rank=4, alpha=4))
    assert not any(type(x).__module__.startswith("peft.") for x in m.modules())


# ---------------------------------------------------------------------------- H
def test_quantize_emulate_must_be_a_bool(tiny_base):
    cfg, sd = tiny_base
    m = model_from_state_dict(cfg, sd)
    with pytest.raises(TypeError, match=r"emulate: expected a bool \(True or False\), got str 'no'"):
        quantize_dit_fp8(m, emulate="no")
    assert m.blocks[0].attn.qkv.weight.dtype == torch.float32


def test_config_whose_ffn_has_no_hidden_unit_is_refused():
    # mlp_ratio 0.001 x hidden 64: int(2 * int(0.064) / 3) = 0 hidden units, accepted (every FFN added 0)
    from longcat_vc.config import DiTConfig

    with pytest.raises(ValueError, match=r"DiTConfig.mlp_ratio: 0.001 x hidden_size 64 gives a SwiGLU FFN of width 0"):
        DiTConfig(**{**tiny_config().__dict__, "hidden_size": 64, "mlp_ratio": 0.001})
    assert DiTConfig(**{**tiny_config().__dict__, "hidden_size": 64, "mlp_ratio": 0.05}).ffn_hidden_size == 256
    # the bound the message names is the real one: 1.9 x ... is refused (int(2 * 1 / 3) = 0), 2 x ... is not
    with pytest.raises(ValueError, match=r"width 0; expected mlp_ratio \* hidden_size >= 2$"):
        DiTConfig(**{**tiny_config().__dict__, "hidden_size": 64, "mlp_ratio": 1.9 / 64})
    assert DiTConfig(**{**tiny_config().__dict__, "hidden_size": 64, "mlp_ratio": 2 / 64}).ffn_hidden_size == 256
