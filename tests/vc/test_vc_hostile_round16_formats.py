"""Hostile file formats (audit 16): checkpoint folders and LoRA files that loaded silently wrong or
failed with an unclear message, one test per finding:

A. A LongCat LoRA whose ``alpha_scale`` is 0 loaded as an adapter that changes nothing, without a
   word (rank 0 and FastVideo ``lora_alpha`` 0 were already refused).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tiny_ckpt import longcat_lora_tensors, model_from_state_dict, random_state_dict, tiny_config

from longcat_vc.lora import load_lora, longcat_lora_key


@pytest.fixture(scope="module")
def tiny_base():
    cfg = tiny_config()
    return cfg, random_state_dict(cfg)


# ---------------------------------------------------------------------------- A
@pytest.mark.parametrize("zero", [torch.tensor(0.0), torch.tensor([-0.0])])
def test_longcat_lora_alpha_scale_zero_is_refused_naming_the_module(tmp_path, tiny_base, zero):
    cfg, sd = tiny_base
    t = longcat_lora_tensors(cfg)
    t[longcat_lora_key("blocks.1.ffn.w2", "alpha_scale")] = zero
    f = str(tmp_path / "lora.safetensors")
    save_file(t, f)
    model = model_from_state_dict(cfg, sd)
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.w2\.alpha_scale: 0 switches the adapter off"):
        load_lora(model, f, "x")
    assert not any(getattr(m, "lora_adapters", None) for m in model.modules())
