"""Audit round 49 (one function chooses kernels): dense attention needing gradients went straight to PyTorch
SDPA in longcat_vc's self-attention and in the diffusers processor, whatever backend the user named."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import dispatch
from longcat_vc.modules.attention import Attention, AttnPlan


def _qkv(grad=True, B=1, N=8, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_vc_dense_training_refuses_an_explicit_kernel_backend(backend):
    """attn_backend="triton"/"cuda" with gradients (training, dense self-attention) silently ran SDPA: the
    forward-only kernels the user asked for never ran and nothing said so. Now BackendUnavailableError names
    the backend and why (as the ops do for unsupported combinations)."""
    q, k, v = _qkv()
    plan = AttnPlan(mode="full", grid=(2, 2, 2), rope=None, backend=backend)
    with pytest.raises(lk.BackendUnavailableError, match=f"backend '{backend}' unavailable"):
        Attention._attend(q, k, v, plan, 0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_vc_dense_training_torch_and_auto_run_sdpa_with_gradients(backend):
    """Guard: "auto" and "torch" keep training on SDPA (PyTorch, differentiable); "torch" is recorded."""
    q, k, v = _qkv()
    plan = AttnPlan(mode="full", grid=(2, 2, 2), rope=None, backend=backend)
    with dispatch.record_choices() as got:
        out = Attention._attend(q, k, v, plan, 0)
    out.sum().backward()
    assert q.grad is not None
    q2, k2, v2 = (t.detach() for t in (q, k, v))
    torch.testing.assert_close(out.detach(), _sdpa(q2, k2, v2))
    if backend == "torch":
        assert [(c.op, c.impl) for c in got] == [("attn_with_kv_cache", "torch_reference")]


def _wan_like_attn():
    lin = torch.nn.Linear(32, 32)
    attn = torch.nn.Module()
    attn.heads, attn.to_q, attn.to_k, attn.to_v = 2, lin, lin, lin
    attn.norm_q = attn.norm_k = torch.nn.Identity()
    attn.to_out = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    return attn


def test_diffusers_dense_at_zero_training_refuses_explicit_cuda():
    """apply_block_sparse_attention(..., backend="cuda") at sparsity 0 (dense_at_zero) ran SDPA for a training
    forward, ignoring the backend; now BackendUnavailableError names it (auto/torch keep SDPA: the existing
    test_training_at_sparsity_zero_matches_diffusers_gradients)."""
    pytest.importorskip("diffusers")
    from longcat_kernels.integrations.diffusers import BlockSparseWanAttnProcessor, _GridState

    proc = BlockSparseWanAttnProcessor(_GridState(grid=(2, 2, 2)), lk.BlockSparseParams(sparsity=0.0),
                                       original=None, backend="cuda", fused_prologue=False)
    with pytest.raises(lk.BackendUnavailableError, match="backend 'cuda' unavailable"):
        proc(_wan_like_attn(), torch.randn(1, 8, 32))


@pytest.mark.triton_interpret
def test_diffusers_dense_at_zero_training_on_triton_runs_the_triton_kernel():
    """backend="triton" training at sparsity 0 ran SDPA without a word (then, for a while, was refused); the
    block-sparse Triton kernel at sparsity 0 (every block) has a backward: it runs, equal to SDPA, gradients too."""
    pytest.importorskip("diffusers")
    from longcat_kernels import dispatch
    from longcat_kernels.integrations.diffusers import BlockSparseWanAttnProcessor, _GridState

    proc = BlockSparseWanAttnProcessor(_GridState(grid=(2, 2, 2)), lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 2, 2)),
                                       original=None, backend="triton", fused_prologue=False)
    attn = _wan_like_attn()
    x = torch.randn(1, 8, 32, requires_grad=True)
    with dispatch.record_choices() as got:
        out = proc(attn, x)
    assert ("block_sparse_attn", "triton") in [(c.op, c.backend) for c in got]
    q = attn.to_q(x).unflatten(2, (2, -1)).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2, 3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    gx, = torch.autograd.grad(out, x, g)
    gr, = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gr, rtol=1e-3, atol=1e-4)


@pytest.mark.triton_interpret
def test_block_sparse_attn_triton_records_its_gating_once():
    """block_sparse_attn(backend="triton") asked dispatch whether Triton can gate (gating_backend) through
    choose(), which records: record_choices() / last_choice listed select_blocks twice for one gating that ran
    once ([select_blocks, select_blocks, block_sparse_attn]). The probe no longer records."""
    q, k, v = _qkv(grad=False)
    for be in ("triton", "torch"):
        with dispatch.record_choices() as got:
            lk.block_sparse_attn(q, k, v, grid_q=(2, 2, 2), chunk_q=(1, 2, 2), sparsity=0.5, backend=be)
        assert [c.op for c in got] == ["select_blocks", "block_sparse_attn"], (be, got)


def test_vc_dense_training_on_auto_is_recorded(monkeypatch):
    """On "auto", training's dense self-attention ran SDPA without asking dispatch: record_choices() /
    last_choice / the DEBUG log (documented as listing what ran) showed nothing for it. It is now the op's
    torch_reference choice (SDPA), recorded; under LONGCAT_KERNELS_BACKEND=cuda (which would refuse the
    forward-only op) it still runs SDPA, unrecorded, as before."""
    q, k, v = _qkv()
    plan = AttnPlan(mode="full", grid=(2, 2, 2), rope=None, backend="auto")
    with dispatch.record_choices() as got:
        out = Attention._attend(q, k, v, plan, 0)
    assert [(c.op, c.impl) for c in got] == [("attn_with_kv_cache", "torch_reference")], got
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "cuda")
    torch.testing.assert_close(Attention._attend(q, k, v, plan, 0), out, rtol=0, atol=0)
