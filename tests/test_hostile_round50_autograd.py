"""Hostile autograd / torch.func usage of the functional ops (round 50): each ``*_fix`` test fails on the
code before its fix; the others pin verified behaviour.

- ``torch.func.jvp`` (and forward-mode AD) over the Triton ops (``block_sparse_attn``, ``prefix_attn``,
  ``qk_norm_rope``) returned a zero tangent, silently: torch.library ops have no forward-mode rule.
- ``torch.func.grad`` / ``jacrev`` over ``block_sparse_attn(backend='triton')`` raised functorch's
  unrelated "autograd.Function ... must override setup_context".
- ``attn_with_kv_cache`` / ``flash_attn_with_kvcache`` (forward only) inside ``vmap`` inside ``grad`` gave
  a zero gradient, silently (``requires_grad`` reads False there), and under ``jvp`` no error.
- ``block_sparse_attn(backend='triton')`` with k/v made under ``torch.inference_mode`` beside a q that
  requires grad raised "Inference tensors cannot be saved for backward" (the torch backend takes them).
"""

import pytest
import torch
from helpers import CPU_BACKENDS

import longcat_kernels as lk
from longcat_kernels.testing.oracle import bsa_token_mask

TRITON = pytest.param("triton", marks=pytest.mark.triton_interpret)
GQ, GK, CQ, CK = (2, 2, 3), (2, 2, 3), (1, 2, 2), (2, 1, 2)  # partial edge blocks, chunk_q != chunk_k
B, H, D = 1, 2, 16
SQ, SK = 12, 12


def _sel(q, k):
    return lk.select_blocks(q.detach().float(), k.detach().float(), grid_q=GQ, grid_k=GK, chunk_q=CQ, chunk_k=CK,
                            sparsity=0.5, backend="torch")


def _qkv(dtype=torch.float32):
    return (torch.randn(B, SQ, H, D, dtype=dtype), torch.randn(B, SK, H, D, dtype=dtype),
            torch.randn(B, SK, H, D, dtype=dtype))


