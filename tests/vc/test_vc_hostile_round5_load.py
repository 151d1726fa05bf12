"""Hostile inputs of checkpoint loading, LoRA files and APIs, peft training and fp8 that used to give a
silently wrong model or a misleading error (audit 5, loading side), one test per finding:

A. A FastVideo checkpoint whose split parts have unequal rows (``to_q`` one row longer, ``to_k`` one
   shorter) summing to the fused shape was loaded with every q/k/v row boundary shifted.
B. A sharded checkpoint whose index and shards disagree (a shard key the index lists nowhere, or in
   another shard) was read with the key skipped: a model key was reported "missing" though the shard
   holds it, and an unlisted extra tensor passed ``strict=True`` without a word.
C. An fp8 (``F8_E4M3``) tensor in a checkpoint was refused as "non-floating"."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_ckpt import (LORA_TARGETS_CFG_STEP, longcat_lora_tensors, model_from_state_dict, random_state_dict,
                       tiny_config, write_fastvideo_transformer, write_longcat_lora, write_upstream_dit)

from longcat_vc.dit import LongCatDiT
from longcat_vc.fp8 import quantize_dit_fp8
from longcat_vc.loading import CheckpointError


@pytest.fixture(scope="module")
def base():
    cfg = tiny_config()
    return cfg, random_state_dict(cfg, seed=3)


# ---------------------------------------------------------------------------- A
def test_fastvideo_split_parts_of_unequal_rows_are_refused(tmp_path, base):
    cfg, sd = base
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


def test_index_omitting_a_key_its_shard_holds_names_the_shard(tmp_path, base):
    cfg, sd = base
    write_upstream_dit(str(tmp_path), cfg, sd, shards=2)
    j = json.loads((tmp_path / INDEX).read_text())
    key = next(k for k, v in j["weight_map"].items() if v == SHARD1)
    del j["weight_map"][key]
    (tmp_path / INDEX).write_text(json.dumps(j))
    with pytest.raises(CheckpointError, match=rf"does not match the shards: .*{key} in {SHARD1} \(the index does not list it\)"):
        LongCatDiT.from_pretrained(str(tmp_path), progress=False, strict=False)


@pytest.mark.parametrize("listed_elsewhere", [False, True])
def test_shard_tensor_the_index_does_not_place_there_is_refused(tmp_path, base, listed_elsewhere):
    cfg, sd = base
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
def test_fp8_checkpoint_tensor_is_named_as_fp8(tmp_path, base):
    cfg, sd = base
    bad = dict(sd, **{"blocks.0.attn.qkv.weight": sd["blocks.0.attn.qkv.weight"].to(torch.float8_e4m3fn)})
    write_upstream_dit(str(tmp_path), cfg, bad, shards=1)
    with pytest.raises(CheckpointError, match=r"1 8-bit float tensor\(s\).*quantize_dit_fp8\): "
                                              r"blocks\.0\.attn\.qkv\.weight \(F8_E4M3\)") as e:
        LongCatDiT.from_pretrained(str(tmp_path), progress=False)
    assert "non-floating" not in str(e.value)
