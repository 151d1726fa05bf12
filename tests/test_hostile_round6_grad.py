"""Hostile gradient inputs found by the sixth audit (2026-12-08): each test fails on the code before its fix.

- A loss that uses the lse of ``block_sparse_attn(..., return_lse=True)`` (merging partial results,
  SPEC 12) lost that part of the gradient without a word on the torch and triton backends (lse came back
  detached), while ``prefix_attn``'s lse was differentiable.
- RoPE and the q/k RMSNorm of the torch path computed fp64 inputs in fp32 (``x.float()``), so fp64
  results carried fp32 rounding and ``gradcheck`` of a model using them failed.
"""

import pytest
import torch
from helpers import CPU_BACKENDS

import longcat_kernels as lk
from longcat_kernels.grid import total_blocks
from longcat_kernels.testing.oracle import bsa_token_mask

# partial edge blocks on both sides, Tq != Tk, chunk_q != chunk_k
GQ, GK, CQ, CK = (2, 3, 5), (3, 3, 5), (2, 2, 2), (1, 2, 4)


def _selection(B, H):
    """Random hand-built selection: unsorted distinct ids, some rows empty (at least one per head), junk
    past the counts."""
    Nq, Nk = total_blocks(GQ, CQ), total_blocks(GK, CK)
    idx = torch.randint(-5, 50, (B, H, Nq, Nk), dtype=torch.int32)
    cnt = torch.randint(1, Nk + 1, (B, H, Nq), dtype=torch.int32)
    cnt[torch.rand(B, H, Nq) < 0.3] = 0
    cnt[:, :, 0] = 0
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                idx[b, h, i, : cnt[b, h, i]] = torch.randperm(Nk)[: cnt[b, h, i]].int()
    return lk.BlockSelection(idx, cnt, GQ, GK, CQ, CK)


def _finite(lse):
    return torch.where(torch.isinf(lse), torch.zeros((), dtype=lse.dtype), lse)


def test_bsa_lse_gradcheck_fp64():
    B, H, D = 1, 2, 8
    sel = _selection(B, H)
    q, k, v = (torch.randn(B, n, H, D, dtype=torch.float64, requires_grad=True) for n in (30, 45, 45))

    def f(q, k, v):
        out, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend="torch", return_lse=True)
        return torch.cat([out.flatten(), _finite(lse).flatten()])  # one output: gradcheck skips undifferentiable ones

    assert torch.autograd.gradcheck(f, (q, k, v))


