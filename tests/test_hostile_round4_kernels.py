"""Hostile inputs found by the fourth audit of the kernels' public API (2026-12-06): each test fails on
the code before its fix."""

import pytest
import torch

import longcat_kernels as lk
from helpers import TRITON

TRITON_CPU = pytest.param("triton", marks=pytest.mark.triton_interpret)


def _head_dim_outer(x):
    """The same values with head_dim not innermost (stride(-1) != 1): a cache kept in another layout."""
    return x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_block_sparse_kv_cache_with_differently_strided_segments(backend):
    # the Triton two-segment block-sparse kernel read the fresh keys/values with the cache's head_dim
    # stride (and the reverse never): a cache whose head_dim is not innermost gave garbage (~1e18)
    from helpers import DEV

    B, H, D = 1, 2, 16
    q, k, v = (torch.randn(B, 32, H, D, device=DEV) for _ in range(3))
    kc, vc = (torch.randn(1, 16, H, D, device=DEV) for _ in range(2))
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2), frame_hw=(4, 4))
    ref = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="torch")
    for args in ((q, k, v, _head_dim_outer(kc), _head_dim_outer(vc)),
                 (q, _head_dim_outer(k), _head_dim_outer(v), kc, vc)):
        out = lk.attn_with_kv_cache(*args, block_sparse=bs, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_qk_norm_rope_refuses_an_output_with_overlapping_elements(backend):
    # an expanded out_q (stride 0) was written by the Triton kernel without a word (every token's
    # result raced into one row); the torch path failed inside copy_ with torch's message
    q, k = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)
    w = torch.rand(16) + 0.5
    rope = lk.Rope3D((2, 4, 4), 16)
    over = torch.zeros(1, 1, 2, 16).expand(1, 32, 2, 16)
    with pytest.raises(ValueError, match=r"^out_q: expected a tensor whose elements do not overlap"):
        lk.qk_norm_rope(q, k, w, w, rope, out_q=over, backend=backend)
    with pytest.raises(ValueError, match=r"^out_k: expected a tensor whose elements do not overlap"):
        lk.qk_norm_rope(q, k, w, w, rope, out_k=torch.zeros(1, 32, 2, 1).expand(1, 32, 2, 16), backend=backend)
