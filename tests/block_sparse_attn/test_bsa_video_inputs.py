"""Video-like benchmark inputs (``make_video_qkv``) and the neighbour selection overlap report."""

from __future__ import annotations

import math

import pytest
import torch

from longcat_kernels import select_blocks
from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection
from longcat_kernels.testing import inputs as ti


def _sel(rows, grid_q, grid_k, chunk=(1, 1, 1)):
    """BlockSelection from per-(head, q block) lists of key blocks (B = 1)."""
    H, Nq = len(rows), len(rows[0])
    M = max(1, max(len(r) for h in rows for r in h))
    idx = torch.full((1, H, Nq, M), -1, dtype=torch.int32)
    cnt = torch.zeros((1, H, Nq), dtype=torch.int32)
    for h, per_q in enumerate(rows):
        for i, r in enumerate(per_q):
            idx[0, h, i, : len(r)] = torch.tensor(r, dtype=torch.int32)
            cnt[0, h, i] = len(r)
    return BlockSelection(idx, cnt, grid_q, grid_k, chunk, chunk)


def test_overlap_exact_on_a_handmade_selection():
    # 4 query blocks along w; head 0: {0,1} {1,0} {2} {}; head 1: {3} {3} {3} {3}
    sel = _sel([[[0, 1], [1, 0], [2], []], [[3], [3], [3], [3]]], (1, 1, 4), (1, 1, 4))
    r = ti.selection_overlap(sel)
    # w pairs: head 0 -> 1, 0, 0 (union {2} with {} counts, jaccard 0); head 1 -> 1, 1, 1
    assert r["jaccard_w"] == pytest.approx(4 / 6)
    assert math.isnan(r["jaccard_t"]) and math.isnan(r["jaccard_h"])
    assert r["jaccard_mean"] == pytest.approx(4 / 6)
    # pairs (0,1), (2,3): head 0 unions 2 and 1 of 4 and 1 loads; head 1 unions 1 and 1 of 2 and 2
    assert r["pair_load_ratio"] == pytest.approx((2 + 1 + 1 + 1) / (4 + 1 + 2 + 2))
    assert r["mean_selected"] == pytest.approx((5 + 4) / 8)
    assert r["num_k_blocks"] == 4


def test_overlap_axes_on_a_3d_block_grid():
    # grid 2x2x2 blocks of chunk 1: every q block selects key block (t) -> same along h and w,
    # disjoint along t
    rows = [[[t] for t in range(2) for _ in range(4)]]
    r = ti.selection_overlap(_sel(rows, (2, 2, 2), (2, 1, 1)))
    assert r["jaccard_h"] == 1.0 and r["jaccard_w"] == 1.0 and r["jaccard_t"] == 0.0
    assert r["pair_load_ratio"] == 0.5


def test_video_inputs_shapes_scale_and_smoothness():
    grid, H, D = (4, 8, 12), 3, 32
    q, k, v = ti.make_video_qkv(2, grid, H, D, dtype=torch.float16, permuted=True)
    S = 4 * 8 * 12
    for t in (q, k, v):
        assert tuple(t.shape) == (2, S, H, D) and t.dtype == torch.float16
        assert t.stride(1) == D  # BHSD buffer seen as BSHD
        assert 0.9 < float(t.float().std()) < 1.1
    qf = q.float().view(2, *grid, H, D)
    rq, _, _ = ti.make_qkv(2, S, H, D)
    rf = rq.view(2, *grid, H, D)

    def neighbour_corr(x):  # cosine of adjacent tokens along w, averaged
        return float(torch.nn.functional.cosine_similarity(x[:, :, :, 1:], x[:, :, :, :-1], dim=-1).mean())

    assert neighbour_corr(qf) > 0.6
    assert abs(neighbour_corr(rf)) < 0.1


def test_video_queries_are_the_last_frames_of_the_key_grid():
    q, k, _ = ti.make_video_qkv(1, (2, 4, 4), 2, 16, grid_k=(5, 4, 4), noise=0.0, qk_alignment=1.0)
    assert q.shape[1] == 32 and k.shape[1] == 80
    cos = torch.nn.functional.cosine_similarity(q, k[:, 80 - 32:], dim=-1)
    assert float(cos.min()) > 0.999


def test_video_inputs_overlap_more_than_random():
    grid, chunk, H, D = (8, 16, 16), (4, 4, 4), 4, 32
    S = 8 * 16 * 16
    qv, kv, _ = ti.make_video_qkv(1, grid, H, D)
    qr, kr, _ = ti.make_qkv(1, S, H, D)
    rv = ti.selection_overlap(select_blocks(qv, kv, grid_q=grid, chunk_q=chunk, sparsity=0.75, backend="torch"))
    rr = ti.selection_overlap(select_blocks(qr, kr, grid_q=grid, chunk_q=chunk, sparsity=0.75, backend="torch"))
    assert rr["jaccard_mean"] < 0.3 and rr["pair_load_ratio"] > 0.8
    assert rv["jaccard_mean"] > rr["jaccard_mean"] + 0.15
    assert rv["pair_load_ratio"] < rr["pair_load_ratio"] - 0.05


@pytest.mark.parametrize("kw, match", [
    (dict(grid=(0, 4, 4)), "grid"),
    (dict(grid_k=(1, 4, 4)), "grid_k"),
    (dict(grid_k=(3, 4, 5)), "grid_k"),
    (dict(corr=(1.0, 0.0, 1.0)), "corr"),
    (dict(qk_alignment=1.5), "qk_alignment"),
    (dict(noise=-1.0), "noise"),
    (dict(heads=0), "heads"),
])
def test_video_inputs_reject_bad_arguments(kw, match):
    args = dict(batch=1, grid=(2, 4, 4), heads=2, head_dim=8)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ti.make_video_qkv(**args)


def test_overlap_pairs_follow_the_pairs_kernel_on_odd_rows():
    # 3 blocks along w: pair (0, 1) loads {0} once for 2 selections; block 2 is alone
    r = ti.selection_overlap(_sel([[[0], [0], [1]]], (1, 1, 3), (1, 1, 2)))
    assert r["pair_load_ratio"] == pytest.approx(2 / 3)
    assert r["jaccard_w"] == pytest.approx(0.5)
