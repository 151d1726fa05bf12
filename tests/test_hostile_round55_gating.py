"""Hostile audit, round 55: block selection (gating) of BSA, SPEC 3 steps 1-2.

An fp64 oracle written from SPEC 3 (mean over the real tokens of partial blocks, rounded to the input
dtype; unscaled scores; top-k count, cdf count by searchsorted right=True, their max; ties to the lower
block id) agreed with the torch and Triton (interpreter, fp32/fp16) gating on random tiny shapes with
constant / zero / duplicated inputs, except for ``cdf_threshold=1.0``, which keeps every block by design
(documented). One bug: the Triton top-k of rows of more than 16384 key blocks broke ties in any order.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import longcat_kernels as lk

_TRITON = pytest.param("triton", marks=pytest.mark.triton_interpret)


def _backend(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    return backend


def _oracle(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf):
    """fp64 re-implementation of SPEC 3 gating -> (mask [B,H,Nq,Nk], counts)."""

    def pool(x, grid, chunk):
        B, _, H, D = x.shape
        (T, Hg, Wg), (ct, ch, cw) = grid, chunk
        nt, nh, nw = -(-T // ct), -(-Hg // ch), -(-Wg // cw)
        xg = x.double().reshape(B, T, Hg, Wg, H, D)
        out = torch.zeros(B, H, nt * nh * nw, D, dtype=torch.float64)
        for a in range(nt):
            for b in range(nh):
                for c in range(nw):
                    blk = xg[:, a * ct:(a + 1) * ct, b * ch:(b + 1) * ch, c * cw:(c + 1) * cw]
                    out[:, :, (a * nh + b) * nw + c] = blk.reshape(B, -1, H, D).mean(1).to(x.dtype).double()
        return out

    s = pool(q, grid_q, chunk_q) @ pool(k, grid_k, chunk_k).transpose(-1, -2)
    Nk = s.shape[-1]
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    cnt = torch.zeros(s.shape[:-1], dtype=torch.long)
    if sparsity is not None:
        cnt += int((1 - sparsity) * Nk)
    if cdf is not None:
        cum = torch.cumsum(torch.gather(torch.softmax(s / math.sqrt(q.shape[-1]), -1), -1, order), -1)
        thr = torch.full(s.shape[:-1] + (1,), float(cdf), dtype=torch.float64)
        cnt = torch.maximum(cnt, torch.searchsorted(cum.contiguous(), thr, right=True)[..., 0])
    mask = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, order, torch.arange(Nk) < cnt[..., None])
    return mask, cnt


def test_triton_topk_of_a_long_row_breaks_ties_to_the_lower_block_id():
    """Rows of more than 16384 key blocks (chunk (1,1,1) on a 480p grid) took ``torch.topk(sorted=False)``
    in the Triton gating, which keeps any of the tied blocks: zero q, constant k or duplicated blocks gave a
    selection other than the torch gating's (stable sort, ties to the lower id, as the Triton top-k kernel
    does). It now takes the same stable sort."""
    from longcat_kernels.ops.block_sparse_attn.selection import select_rows
    from longcat_kernels.ops.block_sparse_attn.triton import selection_from_scores

    g = torch.Generator().manual_seed(55)
    nk = 16385
    scores = torch.randint(0, 3, (1, 2, 2, nk), generator=g).float()  # many exact ties
    scores[0, 1, 0] = 0.0  # a whole row tied (zero q)
    scores[0, 1, 1, ::7] = -0.0  # -0.0 ties +0.0
    for sparsity in (0.5, 0.7):
        idx, cnt = selection_from_scores(scores, 16, sparsity, None)
        n = int((1 - sparsity) * nk)
        want, _ = select_rows(scores.reshape(2, 2, nk), 16, sparsity, None, n)
        assert cnt.eq(n).all() and idx.shape[-1] == n
        assert torch.equal(idx.sort(-1).values, want.reshape(1, 2, 2, n).sort(-1).values)
    idx, _ = selection_from_scores(scores, 16, 0.5, None)
    assert torch.equal(idx[0, 1, 0].sort().values, torch.arange(nk // 2, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["torch", _TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gating_matches_an_fp64_oracle_on_partial_blocks_and_ties(backend, dtype):
    """Partial edge blocks (grid 3x5 with chunk 2x2 / 2x3), exact ties (constant k, zero q, duplicated
    key frames): selection equal to the SPEC oracle, int32, -1 past counts, distinct ids."""
    backend = _backend(backend)
    g = torch.Generator().manual_seed(5501)
    gq, gk, cq, ck = (2, 3, 5), (3, 3, 5), (1, 2, 2), (2, 2, 3)
    for mode in range(4):
        q = torch.randn(2, 30, 2, 16, generator=g).to(dtype)
        k = torch.randn(2, 45, 2, 16, generator=g).to(dtype)
        if mode == 1:
            k.fill_(1.0)
        elif mode == 2:
            q.zero_()
        elif mode == 3:
            k = k.reshape(2, 3, 15, 2, 16)
            k[:, 1] = k[:, 0]
            k = k.reshape(2, 45, 2, 16)
        for sp, cdf in ((0.5, None), (0.0, None), (None, 0.5), (None, 0.0), (0.75, 0.3), (None, 0.9)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sel = lk.select_blocks(q, k, grid_q=gq, grid_k=gk, chunk_q=cq, chunk_k=ck, sparsity=sp,
                                       cdf_threshold=cdf, backend=backend)
            mask, cnt = _oracle(q, k, gq, gk, cq, ck, sp, cdf)
            assert sel.indices.dtype == torch.int32 and sel.counts.dtype == torch.int32
            assert torch.equal(sel.counts.long(), cnt), (mode, sp, cdf)
            assert torch.equal(sel.to_mask(), mask), (mode, sp, cdf)
            w = sel.indices.shape[-1]
            past = torch.arange(w) >= sel.counts[..., None]
            assert (sel.indices[past] == -1).all()


@pytest.mark.parametrize("backend", ["torch", _TRITON])
def test_cdf_count_at_exact_cumulative_boundaries(backend):
    """Zero q: 4 key blocks of probability 1/4 each (cdf 0.25, 0.5, 0.75, 1 exactly): searchsorted
    right=True keeps 2 at 0.5, 1 just below, 0 at 0; tied blocks are the lowest ids."""
    backend = _backend(backend)
    g = torch.Generator().manual_seed(5502)
    q = torch.zeros(2, 8, 2, 16)
    k = torch.randn(2, 16, 2, 16, generator=g)
    for thr, n in ((0.5, 2), (0.4999, 1), (0.5001, 2), (0.0, 0), (0.25, 1), (0.2499, 0), (0.75, 3), (1.0, 4)):
        sel = lk.select_blocks(q, k, grid_q=(2, 2, 2), grid_k=(4, 2, 2), chunk_q=(1, 2, 2), sparsity=None,
                               cdf_threshold=thr, backend=backend)
        assert (sel.counts == n).all(), (thr, sel.counts.flatten().tolist())
        assert torch.equal(sel.indices[..., :n], torch.arange(n, dtype=torch.int32).expand(2, 2, 2, n))
        assert (sel.indices[..., n:] == -1).all()


@pytest.mark.parametrize("backend", ["torch", _TRITON])
@pytest.mark.parametrize("rule", [dict(sparsity=0.5), dict(sparsity=None, cdf_threshold=0.5),
                                  dict(sparsity=0.5, cdf_threshold=0.3)])
def test_nan_in_one_token_stays_in_its_row(backend, rule):
    """A NaN key token changes only its own (batch, head) selection (cdf: that row keeps every block)
    and its NaN reaches only that row's output; other batches and heads are unchanged and finite."""
    backend = _backend(backend)
    g = torch.Generator().manual_seed(5503)
    q, k = torch.randn(2, 8, 2, 16, generator=g), torch.randn(2, 16, 2, 16, generator=g)
    v = torch.randn(2, 16, 2, 16, generator=g)
    kw = dict(grid_q=(2, 2, 2), grid_k=(4, 2, 2), chunk_q=(1, 2, 2), backend=backend, **rule)
    base = lk.select_blocks(q, k, **kw).to_mask()
    k2 = k.clone()
    k2[0, 5, 1, 3] = float("nan")
    sel = lk.select_blocks(q, k2, **kw)
    assert torch.equal(sel.to_mask()[1], base[1]) and torch.equal(sel.to_mask()[0, 0], base[0, 0])
    if rule.get("cdf_threshold") is not None:
        assert (sel.counts[0, 1] == 4).all()
    out = lk.block_sparse_attn(q, k2, v, **kw)
    assert out[0, :, 1].isnan().all()
    assert out[1].isfinite().all() and out[0, :, 0].isfinite().all()


