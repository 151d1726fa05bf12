"""Hostile inputs of the KV cache, memory modes, context parallelism and fp8 layers that used to pass
silently or crash deep inside (audit 4b, 2026-12-06), one section per finding:

A. ``fuse_lora`` / ``unfuse_lora`` (and ``enable_loras``, ``disable_loras``, ``set_mode``, which unfuse
   first) refused by an fp8 layer only after the LoRA linears before it (the adaLN linears come first
   in every block) had been fused or unfused: the refusal left the model half fused.
"""

from __future__ import annotations

import pytest
import torch

from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora

from longcat_vc.fp8 import quantize_dit_fp8
from longcat_vc.lora import fused_loras


@pytest.fixture(scope="module")
def base():
    cfg = tiny_config()
    return cfg, random_state_dict(cfg, seed=3)


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- A: fp8 fuse/unfuse refusals


def test_fp8_fuse_refusal_changes_no_module(tmp_path, base):
    cfg, sd = base
    path = str(tmp_path / "r.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=5)  # adaLN targets too
    m = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(m, emulate=True)
    m.load_lora(path, "r")
    m.enable_loras(["r"])
    before = _weights(m)
    with pytest.raises(ValueError, match="fuse_lora: the weights are fp8"):
        m.fuse_lora()
    assert fused_loras(m) == [] and _same(_weights(m), before)


@pytest.mark.parametrize("call", ["unfuse_lora", "disable_loras", "enable_loras"])
def test_fp8_unfuse_refusal_changes_no_module(tmp_path, base, call):
    cfg, sd = base
    path = str(tmp_path / "r.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=5)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(path, "r")
    m.enable_loras(["r"])
    m.fuse_lora()
    quantize_dit_fp8(m, emulate=True)  # quantised with the LoRA fused in
    before = _weights(m)
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.no_grad():
        out = m(x, t, y, mask)
    with pytest.raises(ValueError, match="unfuse_lora: these fp8 weights were quantised with the LoRA fused in"):
        if call == "enable_loras":
            m.enable_loras([])
        else:
            getattr(m, call)()
    assert fused_loras(m) == ["r"] and _same(_weights(m), before)
    assert all(mod.lora_fused for n, mod in m.named_modules() if n.endswith("adaLN_modulation.1"))
    with torch.no_grad():
        assert torch.equal(m(x, t, y, mask), out)
