"""A fused LoRA's state cannot drift from what is in the weights (third audit, 2026-12-06): changing
an adapter's multiplier while fused, or loading a state dict into a fused model, left unfuse_lora
subtracting a different delta than fuse_lora had added (base weights corrupted for good), and the
forward meanwhile ignored the change. Both are refused; each test fails on the code before."""

from __future__ import annotations

import pytest
import torch
from tiny_ckpt import tiny_model_with_lora

QKV = "blocks.0.attn.qkv"


@pytest.fixture()
def fused(tmp_path):
    return tiny_model_with_lora(tmp_path, fuse=True)


def test_multiplier_change_while_fused_is_refused(fused):
    m, sd = fused
    mod = m.get_submodule(QKV)
    ad = mod.lora_adapters["a"]
    w_fused = mod.weight.clone()
    with pytest.raises(RuntimeError, match="multiplier cannot change while the adapter is fused"):
        ad.multiplier = 2.0
    assert ad.multiplier == 1.0 and torch.equal(mod.weight, w_fused)
    m.unfuse_lora()
    torch.testing.assert_close(mod.weight, sd[QKV + ".weight"], rtol=0, atol=1e-6)
    # the allowed order: unfused, changed, fused again = W0 + delta at the new multiplier
    ad.multiplier = 2.0
    m.fuse_lora()
    torch.testing.assert_close(mod.weight, sd[QKV + ".weight"] + ad.delta_weight(), rtol=0, atol=1e-6)
    m.unfuse_lora()
    torch.testing.assert_close(mod.weight, sd[QKV + ".weight"], rtol=0, atol=1e-6)


def test_load_state_dict_while_fused_is_refused(fused):
    m, sd = fused
    w_fused = m.get_submodule(QKV).weight.clone()
    with pytest.raises(RuntimeError, match=r"load_state_dict: LoRA \['a'\] fused into the weights"):
        m.load_state_dict(sd)
    assert torch.equal(m.get_submodule(QKV).weight, w_fused)
    m.disable_loras()  # unfuses: back to the base weights
    torch.testing.assert_close(m.get_submodule(QKV).weight, sd[QKV + ".weight"], rtol=0, atol=1e-6)
    m.load_state_dict(sd)  # unfused: allowed
