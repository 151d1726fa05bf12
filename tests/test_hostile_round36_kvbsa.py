"""Round 36: block-sparse attention over [cache; fresh] keys (``attn_with_kv_cache`` /
``flash_attn_with_kvcache`` with ``block_sparse=``), hostile-user inputs."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk


def test_cache_only_block_sparse_gqa_error_names_the_cache_as_passed():
    """``flash_attn_with_kvcache(q, k_cache, v_cache, block_sparse=...)`` with a GQA cache (2 heads
    for q's 4, a divisor) raised "k_cache: expected 4 heads ... (shape (2, 12, 2, 16))": the shape of
    an internal expand over q's batch, not the batch-1 cache the user passed, and no word that
    block_sparse is what refuses GQA (the same cache is accepted dense). It now raises as the
    fresh-k/v path does: "GQA is dense only", with the cache's own shape."""
    q = torch.randn(2, 8, 4, 16)
    kc, vc = torch.randn(1, 12, 2, 16), torch.randn(1, 12, 2, 16)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2), chunk_k=(2, 1, 2), frame_hw=(2, 2))
    lk.flash_attn_with_kvcache(q, kc, vc, backend="torch")  # dense: GQA is fine
    with pytest.raises(ValueError, match=r"^k_cache: expected 4 heads \(same as q\) with block_sparse "
                                         r"\(GQA is dense only\), got 2 \(shape \(1, 12, 2, 16\)\)"):
        lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=bs, backend="torch")