@pytest.mark.parametrize("backend", ["torch", _TRITON])
def test_fp16_extremes_pool_without_overflow(backend):
    """fp16 tokens near 65504: the block mean is summed in fp32 (an fp16 sum would overflow to inf) and
    the fp32 scores stay finite; a selection equal to the oracle's."""
    backend = _backend(backend)
    g = torch.Generator().manual_seed(5504)
    q = (torch.rand(1, 30, 1, 16, generator=g) * 2000 + 63000).half()
    k = (torch.randn(1, 30, 1, 16, generator=g) * 60000).clamp(-65000, 65000).half()
    sel = lk.select_blocks(q, k, grid_q=(2, 3, 5), chunk_q=(1, 2, 3), sparsity=0.5, backend=backend)
    mask, cnt = _oracle(q, k, (2, 3, 5), (2, 3, 5), (1, 2, 3), (1, 2, 3), 0.5, None)
    assert torch.equal(sel.to_mask(), mask) and torch.equal(sel.counts.long(), cnt)


@pytest.mark.parametrize("backend", ["torch", _TRITON])
def test_signed_zero_and_nonfinite_scores_rank_as_the_stable_sort(backend):
    """-0.0 ties +0.0 (lower id wins), every NaN ranks first and ties, -inf last: the Triton top-k kernels
    (pruned and bisection plans) keep the same blocks as the torch gating's stable descending sort."""
    backend = _backend(backend)
    from longcat_kernels.ops.block_sparse_attn.selection import select_rows
    from longcat_kernels.ops.block_sparse_attn.triton import selection_from_scores

    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(5505)
    rows = [torch.tensor([0.0, -0.0, 0.0, -0.0, -1.0, 0.0, -0.0, 0.0]),
            torch.tensor([1.0, nan, inf, -nan, -inf, 2.0, inf, nan]),
            torch.full((8,), -inf)]
    short = torch.stack(rows).view(1, 1, 3, 8)
    long_ = torch.randint(-1, 2, (1, 1, 3, 200), generator=g).float()
    long_[0, 0, 1, ::3] = -0.0
    long_[0, 0, 2, 5] = nan
    for scores in (short, long_):
        nk = scores.shape[-1]
        for sp in (0.0, 0.5, 0.75, 0.95):
            n = int((1 - sp) * nk)
            if backend == "triton":
                idx, cnt = selection_from_scores(scores, 16, sp, None)
            else:
                idx, cnt = select_rows(scores.view(1, 3, nk), 16, sp, None, max(1, n))
            want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n]
            assert (cnt == n).all()
            got = idx.view(3, -1)[:, :n]
            assert (idx.view(3, -1)[:, n:] == -1).all()  # n = 0: one -1 slot
            assert torch.equal(got.sort(-1).values, want.view(3, n).sort(-1).values.int())


