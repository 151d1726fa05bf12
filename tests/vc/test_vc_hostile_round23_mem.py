"""Memory modes, round 23 audit; each test fails on the code before its fix.

A. peft's ``merge_adapter()`` / ``unmerge_adapter()`` write the base weights through
   ``weight.data += delta``, which bumps no version counter of the parameter. A streamed DiT
   (``BlockStreamer``) keeps block 0 prefetched from the last block of the previous call, and its
   signature (data_ptr + ``_version``) did not change: the next call ran block 0 on the unmerged copy
   while peft, now merged, skipped the adapter: block 0 silently without its LoRA.
"""

from __future__ import annotations

import pytest
import torch

from longcat_vc.memory import BlockStreamer
from test_dit import make_inputs
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config


def test_peft_merge_on_a_streamed_dit_gives_the_resident_result():
    pytest.importorskip("peft")
    from longcat_vc.training import add_lora

    cfg = tiny_config(depth=3)
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()))
    x, t, y, mask = make_inputs(cfg, B=2, T=4, shared_cond=2)
    outs = []
    for stream in (False, True):
        torch.manual_seed(0)
        dit = model_from_state_dict(cfg, sd)
        if stream:
            BlockStreamer(dit, "cpu").attach()
        peft_model = add_lora(dit)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            got = [dit(x, t, y, mask)]
            peft_model.base_model.merge_adapter()
            got.append(dit(x, t, y, mask))
            peft_model.base_model.unmerge_adapter()
            got.append(dit(x, t, y, mask))
        outs.append(got)
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), f"max abs diff {(a - b).abs().max().item()}"
