"""Hostile-user round 14 of the diffusers integration (tiny random Wan models, fp32 on CPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from helpers import tiny_wan  # noqa: E402

import longcat_kernels as lk  # noqa: E402
from longcat_kernels.integrations.diffusers import apply_block_sparse_attention  # noqa: E402


def _model():
    return tiny_wan()


def _inputs(F, H, W):
    return dict(hidden_states=torch.randn(2, 4, F, H, W), timestep=torch.tensor([500, 20]),
                encoder_hidden_states=torch.randn(2, 7, 24), return_dict=False)


def test_a_forward_that_skips_the_grid_hook_is_refused_not_run_on_the_last_grid():
    # .forward(...) skips pre-forward hooks: a 8x12 call then a 12x8 one (same token count) took the first
    # call's (2, 4, 6) grid for the (2, 6, 4) tokens and chose blocks of the wrong tokens without a word
    m = _model()
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    with torch.no_grad():
        m(**_inputs(2, 8, 12))
        with pytest.raises(RuntimeError, match=r"\.forward"):
            m.forward(**_inputs(2, 12, 8))
        # calling the module again works, at its own grid
        out = m(**_inputs(2, 12, 8))[0]
    assert out.shape == (2, 4, 2, 12, 8) and torch.isfinite(out).all()


def test_reentrant_checkpointing_still_recomputes_in_backward():
    # reentrant checkpoints detach their inputs: the recomputed blocks see new RoPE tables in backward
    from functools import partial

    m = _model().train()
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 2, 2)), backend="torch")
    m.enable_gradient_checkpointing(partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    x = _inputs(2, 8, 12)
    x["hidden_states"].requires_grad_(True)
    m(**x)[0].sum().backward()
    assert x["hidden_states"].grad is not None and torch.isfinite(x["hidden_states"].grad).all()
