"""``pair_common_first``: the selection reordering that lets the sm90_ws BSA kernel load the key
blocks two neighbouring query blocks share once (CPU; the kernel itself is tested on the GPU in
``test_bsa_cuda_kernels.py``)."""

from __future__ import annotations

import random

import pytest
import torch

from longcat_kernels import block_sparse_attn, select_blocks
from longcat_kernels.ops.block_sparse_attn.cuda import kernel_selection_args, pair_common_first
from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection
from longcat_kernels.testing import inputs as ti


def _random_selection(B, H, Nq, Nk, K, overlap):
    """Rows of distinct ids; the second block of each pair shares about ``overlap`` of the first's
    ids; garbage (even in-range ids) past counts."""
    idx = torch.randint(0, Nk, (B, H, Nq, K), dtype=torch.int32)
    cnt = torch.randint(0, min(K, Nk) + 1, (B, H, Nq), dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            prev = []
            for i in range(Nq):
                n = int(cnt[b, h, i])
                if i % 2 and prev:
                    keep = [x for x in prev if random.random() < overlap][:n]
                    rest = [x for x in torch.randperm(Nk).tolist() if x not in keep][: n - len(keep)]
                    row = keep + rest
                    random.shuffle(row)
                else:
                    row = torch.randperm(Nk)[:n].tolist()
                idx[b, h, i, :n] = torch.tensor(row, dtype=torch.int32)
                prev = row
    return idx, cnt


@pytest.mark.parametrize("Nq", [1, 2, 7, 10])
@pytest.mark.parametrize("overlap", [0.0, 0.6, 1.0])
def test_reorder_keeps_each_set_and_puts_the_shared_head_first(Nq, overlap):
    B, H, Nk, K = 2, 3, 23, 9
    idx, cnt = _random_selection(B, H, Nq, Nk, K, overlap)
    out, common = pair_common_first(idx, cnt)
    assert out.dtype == torch.int32 and common.dtype == torch.int32
    assert out.shape == idx.shape and common.shape == cnt.shape
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                n = int(cnt[b, h, i])
                row = out[b, h, i].tolist()
                mine = set(idx[b, h, i, :n].tolist())
                assert sorted(row[:n]) == sorted(mine)
                assert all(x == -1 for x in row[n:])
                nc = int(common[b, h, i])
                if i == Nq - 1 and Nq % 2:
                    assert nc == 0 and row[:n] == sorted(mine)  # unpaired: its blocks ascending
                    continue
                j = i ^ 1
                other = set(idx[b, h, j, : int(cnt[b, h, j])].tolist())
                assert nc == len(mine & other) == int(common[b, h, j])
                assert row[:nc] == out[b, h, j, :nc].tolist() == sorted(mine & other)
                assert row[nc:n] == sorted(mine - other)


def test_reorder_of_a_broadcast_batch_and_empty_shapes():
    idx, cnt = _random_selection(1, 2, 4, 10, 4, 0.5)
    out, common = pair_common_first(idx, cnt)
    assert out.shape == (1, 2, 4, 4) and common.shape == (1, 2, 4)
    e_idx = torch.zeros((1, 2, 4, 0), dtype=torch.int32)
    e_cnt = torch.zeros((1, 2, 4), dtype=torch.int32)
    out, common = pair_common_first(e_idx, e_cnt)
    assert out.shape == e_idx.shape and torch.equal(common, torch.zeros_like(e_cnt))


def test_walk_of_the_kernel_attends_the_same_blocks():
    """The sm90_ws kernel's walk, written out: consumer of block 2i+c reads entries [0, nc) of
    block 2i's list, then its own [nc, count). On a real (gated) selection the walked set is each
    block's own set, and on video-like inputs the shared head is most of each list."""
    grid, chunk, H, D = (8, 8, 16), (4, 4, 4), 2, 32
    q, k, _ = ti.make_video_qkv(1, grid, H, D, dtype=torch.float32)
    sel = select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.75, backend="torch")
    idx, common = pair_common_first(sel.indices, sel.counts)
    cnt = sel.counts
    shared = total = 0
    for h in range(H):
        for i in range(idx.shape[2]):
            n, nc = int(cnt[0, h, i]), int(common[0, h, i])
            head = idx[0, h, i - i % 2, :nc].tolist()
            walked = head + idx[0, h, i, nc:n].tolist()
            assert sorted(walked) == sorted(sel.indices[0, h, i, :n].tolist())
            shared += nc
            total += n
    assert shared / total > 0.5, shared / total
    # other kernels get the lists as they are
    (idx2, *_), c2 = kernel_selection_args(sel, "sm90")
    assert c2 is None and torch.equal(idx2, sel.indices)


def test_reordered_selection_gives_the_same_attention():
    """Same blocks per query block, other order: the torch reference agrees to fp32 rounding."""
    grid, chunk, B, H, D = (4, 8, 8), (2, 4, 4), 1, 2, 16
    S = 4 * 8 * 8
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    sel = select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")
    idx, _ = pair_common_first(sel.indices, sel.counts)
    sel2 = BlockSelection(idx, sel.counts, sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    a = block_sparse_attn(q, k, v, selection=sel, backend="torch")
    b = block_sparse_attn(q, k, v, selection=sel2, backend="torch")
    assert not torch.isnan(a).any()
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
