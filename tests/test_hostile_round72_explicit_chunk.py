"""Round 72 (left by round 74): ``chunk_q=(4, 4, 4)`` passed explicitly beside a ``selection`` built with other
chunks was taken for the default and ignored without a word (the selection's 2x2x2 blocks ran). Only the
default left as it is counts as not passed now; an explicit chunk must be the selection's. Both ops."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk

GRID = (4, 4, 4)


def _sel(chunk, grid=GRID):
    q = torch.randn(1, grid[0] * grid[1] * grid[2], 2, 16)
    return q, lk.select_blocks(q, q, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")


def test_block_sparse_attn_refuses_an_explicit_default_sized_chunk_beside_another_selection():
    q, sel = _sel((2, 2, 2))
    ref = lk.block_sparse_attn(q, q, q, selection=sel, backend="torch")
    assert ref.isfinite().all()
    with pytest.raises(ValueError, match=r"chunk_q: expected \(2, 2, 2\) \(selection.chunk_q\)"):
        lk.block_sparse_attn(q, q, q, selection=sel, chunk_q=(4, 4, 4), backend="torch")
    with pytest.raises(ValueError, match=r"chunk_q: expected \(2, 2, 2\)"):
        lk.block_sparse_attn(q, q, q, selection=sel, chunk_q=[4, 4, 4], backend="torch")
    got = lk.block_sparse_attn(q, q, q, selection=sel, chunk_q=(2, 2, 2), backend="torch")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_a_default_chunk_selection_takes_an_explicit_4x4x4():
    q, sel = _sel((4, 4, 4), (8, 4, 4))
    ref = lk.block_sparse_attn(q, q, q, selection=sel, backend="torch")
    got = lk.block_sparse_attn(q, q, q, selection=sel, chunk_q=(4, 4, 4), backend="torch")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_attn_with_kv_cache_refuses_an_explicit_default_sized_chunk_beside_another_selection():
    q = torch.randn(1, 64, 2, 16)
    kc = torch.randn(1, 64, 2, 16)
    grid_k = (8, 4, 4)
    sel = lk.select_blocks(q, torch.cat([kc, q], 1), grid_q=GRID, grid_k=grid_k, chunk_q=(2, 2, 2), sparsity=0.5,
                           backend="torch")
    ok = lk.attn_with_kv_cache(q, q, q, kc, kc, block_sparse=lk.BlockSparseParams(selection=sel), backend="torch")
    assert ok.isfinite().all()
    with pytest.raises(ValueError, match=r"block_sparse.chunk_q: expected \(2, 2, 2\)"):
        lk.attn_with_kv_cache(q, q, q, kc, kc, backend="torch",
                              block_sparse=lk.BlockSparseParams(selection=sel, chunk_q=(4, 4, 4)))
