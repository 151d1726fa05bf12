"""Round 29 (interop): what another DiT codebase calls (flash-attn style cache entry, lse merges,
torch.compile of a user model calling the ops, diffusers' Wan processor)."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk


def _r(*s):
    return torch.randn(*s)


@pytest.mark.parametrize("rule", [dict(sparsity=0.5), dict(sparsity=None, cdf_threshold=0.9)])
def test_cache_only_block_sparse_refuses_a_rule_beside_a_selection(rule):
    """flash_attn_with_kvcache(k=None, block_sparse=BlockSparseParams(selection=sel, sparsity=0.5)):
    the rule was silently dropped (the selection ran), while the same params with fresh k/v raise
    (BlockSparseParams: a rule beside a selection "would be ignored, so it raises")."""
    q, kc, vc = _r(1, 32, 2, 16), _r(1, 64, 2, 16), _r(1, 64, 2, 16)
    sel = lk.select_blocks(q, kc, grid_q=(2, 4, 4), grid_k=(4, 4, 4), chunk_q=(2, 2, 2), sparsity=0.75)
    bs = lk.BlockSparseParams(selection=sel, frame_hw=(4, 4), **rule)
    with pytest.raises(ValueError, match="block_sparse: expected either selection= or a selection rule"):
        lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=bs, backend="torch")
    # the default rule beside a selection still runs it, equal to block_sparse_attn with that selection
    out = lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=lk.BlockSparseParams(selection=sel, frame_hw=(4, 4)),
                                     backend="torch")
    ref = lk.block_sparse_attn(q.double(), kc.double(), vc.double(), selection=sel, backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("sel", ["x", 3])
def test_a_selection_that_is_not_a_block_selection_is_named(fresh, sel):
    """BlockSparseParams(selection=<not a BlockSelection>) through flash_attn_with_kvcache with fresh k/v
    (attn_with_kv_cache) crashed with "AttributeError: 'str' object has no attribute 'chunk_q'"; both
    paths now raise a TypeError naming block_sparse.selection."""
    q, kc, vc, k, v = _r(1, 32, 2, 16), _r(1, 64, 2, 16), _r(1, 64, 2, 16), _r(1, 32, 2, 16), _r(1, 32, 2, 16)
    bs = lk.BlockSparseParams(selection=sel, sparsity=None, frame_hw=(4, 4))
    with pytest.raises(TypeError, match=r"block_sparse\.selection: expected a BlockSelection, got"):
        lk.flash_attn_with_kvcache(q, kc, vc, *((k, v) if fresh else ()), block_sparse=bs, backend="torch")


def test_a_masked_self_attention_call_keeps_its_mask():
    """SkyReels-V2's diffusion forcing (num_frame_per_block > 1) gives every attn1 call a block-causal
    attention_mask: with block-sparse attention applied (sparsity 0.5) the output must equal diffusers'
    own (the masked call served by the original processor), not BSA over the unmasked sequence."""
    pytest.importorskip("diffusers")
    from diffusers import SkyReelsV2Transformer3DModel  # noqa: PLC0415

    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention  # noqa: PLC0415

    torch.manual_seed(0)
    m = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32, num_frame_per_block=3,
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    inp = dict(hidden_states=_r(2, 4, 6, 8, 12), timestep=torch.tensor([[500] * 6, [20] * 6]),
               encoder_hidden_states=_r(2, 7, 24), enable_diffusion_forcing=True, return_dict=False)
    with torch.no_grad():
        ref = m(**inp)[0]
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(2, 2, 2)), backend="torch")
    with torch.no_grad():
        out = m(**inp)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