def _dense(q, k, v, mask, scale=D ** -0.5):
    """fp64 masked attention, 0 for a query with no key."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double())


def _mask(sel):
    return bsa_token_mask(sel.to_mask(), GQ, GK, CQ, CK)


def _close(a, b, tol=2e-4):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def _ref_grads(q, k, v, mask, g):
    qs, ks, vs = (x.detach().double().requires_grad_() for x in (q, k, v))
    _dense(qs, ks, vs, mask).backward(g.double())
    return qs.grad, ks.grad, vs.grad


# ------------------------------------------------------------------------------------ fixes
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bsa_jvp_triton_raises_torch_matches_fix(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    q, k, v = _qkv()
    sel = _sel(q, k)
    t = torch.randn_like(q)
    f = lambda q: lk.block_sparse_attn(q, k, v, selection=sel, backend=backend)  # noqa: E731
    if backend == "triton":
        from longcat_kernels.dispatch import triton_interpret

        if not triton_interpret():
            pytest.skip("needs TRITON_INTERPRET=1")
        with pytest.raises(lk.BackendUnavailableError, match="backend='torch'"):
            torch.func.jvp(f, (q,), (t,))
        return
    _, tan = torch.func.jvp(f, (q,), (t,))
    _, want = torch.func.jvp(lambda q: _dense(q, k, v, _mask(sel)), (q.double(),), (t.double(),))
    _close(tan, want)


@pytest.mark.triton_interpret
def test_bsa_triton_func_grad_raises_clearly_fix():
    q, k, v = _qkv()
    sel = _sel(q, k)
    for tr in (torch.func.grad, torch.func.jacrev):
        with pytest.raises(lk.BackendUnavailableError, match="torch.func.*backend='torch'"):
            tr(lambda q: lk.block_sparse_attn(q, k, v, selection=sel, backend="triton").sum())(q)


@pytest.mark.triton_interpret
def test_bsa_triton_forward_ad_raises_fix():
    import torch.autograd.forward_ad as fwAD

    q, k, v = _qkv()
    sel = _sel(q, k)
    with fwAD.dual_level():
        qd = fwAD.make_dual(q, torch.randn_like(q))
        with pytest.raises(lk.BackendUnavailableError, match="forward-mode AD"):
            lk.block_sparse_attn(qd, k, v, selection=sel, backend="triton")


@pytest.mark.triton_interpret
def test_prefix_and_norm_rope_triton_jvp_raise_fix():
    q, k, v = torch.randn(3, 1, 12, 2, 16).unbind(0)
    t = torch.randn_like(q)
    with pytest.raises(lk.BackendUnavailableError, match="backend='torch'"):
        torch.func.jvp(lambda q: lk.prefix_attn(q, k, v, 4, backend="triton"), (q,), (t,))
    w = torch.randn(16)
    rope = lk.Rope3D((3, 2, 2), 16)
    with pytest.raises(lk.BackendUnavailableError, match="backend='torch'"):
        torch.func.jvp(lambda q: lk.qk_norm_rope(q, k, w, w, rope, backend="triton")[0], (q,), (t,))
    # the torch backend differentiates forward-mode: the same tangent as a finite difference
    f = lambda q: lk.qk_norm_rope(q, k.double(), w.double(), w.double(), rope, backend="torch")[0]  # noqa: E731
    _, tan = torch.func.jvp(f, (q.double(),), (t.double(),))
    eps = 1e-6
    fd = (f(q.double() + eps * t.double()) - f(q.double() - eps * t.double())) / (2 * eps)
    _close(tan, fd, 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_forward_only_inside_vmap_grad_raises_fix(backend):
    q, k, v = torch.randn(3, 2, 1, 8, 2, 16).unbind(0)  # a vmapped dim of 2
    kc, vc = torch.randn(2, 1, 8, 2, 16).unbind(0)
    with pytest.raises(ValueError, match="q: attn_with_kv_cache is forward-only"):
        torch.func.grad(lambda q: torch.func.vmap(
            lambda q: lk.attn_with_kv_cache(q, k[0], v[0], kc, vc, backend=backend))(q).sum())(q)
    with pytest.raises(ValueError, match="q: flash_attn_with_kvcache is forward-only"):
        torch.func.grad(lambda q: torch.func.vmap(
            lambda q: lk.flash_attn_with_kvcache(q, kc, vc, backend=backend))(q).sum())(q)
    with pytest.raises(ValueError, match="v: attn_with_kv_cache is forward-only"):
        torch.func.jvp(lambda v: lk.attn_with_kv_cache(q[0], k[0], v, backend=backend), (v[0],), (v[0],))
    # vmap alone is no differentiation: it runs, and matches per-sample calls
    out = torch.func.vmap(lambda q: lk.attn_with_kv_cache(q, k[0], v[0], kc, vc, backend=backend))(q)
    for i in range(2):
        _close(out[i], lk.attn_with_kv_cache(q[i], k[0], v[0], kc, vc, backend=backend), 1e-5)


@pytest.mark.triton_interpret
def test_bsa_triton_inference_kv_beside_trained_q_fix():
    q, k, v = _qkv()
    with torch.inference_mode():
        ki, vi = k.clone(), v.clone()
    sel = _sel(q, k)
    g = torch.randn(B, SQ, H, D)
    qt = q.clone().requires_grad_()
    lk.block_sparse_attn(qt, ki, vi, selection=sel, backend="triton").backward(g)
    gq, _, _ = _ref_grads(q, k, v, _mask(sel), g)
    _close(qt.grad, gq)


# ------------------------------------------------------------------------------------ pinned behaviour
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("which", [(False, True, False), (True, False, False), (False, False, True)])
@pytest.mark.parametrize("grad_kind", ["expanded", "offset", "transposed"])
def test_bsa_partial_requires_grad_odd_grad_outputs(backend, which, grad_kind):
    q, k, v = _qkv()
    sel = _sel(q, k)
    ins = [x.clone().requires_grad_(r) for x, r in zip((q, k, v), which)]
    out = lk.block_sparse_attn(*ins, selection=sel, backend=backend)
    if grad_kind == "expanded":
        g = torch.randn(1, 1, 1, D).expand_as(out)
    elif grad_kind == "offset":
        g = torch.randn(out.numel() + 5)[5:].view_as(out)
    else:
        g = torch.randn(B, SQ, D, H).transpose(2, 3)
    out.backward(g)
    want = _ref_grads(q, k, v, _mask(sel), g)
    for x, r, w in zip(ins, which, want):
        if r:
            _close(x.grad, w)
        else:
            assert x.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_retain_graph_twice_and_aliased_inputs(backend):
    x = torch.randn(B, SQ, H, D)
    sel = lk.select_blocks(x, x, grid_q=GQ, grid_k=GQ, chunk_q=CQ, chunk_k=CQ, sparsity=0.5, backend="torch")
    xt = x.clone().requires_grad_()
    out = lk.block_sparse_attn(xt, xt, xt, selection=sel, backend=backend)  # q is k is v
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    first = xt.grad.clone()
    out.backward(g)
    xs = x.double().requires_grad_()
    _dense(xs, xs, xs, bsa_token_mask(sel.to_mask(), GQ, GQ, CQ, CQ)).backward(g.double())
    _close(first, xs.grad)
    _close(xt.grad, 2 * xs.grad)


@pytest.mark.triton_interpret
def test_bsa_triton_double_backward_raises_not_zero():
    q, k, v = _qkv()
    sel = _sel(q, k)
    qt = q.clone().requires_grad_()
    out = lk.block_sparse_attn(qt, k, v, selection=sel, backend="triton")
    (gq,) = torch.autograd.grad(out.pow(2).sum(), qt, create_graph=True)
    with pytest.raises(RuntimeError, match="bsa_bwd"):
        gq.sum().backward()


def test_bsa_torch_gradcheck_gradgradcheck_fp64_and_func_transforms():
    q, k, v = _qkv(torch.float64)
    sel = _sel(q, k)
    f = lambda q, k, v: lk.block_sparse_attn(q, k, v, selection=sel, backend="torch")  # noqa: E731
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)
    mask = _mask(sel)
    g = torch.func.grad(lambda k: f(q, k, v).pow(2).sum())(k)
    want = torch.func.grad(lambda k: _dense(q, k, v, mask).pow(2).sum())(k)
    _close(g, want, 1e-10)
    jac = torch.func.jacrev(lambda v: f(q, k, v))(v)
    _close(jac, torch.func.jacrev(lambda v: _dense(q, k, v, mask))(v), 1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_vmap_matches_per_sample(backend):
    q, k, v = _qkv()
    sel = _sel(q, k)
    qs = torch.stack([q, -2 * q])
    out = torch.func.vmap(lambda q: lk.block_sparse_attn(q, k, v, selection=sel, backend=backend))(qs)
    for i in range(2):
        _close(out[i], _dense(qs[i], k, v, _mask(sel)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_inference_mode_output_is_inference(backend):
    q, k, v = _qkv()
    sel = _sel(q, k)
    with torch.inference_mode():
        out = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend)
    assert out.is_inference()
    _close(out, _dense(q, k, v, _mask(sel)))
