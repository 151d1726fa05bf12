"""Experimental pair-of-query-blocks BSA forward (``ops/block_sparse_attn/triton_pairs.py``) in the
Triton interpreter (fp32) against the torch reference, and its union-of-selections table."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longcat_kernels import select_blocks
from longcat_kernels.ops.block_sparse_attn.reference import block_sparse_attn_reference
from longcat_kernels.testing import make_qkv, make_video_qkv


def _with_empty_rows(sel, frac=0.25):
    """Zero the selection of a random fraction of query blocks (they must output 0, lse -inf)."""
    drop = torch.rand(sel.counts.shape, device=sel.counts.device) < frac
    drop.view(-1)[torch.randint(0, drop.numel(), ())] = True  # at least one empty row, every run
    return dataclasses.replace(
        sel, counts=torch.where(drop, torch.zeros_like(sel.counts), sel.counts),
        indices=torch.where(drop[..., None], torch.full_like(sel.indices, -1), sel.indices))


@pytest.mark.triton_interpret
def test_pair_union_matches_python_sets():
    from longcat_kernels.ops.block_sparse_attn.triton_pairs import pair_blocks, pair_union

    grid, chunk = (2, 4, 6), (1, 2, 2)  # 2 x 2 x 3 blocks: odd row length, a lone block per row
    q, k, _ = make_qkv(2, 48, 3, 16)
    sel = _with_empty_rows(select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch"))
    u = pair_union(sel)
    a, b = pair_blocks((2, 2, 3))
    assert u.pairs_per_row == 2 and a.tolist() == [0, 2, 3, 5, 6, 8, 9, 11]
    assert b.tolist() == [1, -1, 4, -1, 7, -1, 10, -1]

    def s(bb, h, blk):
        return set() if blk < 0 else set(sel.indices[bb, h, blk, : int(sel.counts[bb, h, blk])].tolist())

    for bb in range(2):
        for h in range(3):
            for p in range(8):
                sa, sb = s(bb, h, int(a[p])), s(bb, h, int(b[p]))
                n = int(u.counts[bb, h, p])
                ids = u.indices[bb, h, p, :n].tolist()
                bits = u.bits[bb, h, p, :n].tolist()
                assert ids == sorted(sa | sb)
                assert bits == [(1 if x in sa else 0) | (2 if x in sb else 0) for x in ids]


_PARTIAL = dict(grid_q=(3, 3, 6), grid_k=(3, 3, 6), chunk=(2, 2, 2), video=False)  # partial blocks, odd rows


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case, variant", [
    (dict(grid_q=(2, 4, 8), grid_k=(2, 4, 8), chunk=(1, 4, 4), video=False), "split"),  # divisible, even rows
    (dict(grid_q=(2, 4, 8), grid_k=(4, 4, 8), chunk=(1, 4, 4), video=True), "split"),   # Tq != Tk
    (_PARTIAL, "split"),
    (_PARTIAL, "masked"),
])
def test_pairs_forward_matches_reference_fp32(case, variant):
    from longcat_kernels.ops.block_sparse_attn.triton_pairs import bsa_forward_pairs

    gq, gk, chunk = case["grid_q"], case["grid_k"], case["chunk"]
    Sq, Sk = gq[0] * gq[1] * gq[2], gk[0] * gk[1] * gk[2]
    B, H, D = 1, 2, 32
    if case["video"]:
        q, k, v = make_video_qkv(B, gq, H, D, grid_k=gk)
    else:
        q, k, v = make_qkv(B, Sq, H, D, seq_k=Sk, permuted=True)
    sel = _with_empty_rows(select_blocks(q, k, grid_q=gq, grid_k=gk, chunk_q=chunk, sparsity=0.5, backend="torch"))
    out, lse = bsa_forward_pairs(q, k, v, sel, scale=0.3, variant=variant)
    ref_out, ref_lse = block_sparse_attn_reference(q.double(), k.double(), v.double(), sel, 0.3)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and not finite.all()
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)
    assert (out.view(B, Sq, H, D).transpose(1, 2)[~finite] == 0).all()


@pytest.mark.triton_interpret
def test_pairs_forward_rejects_bad_shapes():
    from longcat_kernels.ops.block_sparse_attn.triton_pairs import bsa_forward_pairs

    q, k, v = make_qkv(1, 32, 2, 24)
    sel = select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(1, 4, 4), sparsity=0.5, backend="torch")
    with pytest.raises(ValueError, match="head_dim"):
        bsa_forward_pairs(q, k, v, sel)
    q, k, v = make_qkv(1, 32, 2, 16)
    with pytest.raises(ValueError, match="variant"):
        bsa_forward_pairs(q, k, v, sel, variant="fused")


@pytest.mark.triton_gpu
@pytest.mark.parametrize("variant", ["split", "masked"])
@pytest.mark.parametrize("kind", ["random", "video"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pairs_forward_gpu_matches_triton_forward(kind, dtype, variant):
    from longcat_kernels.ops.block_sparse_attn.triton import bsa_forward_triton
    from longcat_kernels.ops.block_sparse_attn.triton_pairs import bsa_forward_pairs

    grid, chunk, B, H, D = (8, 12, 20), (4, 4, 4), 1, 4, 128  # 2x3x5 blocks: odd rows
    S = grid[0] * grid[1] * grid[2]
    if kind == "random":
        q, k, v = make_qkv(B, S, H, D, dtype=dtype, device="cuda")
    else:
        q, k, v = make_video_qkv(B, grid, H, D, dtype=dtype, device="cuda")
    sel = _with_empty_rows(select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.75, backend="triton"))
    out, lse = bsa_forward_pairs(q, k, v, sel, variant=variant)
    ref_out, ref_lse = bsa_forward_triton(q, k, v, sel, D ** -0.5)
    ref64, _ = block_sparse_attn_reference(q.double(), k.double(), v.double(), sel, D ** -0.5)
    assert not out.isnan().any()
    err = float((out.double() - ref64).norm() / ref64.norm())
    err_ref = float((ref_out.double() - ref64).norm() / ref64.norm())
    assert err <= 2 * err_ref + 1e-3, (err, err_ref)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-2, rtol=1e-3)
