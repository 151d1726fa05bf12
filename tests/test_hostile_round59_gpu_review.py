"""Hostile round 59: a static review of the GPU-only code changed since 347a6d9, with CPU tests of the
host-side logic it touched. The gating (``select_blocks``) detaches q and k, so a ``torch.func`` transform or
forward-mode AD over q is no reason to refuse its Triton kernels: explicit ``backend="triton"`` gating raised
under ``torch.func.grad`` / a dual q, and ``"auto"`` on CUDA fell back to the torch gating."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import longcat_kernels as lk
from longcat_kernels.dispatch import record_choices

pytestmark = pytest.mark.triton_interpret

GRID, CHUNK = (2, 4, 4), (1, 2, 2)  # 32 tokens, 8 blocks of 4


def _qkv(dtype=torch.float32):
    return [torch.randn(1, 32, 2, 16, dtype=dtype) for _ in range(3)]


def _sel(q, k, backend):
    return lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend)


def test_triton_gating_inside_func_grad_runs_and_gives_autograds_gradient():
    q, k, v = _qkv()
    go = torch.randn_like(q)

    def f(q_):
        sel = _sel(q_, k, "triton")
        return (lk.block_sparse_attn(q_, k, v, selection=sel, backend="torch") * go).sum()

    with record_choices() as got:
        g = torch.func.grad(f)(q)
    assert {c.impl for c in got if c.op == "select_blocks"} == {"triton"}, got
    qr = q.clone().requires_grad_(True)
    (lk.block_sparse_attn(qr, k, v, selection=_sel(q, k, "triton"), backend="torch") * go).sum().backward()
    assert not g.isnan().any()
    torch.testing.assert_close(g, qr.grad, rtol=1e-5, atol=1e-6)


def test_triton_gating_of_a_dual_query_equals_the_plain_one():
    q, k, _ = _qkv()
    with fwAD.dual_level():
        sel = _sel(fwAD.make_dual(q, torch.randn_like(q)), k, "triton")
    ref = _sel(q, k, "triton")
    assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.counts, ref.counts)
    # the same blocks as the torch gating (in any order within a row)
    assert torch.equal(ref.indices.sort(-1).values, _sel(q, k, "torch").indices.sort(-1).values)


def test_triton_gating_under_grad_and_jvp_agree():
    q, k, v = _qkv()

    def f(q_):
        sel = _sel(q_, k, "triton")
        return lk.block_sparse_attn(q_, k, v, selection=sel, backend="torch").sum()

    t = torch.randn_like(q)
    _, tan = torch.func.jvp(f, (q,), (t,))
    g = torch.func.grad(f)(q)
    assert torch.isfinite(tan) and not g.isnan().any()
    torch.testing.assert_close(tan, (g * t).sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_block_sparse_attn_with_gating_backend_under_func_grad(backend):
    """The attention itself: explicit Triton is still refused (no rule for torch.func), auto takes the
    differentiable reference for it while the gating may stay on its own kernel."""
    q, k, v = _qkv()

    def f(q_):
        return lk.block_sparse_attn(q_, k, v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend).sum()

    if backend == "triton":
        with pytest.raises(lk.BackendUnavailableError, match="torch.func"):
            torch.func.grad(f)(q)
        return
    with record_choices() as got:
        g = torch.func.grad(f)(q)
    assert {c.impl for c in got if c.op == "block_sparse_attn"} == {"torch_reference"}, got
    qr = q.clone().requires_grad_(True)
    f(qr).backward()
    assert not g.isnan().any()
    torch.testing.assert_close(g, qr.grad, rtol=1e-5, atol=1e-6)
