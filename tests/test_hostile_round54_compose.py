"""Round 54: SPEC 12 composition with autograd. Partial attentions over disjoint key sets (ring
attention halves, dense text + sparse video) built from the public ops with ``return_lse=True``,
merged with the SPEC 12 formula, against one float64 attention over the union of the key sets:
outputs, lse, and dq/dk/dv through out and lse. Empty parts (-inf lse) never produce NaN."""
from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS

import longcat_kernels as lk
from longcat_kernels.testing.oracle import bsa_token_mask

GRID, CHUNK, S, NB = (2, 4, 4), (1, 2, 2), 32, 8


def _rand_selection(B, H, empty_frac):
    idx = torch.full((B, H, NB, NB), -1, dtype=torch.int32)
    cnt = torch.zeros(B, H, NB, dtype=torch.int32)
    bm = torch.zeros(B, H, NB, NB, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(NB):
                n = 0 if torch.rand(()) < empty_frac else int(torch.randint(1, NB + 1, ()))
                p = torch.randperm(NB)[:n]
                idx[b, h, i, :n] = p.int()
                cnt[b, h, i] = n
                bm[b, h, i, p] = True
    sel = lk.BlockSelection(idx, cnt, GRID, GRID, CHUNK, CHUNK)
    return sel, bsa_token_mask(bm, GRID, GRID, CHUNK, CHUNK)


def _merge(o1, l1, o2, l2):
    """SPEC 12 merge; the -inf guard keeps a row that no part attends at out 0 (exp(-inf - -inf) is NaN)."""
    lse = torch.logaddexp(l1, l2)
    ref = torch.where(torch.isinf(lse), 0.0, lse)
    w1, w2 = (torch.exp(x - ref).transpose(1, 2)[..., None] for x in (l1, l2))
    return o1.float() * w1 + o2.float() * w2, lse


def _dense64(q, k, v, mask, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def _loss(o, lse, go, gl):
    # out twice (linear and squared), lse through a non-contiguous [B, S, H] view; -inf rows masked out
    return (o * go).sum() + 0.1 * (o * o).sum() + torch.where(torch.isinf(lse), 0.0, lse).transpose(1, 2).mul(gl).sum()


def _ring(backend, dtype, empty_frac, kscale=1.0, B=1, H=2, D=16):
    q = torch.randn(B, S, H, D, dtype=torch.float64)
    k, v = torch.randn(B, 2 * S, H, D, dtype=torch.float64), torch.randn(B, 2 * S, H, D, dtype=torch.float64)
    k[:, S:] *= kscale
    s1, m1 = _rand_selection(B, H, empty_frac)
    s2, m2 = _rand_selection(B, H, empty_frac)
    qx, kx, vx = (t.to(dtype).requires_grad_() for t in (q, k, v))
    o1, l1 = lk.block_sparse_attn(qx, kx[:, :S], vx[:, :S], selection=s1, backend=backend, return_lse=True)
    o2, l2 = lk.block_sparse_attn(qx, kx[:, S:], vx[:, S:], selection=s2, backend=backend, return_lse=True)
    assert l1.dtype == l2.dtype == torch.float32
    o, lse = _merge(o1, l1, o2, l2)
    go, gl = torch.randn_like(o), torch.randn(B, S, H)
    g = torch.autograd.grad(_loss(o, lse, go, gl), (qx, kx, vx))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (qx, kx, vx))
    o_r, l_r = _dense64(qr, kr, vr, torch.cat([m1, m2], -1), D ** -0.5)
    gr = torch.autograd.grad(_loss(o_r, l_r, go.double(), gl.double()), (qr, kr, vr))
    return (o, lse, g), (o_r, l_r, gr)


def _check(got, ref, tol):
    (o, lse, g), (o_r, l_r, gr) = got, ref
    for x in (o, *g):
        assert not torch.isnan(x).any()
    assert not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(l_r)) and (lse[torch.isinf(lse)] < 0).all()
    fin = torch.isfinite(l_r)
    torch.testing.assert_close(lse.double()[fin], l_r[fin], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(o.double(), o_r, atol=tol, rtol=tol)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ring_merge_with_empty_parts_matches_dense_union_with_grads(backend):
    _check(*_ring(backend, torch.float32, 0.4), tol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ring_merge_low_precision_inputs_fp32_lse(dtype):
    _check(*_ring("torch", dtype, 0.4), tol=3e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_parts_empty_gives_zero_out_minus_inf_lse_zero_grads(backend):
    (o, lse, g), _ = _ring(backend, torch.float32, 1.0)
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.isinf(lse).all() and (lse < 0).all()
    for x in g:
        assert torch.equal(x, torch.zeros_like(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_parts_of_very_different_magnitude(backend):
    # one half's keys scaled up: lse gaps of tens, the small part's fp32 weight underflows
    got, ref = _ring(backend, torch.float32, 0.2, kscale=40.0)
    assert (got[1] - ref[1]).abs()[torch.isfinite(ref[1])].max() < 1e-3
    _check(got, ref, tol=2e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_through_lse_alone(backend):
    B, H, D = 1, 2, 16
    q, k, v = (torch.randn(B, S, H, D, requires_grad=True) for _ in range(3))
    sel, mask = _rand_selection(B, H, 0.3)
    _, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    w = torch.randn(B, S, H)
    dq, dk = torch.autograd.grad(torch.where(torch.isinf(lse), 0.0, lse).transpose(1, 2).mul(w).sum(), (q, k))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, l_r = _dense64(qr, kr, vr, mask, D ** -0.5)
    dqr, dkr = torch.autograd.grad(torch.where(torch.isinf(l_r), 0.0, l_r).transpose(1, 2).mul(w.double()).sum(), (qr, kr))
    torch.testing.assert_close(dq.double(), dqr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dk.double(), dkr, atol=1e-4, rtol=1e-4)


def test_dense_gqa_prefix_part_grads_through_lse():
    # the dense part of a joint attention from prefix_attn (prefix 0: dense), GQA k/v, torch backend
    B, H, Hk, D = 2, 4, 2, 16
    q = torch.randn(B, 12, H, D, requires_grad=True)
    k, v = (torch.randn(B, 12, Hk, D, requires_grad=True) for _ in range(2))
    o, lse = lk.prefix_attn(q, k, v, 5, backend="torch", return_lse=True)
    gl = torch.randn(B, 12, H)
    g = torch.autograd.grad((lse.transpose(1, 2) * gl).sum() + o.square().sum(), (q, k, v))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[:5, 5:] = False
    o_r, l_r = _dense64(qr, kr.repeat_interleave(2, 2), vr.repeat_interleave(2, 2), mask, D ** -0.5)
    gr = torch.autograd.grad((l_r.transpose(1, 2) * gl.double()).sum() + o_r.square().sum(), (qr, kr, vr))
    torch.testing.assert_close(lse.double(), l_r, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_compiled_merge_matches_eager():
    B, H, D = 1, 2, 16
    q = torch.randn(B, S, H, D, requires_grad=True)
    k, v = (torch.randn(B, 2 * S, H, D, requires_grad=True) for _ in range(2))
    s1, _ = _rand_selection(B, H, 0.3)
    s2, _ = _rand_selection(B, H, 0.3)

    def f(q, k, v):
        o1, l1 = lk.block_sparse_attn(q, k[:, :S], v[:, :S], selection=s1, backend="torch", return_lse=True)
        o2, l2 = lk.block_sparse_attn(q, k[:, S:], v[:, S:], selection=s2, backend="torch", return_lse=True)
        return _merge(o1, l1, o2, l2)

    o, lse = f(q, k, v)
    ge = torch.autograd.grad(o.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum(), (q, k, v))
    oc, lc = torch.compile(f, backend="aot_eager")(q, k, v)
    gc = torch.autograd.grad(oc.sum() + torch.where(torch.isinf(lc), 0.0, lc).sum(), (q, k, v))
    torch.testing.assert_close(oc, o)
    assert torch.equal(torch.isinf(lc), torch.isinf(lse))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