def _oracle(q, k, v, mask, scale):
    """float64 (out [B,Sq,H,D], lse [B,H,Sq], 0 where nothing is attended) over keys where mask holds."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    empty = ~mask.any(dim=-1, keepdim=True)
    s = torch.where(empty, torch.zeros((), dtype=s.dtype), s.masked_fill(~mask, float("-inf")))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(empty, torch.zeros((), dtype=s.dtype), torch.exp(s - lse[..., None]))
    return torch.einsum("bhqk,bkhd->bqhd", p, v), torch.where(empty[..., 0], torch.zeros((), dtype=s.dtype), lse)


@pytest.mark.parametrize("lse_only", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_gradient_through_lse_matches_fp64(backend, lse_only):
    B, H, D = 2, 2, 16
    sel = _selection(B, H)
    mask = bsa_token_mask(sel.to_mask(), GQ, GK, CQ, CK)
    base = [torch.randn(B, n, H, D, dtype=torch.float64) for n in (30, 45, 45)]
    go, gl = torch.randn(B, 30, H, D, dtype=torch.float64), torch.randn(B, H, 30, dtype=torch.float64)

    def grads(out, lse, inputs):
        loss = (_finite(lse).double() * gl).sum() + (0 if lse_only else (out.double() * go).sum())
        return torch.autograd.grad(loss, inputs, materialize_grads=True)

    x64 = [t.clone().requires_grad_() for t in base]
    want = grads(*_oracle(*x64, mask, D**-0.5), x64)
    x32 = [t.float().requires_grad_() for t in base]
    out, lse = lk.block_sparse_attn(*x32, selection=sel, backend=backend, return_lse=True)
    assert lse.requires_grad
    got = grads(out, lse, x32)
    for name, g, w in zip("qkv", got, want):
        assert not g.isnan().any(), name
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("pairs", ["interleaved", "half"])
def test_rope_and_qk_norm_keep_fp64(pairs):
    D = 14
    rope = lk.Rope3D((3, 2, 3), D, pairs=pairs)
    x = torch.randn(1, 12, 2, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lk.apply_rope_3d(x, rope, 1), (x,))
    assert torch.autograd.gradcheck(
        lambda x, w: lk.qk_norm_rope(x, x * 2, w, w, rope, 1, backend="torch"), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: lk.qk_norm_rope(x, x, w, w, backend="torch")[0], (x, w))
    # the rotation by the (fp32) tables, computed in fp64
    cos, sin = (t.double() for t in rope.tables(1, 2))
    xd = x.detach()
    if pairs == "interleaved":
        x0, x1 = xd[..., 0::2], xd[..., 1::2]
        c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
        want = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)
        torch.testing.assert_close(lk.apply_rope_3d(xd, rope, 1), want, atol=1e-13, rtol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="[cuda] bf16 gradient through lse on the GPU kernels")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bsa_gradient_through_lse_on_gpu_bf16(backend):
    # auto on Hopper with the extension: the csrc forward + Triton backward (64-token blocks, head_dim 128)
    from longcat_kernels.dispatch import choose

    grid, B, H, D = (4, 8, 8), 1, 2, 128
    x = [torch.randn(B, 256, H, D, device="cuda") for _ in range(3)]
    sel = lk.select_blocks(x[0], x[1], grid_q=grid, sparsity=0.5, backend="torch")
    mask = bsa_token_mask(sel.to_mask(), grid, grid, (4, 4, 4), (4, 4, 4)).cpu()
    go, gl = torch.randn(B, 256, H, D, dtype=torch.float64), torch.randn(B, H, 256, dtype=torch.float64)
    xb = [t.bfloat16().requires_grad_() for t in x]
    c = choose("block_sparse_attn", *xb, requested=backend, block_sparse=True, block_tokens=(64, 64))
    out, lse = lk.block_sparse_attn(*xb, selection=sel, backend=backend, return_lse=True)
    loss = (lse.double().cpu() * gl).sum() + (out.double().cpu() * go).sum()
    got = torch.autograd.grad(loss, xb)
    x64 = [t.bfloat16().double().cpu().requires_grad_() for t in x]
    o64, l64 = _oracle(*x64, mask, D**-0.5)
    want = torch.autograd.grad((l64 * gl).sum() + (o64 * go).sum(), x64)
    for name, g, w in zip("qkv", got, want):
        g = g.double().cpu()
        assert torch.isfinite(g).all(), (c.impl, name)
        assert ((g - w).norm() / w.norm()).item() < 2e-2, (c.impl, name, ((g - w).norm() / w.norm()).item())


def test_rope_takes_a_numpy_frame_offset_as_the_grid_helpers_do():
    # a numpy int frame offset (e.g. from an np.arange of segment starts) was refused with a TypeError
    import numpy as np

    rope = lk.Rope3D((3, 2, 3), 8)
    x = torch.randn(1, 12, 2, 8)
    want = lk.apply_rope_3d(x, rope, 1)
    assert torch.equal(lk.apply_rope_3d(x, rope, np.int64(1)), want)
    w = torch.ones(8)
    a = lk.qk_norm_rope(x, x, w, w, rope, np.int32(1), backend="torch")
    b = lk.qk_norm_rope(x, x, w, w, rope, 1, backend="torch")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(TypeError, match="frame_offset: expected an int, got float"):
        lk.apply_rope_3d(x, rope, 1.0)
