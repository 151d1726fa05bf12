"""Hostile inputs of the fp8 inference mode (audit 32b, 2026-12-07).

A. ``LongCatDiT.load_state_dict`` of an fp8-quantised model's state dict without its ``weight_scale``
   keys (or of any state dict holding an 8-bit float tensor for a weight that is not an ``Fp8Linear``'s)
   into an unquantised DiT: no ``weight_scale`` key reached the check, so ``copy_`` cast the raw e4m3
   values (up to 448) into the bf16/fp32 weights without their scales, silently, ``strict=True``
   included (the unquantised model expects no ``weight_scale`` key, so none was missing).
B. A backward through an fp8-quantised DiT (to its input latents, or to parameters before an fp8
   linear) ran: the quantised activations carry no gradient, so every path through the fp8 linears was
   missing from it, silently (the input gradient 40% off the fp32 model's on the tiny DiT, while the
   forward is within 3%). The fp8 layers now refuse an input that requires grad while grad is enabled.
"""

from __future__ import annotations

import pytest
import torch

from test_dit import make_inputs
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


@pytest.mark.parametrize("what", ["input", "adaln"])
def test_a_gradient_through_fp8_linears_is_refused_not_silently_partial(what):
    """``dit(x.requires_grad_()).backward()`` on an fp8 DiT gave an input gradient 40% off the fp32
    model's (only the residual paths); so did parameters before an fp8 linear (an adaLN trained by
    hand). Inference under ``torch.no_grad()`` and grad-enabled calls with nothing requiring grad run."""
    cfg = tiny_config()
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    sd = random_state_dict(cfg, seed=seed)
    ref, q = model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)
    quantize_dit_fp8(q, emulate=True)
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    out = q(x, t, y, mask)  # grad enabled, nothing requires grad: runs
    with torch.no_grad():
        want = ref(x, t, y, mask)
        assert ((out - want).norm() / want.norm()).item() < 0.1
    if what == "input":
        x = x.clone().requires_grad_(True)
    else:
        q.blocks[0].adaLN_modulation[1].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"no gradient flows through fp8 quantisation"):
        q(x, t, y, mask)
    with torch.no_grad():
        assert torch.equal(q(x, t, y, mask), out)
