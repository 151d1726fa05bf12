"""return_lse of block-sparse attention (SPEC 12) on the torch backend and the Triton interpreter:
lse against a float64 ``logsumexp`` over exactly the selected 3D blocks' keys; query blocks that
select nothing give ``-inf`` and output 0 (never NaN). Cross-op lse checks (GPU all ops, compile,
merging partials) are in ``tests/kv_cache_attn/test_attn_lse.py``."""
from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS, DEV, check_lse, lse64, n_blocks, out64
from helpers import randn as _rand

import longcat_kernels as lk
from longcat_kernels.testing.oracle import bsa_token_mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_lse_matches_fp64_and_empty_rows_are_minus_inf(backend):
    B, H, D, grid, chunk = 1, 2, 32, (3, 5, 6), (2, 4, 4)
    q, k, v = (_rand(B, 90, H, D) for _ in range(3))
    sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")
    # empty every other query block of head 0 so -inf rows are exercised next to normal ones
    counts = sel.counts.clone()
    counts[:, 0, ::2] = 0
    sel = lk.BlockSelection(sel.indices, counts, sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    out, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    bm = torch.zeros(B, H, sel.indices.shape[2], sel.indices.shape[2] * 0 + n_blocks(grid, chunk), dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(bm.shape[2]):
                bm[b, h, i, sel.indices[b, h, i, : counts[b, h, i]].long()] = True
    mask = bsa_token_mask(bm, grid, grid, chunk, chunk).to(DEV)
    check_lse(lse, lse64(q, k, mask, D**-0.5), B, H, 90)
    assert not torch.isnan(out).any()
    assert (out.transpose(1, 2)[torch.isinf(lse)] == 0).all()
    torch.testing.assert_close(out.double(), out64(q, k, v, mask, D**-0.5), atol=1e-4, rtol=1e-4)
    # the plain call returns the same output
    assert torch.equal(lk.block_sparse_attn(q, k, v, selection=sel, backend=backend), out)