def test_cache_gating_equals_gating_over_the_concatenated_keys():
    """attn_with_kv_cache's two-segment gating (fp32 block sums of cache and fresh keys added, no
    concatenation) selects what select_blocks selects over [cache; fresh], with key blocks straddling the
    cache boundary (3 cache frames, chunk_k t=2), a batch-1 cache, zero q (every score tied) and fp16."""
    from longcat_kernels.ops.kv_cache_attn.triton import gate_two_segments

    g = torch.Generator().manual_seed(5506)
    for t in range(12):
        dt = (torch.float32, torch.float16)[t % 2]
        q = torch.randn(2, 30, 2, 16, generator=g).to(dt)
        k = torch.randn(2, 30, 2, 16, generator=g).to(dt)
        kc = torch.randn(1, 45, 2, 16, generator=g).to(dt)
        if t % 3 == 0:
            q.zero_()
        k_all = torch.cat([kc.expand(2, -1, -1, -1), k], 1)
        for sp, cdf in ((0.5, None), (None, 0.6), (0.3, 0.5)):
            want = lk.select_blocks(q, k_all, grid_q=(2, 3, 5), grid_k=(5, 3, 5), chunk_q=(2, 2, 2),
                                    chunk_k=(2, 2, 3), sparsity=sp, cdf_threshold=cdf, backend="torch")
            got = gate_two_segments(q, k, kc, (2, 3, 5), (5, 3, 5), (2, 2, 2), (2, 2, 3), sp, cdf, impl="torch")
            assert torch.equal(got.counts, want.counts) and torch.equal(got.to_mask(), want.to_mask())


@pytest.mark.parametrize("backend", ["torch", _TRITON])
def test_padded_head_dim_strided_inputs_and_empty_cdf_selection(backend):
    """head_dim 24 (zero-padded to 32 in Triton; the cdf softmax still divides by sqrt(24)) on
    transposed [B, H, S, D] inputs: the oracle's selection. cdf_threshold=0 keeps nothing: output exactly
    0 and lse -inf, never NaN."""
    backend = _backend(backend)
    g = torch.Generator().manual_seed(5507)
    q = torch.randn(2, 2, 30, 24, generator=g).transpose(1, 2)
    k = torch.randn(2, 2, 30, 24, generator=g).transpose(1, 2)
    v = torch.randn(2, 2, 30, 24, generator=g).transpose(1, 2)
    for sp, cdf in ((0.5, None), (None, 0.7), (0.25, 0.4)):
        sel = lk.select_blocks(q, k, grid_q=(2, 3, 5), chunk_q=(1, 2, 2), sparsity=sp, cdf_threshold=cdf,
                               backend=backend)
        mask, cnt = _oracle(q, k, (2, 3, 5), (2, 3, 5), (1, 2, 2), (1, 2, 2), sp, cdf)
        assert torch.equal(sel.to_mask(), mask) and torch.equal(sel.counts.long(), cnt)
    out, lse = lk.block_sparse_attn(q, k, v, grid_q=(2, 3, 5), chunk_q=(1, 2, 2), sparsity=None,
                                    cdf_threshold=0.0, backend=backend, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
