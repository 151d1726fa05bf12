"""Hostile inputs of the fp8 inference mode (audit 32b, 2026-12-07).

A. ``LongCatDiT.load_state_dict`` of an fp8-quantised model's state dict without its ``weight_scale``
   keys (or of any state dict holding an 8-bit float tensor for a weight that is not an ``Fp8Linear``'s)
   into an unquantised DiT: no ``weight_scale`` key reached the check, so ``copy_`` cast the raw e4m3
   values (up to 448) into the bf16/fp32 weights without their scales, silently, ``strict=True``
   included (the unquantised model expects no ``weight_scale`` key, so none was missing).
"""

from __future__ import annotations

import pytest
import torch

from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

from longcat_vc.fp8 import quantize_dit_fp8


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strict", [True, False])
def test_fp8_weights_without_their_scales_are_refused_by_an_unquantised_model(strict):
    """An fp8 state dict with its ``weight_scale`` keys dropped loaded into an unquantised DiT as the raw
    e4m3 values (``blocks.0.attn.qkv.weight`` up to 448 instead of ~0.5), silently, strict or not."""
    cfg = tiny_config()
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q = model_from_state_dict(cfg, random_state_dict(cfg, seed=seed))
    quantize_dit_fp8(q, emulate=True)
    stripped = {k: v for k, v in q.state_dict().items() if not k.endswith(".weight_scale")}
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=seed + 1))
    before = _weights(m)
    with pytest.raises(ValueError, match=r"disagree on fp8 quantisation.*blocks\.0\.attn\.qkv\.weight: "
                                         r"torch\.float8_e4m3fn outside an fp8 \(quantize_dit_fp8\) weight"):
        m.load_state_dict(stripped, strict=strict)
    assert _same(_weights(m), before)


@pytest.mark.parametrize("quantised", [False, True])
def test_an_8_bit_float_weight_of_a_module_that_is_never_fp8_is_refused(quantised):
    """An e4m3 ``final_layer.linear.weight`` (never quantised: ``FP8_TARGETS`` are the blocks' linears)
    was cast into the fp32 weight as its raw values, silently, into a quantised model or not."""
    cfg = tiny_config()
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=seed))
    if quantised:
        quantize_dit_fp8(m, emulate=True)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    before = _weights(m)
    sd["final_layer.linear.weight"] = (sd["final_layer.linear.weight"] * 100).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight: torch\.float8_e4m3fn outside an fp8"):
        m.load_state_dict(sd)
    assert _same(_weights(m), before)
    m.load_state_dict({k: v for k, v in sd.items() if k != "final_layer.linear.weight"}, strict=False)  # the rest loads
