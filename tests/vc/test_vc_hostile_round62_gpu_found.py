"""Round 62: what the first GPU run of rounds 50-61 (session 29, H100) found, pinned on the CPU where it can be.

* ``quantize_dit_fp8`` froze each converted weight but left its bias requiring grad (every fresh
  ``nn.Linear``'s bias does): a quantised layer then refused a forward outside ``torch.no_grad()`` naming
  ``bias``, although nobody asked for a gradient (``test_fp8_scaled_mm_matches_emulation_gpu`` on the GPU).
  The bias is frozen with the weight now; a bias set to require grad afterwards is still refused.
* (GPU only, ``tests/test_hostile_round56_int32.py``) the cuDNN route's lse merge kernel computed row
  offsets as 32-bit products: a fused-qkv view past 2^31 elements read an illegal address.
"""
from __future__ import annotations

import pytest
import torch

from test_dit import make_inputs
from tiny_ckpt import random_state_dict, tiny_config

from longcat_vc.dit import LongCatDiT
from longcat_vc.fp8 import Fp8Linear, quantize_dit_fp8


def _trainable_dit(cfg):
    """A DiT as a user builds one: parameters requiring grad (no ``requires_grad_(False)``)."""
    m = LongCatDiT(cfg, device="meta")
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    m.load_state_dict(random_state_dict(cfg, seed=seed), strict=True, assign=True)
    return m.eval()


def test_a_quantised_linear_runs_outside_no_grad_with_its_bias_frozen():
    cfg = tiny_config()
    m = _trainable_dit(cfg)
    assert all(p.requires_grad for p in m.parameters())
    assert quantize_dit_fp8(m, emulate=True)
    lins = [mod for mod in m.modules() if isinstance(mod, Fp8Linear)]
    assert lins and all(lin.bias is None or not lin.bias.requires_grad for lin in lins)
    lin = next(mod for mod in lins if mod.bias is not None)
    a = torch.randn(3, 5, lin.in_features)
    out = lin(a)  # grad mode on, nothing requires grad: no refusal
    with torch.no_grad():
        want = lin(a)
    assert torch.isfinite(out).all() and not out.requires_grad
    assert torch.equal(out, want)
    # the whole DiT under grad mode, with its other parameters still trainable, is refused by name (by design:
    # no gradient flows through the fp8 quantisation), and runs under no_grad
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with pytest.raises(RuntimeError, match=r"no gradient flows through fp8 quantisation"):
        m(x, t, y, mask)
    with torch.no_grad():
        assert torch.isfinite(m(x, t, y, mask)).all()


def test_a_bias_set_to_require_grad_after_conversion_is_still_refused():
    cfg = tiny_config()
    m = _trainable_dit(cfg)
    quantize_dit_fp8(m, emulate=True)
    lin = next(mod for mod in m.modules() if isinstance(mod, Fp8Linear) and mod.bias is not None)
    lin.bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"Fp8Linear: bias requires grad"):
        lin(torch.randn(3, lin.in_features))
