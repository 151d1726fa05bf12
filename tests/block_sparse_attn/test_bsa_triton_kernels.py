"""Triton block-sparse attention: parity with the fp64 oracle (forward, lse, gradients), gating,
empty selections, strides, registration (opcheck) and torch.compile.

On CPU the kernels run in the Triton interpreter (fp32/fp16, tiny grids); ``triton_gpu`` tests
run the compiled kernels (bf16 included) on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from longcat_kernels.testing import (
    assert_close,
    attention_lowp,
    attention_oracle,
    bsa_token_mask,
    pooled_oracle,
    token_block_ids,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.triton_interpret if DEV == "cpu" else pytest.mark.triton_gpu


def _T():
    from longcat_kernels.ops.block_sparse_attn import triton as T

    return T


def _sel_cls():
    from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection

    return BlockSelection


def _nblocks(grid, chunk):
    return int(token_block_ids(grid, chunk).max()) + 1


def random_selection(B, H, grid_q, grid_k, chunk_q, chunk_k, max_sel, device=DEV, empty_rows=True):
    """Random unique key blocks per (b, h, q block), random counts (some 0), -1 padding."""
    nq, nk = _nblocks(grid_q, chunk_q), _nblocks(grid_k, chunk_k)
    max_sel = min(max_sel, nk)
    order = torch.argsort(torch.rand(B, H, nq, nk), dim=-1)[..., :max_sel].to(torch.int32)
    counts = torch.randint(1, max_sel + 1, (B, H, nq), dtype=torch.int32)
    if empty_rows:
        counts[..., 0] = 0
    counts[..., -1] = max_sel
    slot = torch.arange(max_sel)
    idx = torch.where(slot < counts[..., None], order, -1).to(torch.int32)
    return _sel_cls()(idx.to(device), counts.to(device), tuple(grid_q), tuple(grid_k), tuple(chunk_q), tuple(chunk_k))


def make_inputs(B, Sq, Sk, H, D, dtype, layout):
    if layout == "fused":
        # BSHD views of one fused QKV projection output (q and kv with different seq when Tq != Tk)
        qb = torch.randn(B, Sq, 3, H, D, device=DEV).to(dtype)
        kvb = torch.randn(B, Sk, 2, H, D, device=DEV).to(dtype)
        return qb[:, :, 0], kvb[:, :, 0], kvb[:, :, 1]
    if layout == "bhsd":
        return tuple(torch.randn(B, H, s, D, device=DEV).to(dtype).transpose(1, 2) for s in (Sq, Sk, Sk))
    return tuple(torch.randn(B, s, H, D, device=DEV).to(dtype) for s in (Sq, Sk, Sk))


def oracle(q, k, v, sel, scale):
    mask = bsa_token_mask(sel.to_mask().cpu(), sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    o, lse = attention_oracle(q.cpu(), k.cpu(), v.cpu(), mask, scale)
    return o, lse, mask


CASES = [
    # grid_q, grid_k, chunk_q, chunk_k
    ((4, 8, 8), (4, 8, 8), (2, 4, 2), (2, 4, 2)),  # divisible, 16-token blocks
    ((3, 5, 6), (3, 5, 6), (2, 2, 4), (2, 2, 4)),  # partial edge blocks on every axis
    ((3, 5, 6), (5, 5, 6), (2, 2, 4), (4, 2, 2)),  # Tq != Tk, different chunks
    ((2, 6, 13), (3, 6, 13), (1, 4, 4), (2, 4, 4)),  # 480p-like W, padded 16/32-token blocks
    ((3, 4, 5), (3, 4, 5), (3, 2, 3), (3, 2, 3)),  # 18-token blocks: padded to a 32-row tile
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "bshd"), (torch.float16, "fused")])
def test_forward_matches_oracle(case, dtype, layout):
    T = _T()
    gq, gk, cq, ck = CASES[case]
    B, H, D = 1, 2, 16
    Sq, Sk = gq[0] * gq[1] * gq[2], gk[0] * gk[1] * gk[2]
    q, k, v = make_inputs(B, Sq, Sk, H, D, dtype, layout)
    sel = random_selection(B, H, gq, gk, cq, ck, max_sel=4)
    scale = D ** -0.5
    out, lse = T.block_sparse_attn_fwd_triton(q, k, v, sel, scale)
    ro, rl, mask = oracle(q, k, v, sel, scale)
    base = attention_lowp(q.cpu(), k.cpu(), v.cpu(), mask, scale) if dtype != torch.float32 else None
    assert out.dtype == dtype and out.shape == (B, Sq, H, D) and out.is_contiguous()
    assert_close(out.cpu(), ro, base, name="out")
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    assert_close(lse.cpu(), rl, floor=1e-5 if dtype == torch.float32 else 1e-3, name="lse")
    # the first query block of every head selects nothing: zeros and -inf, never NaN
    first = (token_block_ids(gq, cq) == 0).nonzero().flatten()
    assert (out[:, first.to(out.device)] == 0).all()
    assert torch.isneginf(lse[:, :, first.to(lse.device)]).all()


@pytest.mark.parametrize("case", [1, 2, 4])
@pytest.mark.parametrize("bpi,transposed", [(1, False), (2, True)])
def test_backward_matches_oracle_fp32(case, bpi, transposed, monkeypatch):
    T = _T()
    if DEV == "cpu":
        monkeypatch.setitem(T._INTERPRET_CONFIG, "fwd", (bpi, 4, 1))
        monkeypatch.setitem(T._INTERPRET_CONFIG, "dq", (bpi, 4, 1))
        monkeypatch.setitem(T._INTERPRET_CONFIG, "dkdv", (4, 1, 16, transposed))
    gq, gk, cq, ck = CASES[case]
    B, H, D = 2, 2, 16
    Sq, Sk = gq[0] * gq[1] * gq[2], gk[0] * gk[1] * gk[2]
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(B, Sq, Sk, H, D, torch.float32, "bhsd"))
    sel = random_selection(B, H, gq, gk, cq, ck, max_sel=3)
    scale = 0.3
    out = T.block_sparse_attn_triton(q, k, v, sel, scale)
    go = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ro, _, _ = oracle(qd, kd, vd, sel, scale)
    rq, rk, rv = torch.autograd.grad(ro, (qd, kd, vd), go.cpu().double())
    assert_close(out.detach().cpu(), ro.detach(), name="out")
    assert_close(dq.cpu(), rq, name="dq")
    assert_close(dk.cpu(), rk, name="dk")
    assert_close(dv.cpu(), rv, name="dv")


def test_backward_fp16_against_lowp_baseline():
    T = _T()
    gq, gk, cq, ck = CASES[2]
    B, H, D = 1, 2, 32
    Sq, Sk = gq[0] * gq[1] * gq[2], gk[0] * gk[1] * gk[2]
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(B, Sq, Sk, H, D, torch.float16, "fused"))
    sel = random_selection(B, H, gq, gk, cq, ck, max_sel=4)
    scale = D ** -0.5
    out = T.block_sparse_attn_triton(q, k, v, sel, scale)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    mask = bsa_token_mask(sel.to_mask().cpu(), gq, gk, cq, ck)
    ref_in = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ro, _ = attention_oracle(*ref_in, mask, scale)
    ref = torch.autograd.grad(ro, ref_in, go.cpu().double())
    low_in = [x.detach().cpu().requires_grad_() for x in (q, k, v)]
    lo = attention_lowp(*low_in, mask, scale)
    low = torch.autograd.grad(lo, low_in, go.cpu())
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref, low):
        assert g.dtype == torch.float16
        assert_close(g.cpu(), r, b, factor=3.0, name=name)


def test_deterministic_mode_bitwise(monkeypatch):
    T = _T()
    monkeypatch.setenv("LONGCAT_KERNELS_DETERMINISTIC", "1")
    gq, gk, cq, ck = CASES[1]
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(1, 90, 90, 2, 16, torch.float32, "bshd"))
    sel = random_selection(1, 2, gq, gk, cq, ck, max_sel=4)
    go = torch.randn(1, 90, 2, 16, device=DEV)
    g1 = torch.autograd.grad(T.block_sparse_attn_triton(q, k, v, sel, 0.25), (q, k, v), go)
    g2 = torch.autograd.grad(T.block_sparse_attn_triton(q, k, v, sel, 0.25), (q, k, v), go)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_transpose_selection():
    T = _T()
    gq, gk, cq, ck = CASES[2]
    sel = random_selection(2, 3, gq, gk, cq, ck, max_sel=4)
    nk = _nblocks(gk, ck)
    off, qb = T.transpose_selection(sel.indices, sel.counts, nk)
    mask = sel.to_mask().cpu()  # [B,H,Nq,Nk]
    B, H, nq, _ = mask.shape
    off, qb = off.cpu(), qb.cpu()
    for b in range(B):
        for h in range(H):
            for kb in range(nk):
                p = (b * H + h) * nk + kb
                got = qb[off[p]:off[p + 1]].tolist()
                assert got == mask[b, h, :, kb].nonzero().flatten().tolist()
    assert int(off[-1]) == int(sel.counts.sum())


# ------------------------------------------------------------------------------------ gating
@pytest.mark.parametrize("grid,chunk", [((4, 8, 8), (2, 4, 2)), ((3, 5, 6), (2, 2, 4)), ((2, 6, 13), (1, 4, 4))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scores_tile", [(64, 64, 4), (32, 64, 4)])
def test_pool_scores_match_oracle(grid, chunk, dtype, scores_tile, monkeypatch):
    monkeypatch.setitem(_T()._GATING_CONFIG, "scores", scores_tile)
    S = grid[0] * grid[1] * grid[2]
    q, k, _ = make_inputs(2, S, S, 3, 16, dtype, "fused")
    pq, pk, sc = torch.ops.longcat_kernels.bsa_pool_scores(q, k, list(grid), list(grid), list(chunk), list(chunk))
    rq, rk = pooled_oracle(q.cpu(), grid, chunk), pooled_oracle(k.cpu(), grid, chunk)
    assert pq.dtype == dtype
    # fp32 sums in a different order may round to a neighbouring value in the input dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert (pq.cpu().float() - rq.float()).abs().max() <= tol
    assert (pk.cpu().float() - rk.float()).abs().max() <= tol
    rs = pq.cpu().double() @ pk.cpu().double().transpose(-1, -2)
    assert sc.dtype == torch.float32
    assert_close(sc.cpu(), rs, floor=1e-6, name="scores")


def _topk_ref(s, n):
    """n highest of each row, ties to the lower index (stable descending sort), ascending."""
    return torch.sort(s.cpu(), dim=-1, descending=True, stable=True).indices[..., :n].sort(-1).values


def _hard_rows(rows, nk, device=DEV):
    """Rows of fp32 scores that stress the exact top-k: random, many exact ties, +-0.0, a large
    common offset, all equal, few distinct values, a tied block at the top."""
    s = torch.randn(rows, nk, device=device)
    s[1] = torch.randint(-3, 3, (nk,), device=device).float()  # few distinct values
    s[2] = (s[2] * 4).round() / 4  # many exact ties
    s[3] = 0.0
    s[3, ::3] = -0.0  # -0.0 == +0.0: all equal
    s[4] = 1000.0 + 1e-3 * torch.randn(nk, device=device)  # offset >> spread
    s[5, : nk // 3] = s[5].max() + 1.0  # a tied block at the top
    s[6] = torch.where(torch.rand(nk, device=device) < 0.5, 0.0, -0.0)
    return s


@pytest.mark.parametrize("nk,n", [(37, 5), (130, 17), (64, 64), (50, 1), (300, 20), (331, 37), (131, 131)])
def test_topk_kernel_ties_to_lower_index(nk, n):
    T = _T()
    s = _hard_rows(8, nk).reshape(2, 4, nk)
    idx = T.bsa_topk(s, n)
    assert idx.dtype == torch.int32 and idx.shape == (2, 4, n)
    assert torch.equal(idx.cpu().long(), _topk_ref(s, n))


def test_topk_plan():
    T = _T()
    # LongCat 24x44x80 latents, 4x4x4 blocks: 1,320 key blocks at 0.9375 / 0.875
    assert T._topk_plan(1320, 82) == (256, 256)
    assert T._topk_plan(1320, 165) == (512, 512)
    # n too large a share of the row: whole-row bisection
    assert T._topk_plan(1320, 1320) is None and T._topk_plan(1320, 400) is None and T._topk_plan(50, 1) is None
    assert T._topk_plan(64, 1) == (32, 32)


@pytest.mark.parametrize("path", ["candidates", "whole_row"])
@pytest.mark.parametrize("nk,n", [(300, 40), (257, 33), (1000, 1000 // 16)])
def test_topk_candidate_kernel_both_paths(path, nk, n):
    """bsa_topk_kernel with the candidate list (CAP >= Nk: every row fits) and with the whole-row
    fallback (CAP = 32 < n <= candidates: no row fits), against a stable sort."""
    from longcat_kernels.ops.block_sparse_attn import _triton_kernels as K

    if path == "whole_row" and n <= 32:
        pytest.skip("needs n > CAP")
    g = max(32, 1 << (3 * n - 1).bit_length())
    g = min(g, 1 << ((nk - 1).bit_length() - 1))  # G < Nk
    cap = 1 << (nk - 1).bit_length() if path == "candidates" else 32
    s = _hard_rows(7, nk)
    idx = torch.full((7, n), -1, dtype=torch.int32, device=DEV)
    scratch = torch.full((7, cap), -7, dtype=torch.int16, device=DEV)
    K.bsa_topk_kernel[(7,)](s, idx, scratch, nk, n, G=g, CAP=cap, VEC=4 if nk % 4 == 0 else 1, LANES=32,
                            num_warps=1)
    assert torch.equal(idx.cpu().long(), _topk_ref(s, n))


def test_topk_validation():
    T = _T()
    s = torch.randn(2, 40, device=DEV)
    with pytest.raises(TypeError, match="float32"):
        T.bsa_topk(s.half(), 3)
    with pytest.raises(ValueError, match="n=0"):
        T.bsa_topk(s, 0)
    with pytest.raises(ValueError, match="n=41"):
        T.bsa_topk(s, 41)


def test_api_dispatch_triton():
    from longcat_kernels import block_sparse_attn

    grid = (3, 5, 6)
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(1, 90, 90, 2, 16, torch.float32, "bshd"))
    out = block_sparse_attn(q, k, v, grid_q=grid, chunk_q=(2, 2, 4), sparsity=0.5, backend="triton")
    ref = block_sparse_attn(q, k, v, grid_q=grid, chunk_q=(2, 2, 4), sparsity=0.5, backend="torch")
    assert_close(out.detach().cpu(), ref.detach().cpu().double(), name="out")
    out.sum().backward()
    assert q.grad is not None and not torch.isnan(q.grad).any()


# ------------------------------------------------------------------------------ registration
def _op_args(dtype=torch.float32, permuted=False):
    gq, gk, cq, ck = CASES[2]
    q, k, v = make_inputs(1, 90, 150, 2, 16, dtype, "bhsd" if permuted else "bshd")
    sel = random_selection(1, 2, gq, gk, cq, ck, max_sel=3)
    return q, k, v, sel, [list(gq), list(gk), list(cq), list(ck)]


@pytest.mark.parametrize("permuted", [False, True])
def test_opcheck_fwd(permuted):
    q, k, v, sel, geo = _op_args(permuted=permuted)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.longcat_kernels.bsa_fwd.default,
                          (q, k, v, sel.indices, sel.counts, *geo, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_bwd_and_gating():
    q, k, v, sel, geo = _op_args()
    T = _T()
    out, lse = T.bsa_forward_triton(q, k, v, sel, 0.25)
    do = torch.randn_like(out)
    torch.library.opcheck(torch.ops.longcat_kernels.bsa_bwd.default,
                          (do, q, k, v, out, lse, sel.indices, sel.counts, *geo, 0.25, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.longcat_kernels.bsa_pool_scores.default,
                          (q, k, geo[0], geo[1], geo[2], geo[3]), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.triton_gpu
def test_compile_fullgraph_gpu():
    from longcat_kernels import block_sparse_attn

    grid = (4, 8, 12)
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(1, 384, 384, 4, 64, torch.bfloat16, "fused"))

    def f(q, k, v):
        return block_sparse_attn(q, k, v, grid_q=grid, sparsity=0.5, backend="triton") * 2

    cf = torch.compile(f, fullgraph=True)
    o1 = cf(q, k, v)
    g1 = torch.autograd.grad(o1.float().sum(), (q, k, v))
    o2 = f(q, k, v)
    g2 = torch.autograd.grad(o2.float().sum(), (q, k, v))
    assert_close(o1, o2.double(), name="compiled out")
    for a, b in zip(g1, g2):
        assert_close(a, b.double(), name="compiled grad")


@pytest.mark.triton_gpu
@pytest.mark.parametrize("grid,chunk", [((8, 12, 16), (4, 4, 4)), ((8, 10, 13), (4, 4, 8))])
def test_bf16_gpu_parity(grid, chunk):
    T = _T()
    S = grid[0] * grid[1] * grid[2]
    H, D = 4, 128
    q, k, v = (x.detach().requires_grad_() for x in make_inputs(1, S, S, H, D, torch.bfloat16, "fused"))
    sel = random_selection(1, H, grid, grid, chunk, chunk, max_sel=5)
    out = T.block_sparse_attn_triton(q, k, v, sel, D ** -0.5)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    mask = bsa_token_mask(sel.to_mask().cpu(), grid, grid, chunk, chunk).to(DEV)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, _ = attention_oracle(*ref_in, mask, D ** -0.5)
    ref = torch.autograd.grad(ro, ref_in, go.double())
    low_in = [x.detach().requires_grad_() for x in (q, k, v)]
    lo = attention_lowp(*low_in, mask, D ** -0.5)
    low = torch.autograd.grad(lo, low_in, go)
    assert_close(out, ro, lo, name="out")
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref, low):
        assert_close(g, r, b, factor=3.0, name=name)


def test_no_recompile_across_lengths():
    """Sequence-dependent integers are not specialised: a new grid reuses the compiled kernel."""
    if DEV == "cpu":
        pytest.skip("compilation cache only exists for compiled kernels")
    T = _T()
    from longcat_kernels.ops.block_sparse_attn import _triton_kernels as K

    def n_compiled():
        return sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in K.bsa_fwd_kernel.device_caches.values())

    for i, grid in enumerate([(4, 8, 8), (8, 8, 12), (12, 16, 20)]):
        S = grid[0] * grid[1] * grid[2]
        q, k, v = make_inputs(1, S, S, 2, 64, torch.bfloat16, "bshd")
        sel = random_selection(1, 2, grid, grid, (4, 4, 4), (4, 4, 4), max_sel=2)
        T.bsa_forward_triton(q, k, v, sel, 0.125)
        if i == 0:
            n0 = n_compiled()
    assert n_compiled() == n0

