"""Hostile audit, round 42: block selection semantics (SPEC 3), BlockSelection and BlockSparseParams.

An fp64 oracle written from SPEC 3 (pooling over the real tokens of partial blocks, top-k count,
cdf count, their max, attention over the selected blocks) agreed with the torch and Triton
(interpreter, fp32/fp16) gating and attention on ~700 random tiny shapes with ties, all-equal and
integer scores and non-finite inputs; the findings below are at the edges of the API.
"""

from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import BlockSelection


def _sel():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 2, 8, generator=g)
    return lk.select_blocks(q, q, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), sparsity=0.5, backend="torch")


def test_density_and_to_mask_refuse_a_selection_that_does_not_fit_its_grids():
    """A hand-built selection with 3 query-block rows for grids of 8 query blocks gave density() = 0.5
    and to_mask() a [1, 2, 3, 8] mask, silently; indices of rank 3 failed with "not enough values to
    unpack (expected 4, got 3)". Both now raise naming the tensor, the expected and the actual shape."""
    s = _sel()
    short = BlockSelection(s.indices[:, :, :3], s.counts[:, :, :3], (2, 4, 4), (2, 4, 4), (1, 2, 2), (1, 2, 2))
    with pytest.raises(ValueError, match=r"selection.counts: expected .*8 query blocks.*got shape \(1, 2, 3\)"):
        short.density()
    with pytest.raises(ValueError, match=r"selection.counts: expected .*8 query blocks"):
        short.to_mask()
    rank3 = BlockSelection(s.indices[0], s.counts, (2, 4, 4), (2, 4, 4), (1, 2, 2), (1, 2, 2))
    with pytest.raises(ValueError, match=r"selection.indices: expected a 4-D tensor .*got shape \(2, 8, 4\)"):
        rank3.to_mask()
    other = BlockSelection(s.indices, s.counts[:1, :1], (2, 4, 4), (2, 4, 4), (1, 2, 2), (1, 2, 2))
    with pytest.raises(ValueError, match=r"selection.counts: expected shape \(1, 2, 8\).*got \(1, 1, 8\)"):
        other.density()
    # the valid selection is unchanged
    assert s.to_mask().shape == (1, 2, 8, 8) and s.density() == 0.5


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
@pytest.mark.parametrize("cache", [True, False])
def test_block_sparse_params_take_the_frame_shape_from_their_selection(backend, cache):
    """``BlockSparseParams(selection=sel)`` without frame_hw and rope raised "block_sparse.frame_hw:
    expected (H, W) (or pass rope=), got None" although the selection carries the frame shape in its
    grids (the same call with frame_hw=sel.grid_q[1:] ran). frame_hw now defaults to the selection's."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 30, 2, 8, generator=g) for _ in range(3))
    kc, vc = (torch.randn(1, 15, 2, 8, generator=g) for _ in range(2))
    k_all = torch.cat([kc, k], 1) if cache else k
    sel = lk.select_blocks(q, k_all, grid_q=(2, 3, 5), grid_k=(k_all.shape[1] // 15, 3, 5), chunk_q=(1, 3, 2),
                           sparsity=0.5, backend="torch")
    kw = dict(k_cache=kc, v_cache=vc) if cache else {}
    want = lk.attn_with_kv_cache(q, k, v, **kw, block_sparse=lk.BlockSparseParams(selection=sel, frame_hw=(3, 5)),
                                 backend=backend)
    got = lk.attn_with_kv_cache(q, k, v, **kw, block_sparse=lk.BlockSparseParams(selection=sel), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the cache-only entry (k=None) too
    if cache:
        want = lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=lk.BlockSparseParams(
            selection=lk.select_blocks(q, kc, grid_q=(2, 3, 5), chunk_q=(1, 3, 2), sparsity=0.5), frame_hw=(3, 5)))
        got = lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=lk.BlockSparseParams(
            selection=lk.select_blocks(q, kc, grid_q=(2, 3, 5), chunk_q=(1, 3, 2), sparsity=0.5)))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # neither frame_hw, rope nor selection: still the named error
    with pytest.raises(ValueError, match=r"block_sparse.frame_hw: expected \(H, W\)"):
        lk.attn_with_kv_cache(q, k, v, **kw, block_sparse=lk.BlockSparseParams(sparsity=0.5), backend=backend)
