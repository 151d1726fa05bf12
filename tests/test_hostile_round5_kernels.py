"""Hostile inputs found by the fifth audit of the kernels' public API (2026-12-07): each test fails on
the code before its fix."""

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import dispatch
from longcat_kernels.testing.oracle import bsa_token_mask

TRITON_CPU = pytest.param("triton", marks=pytest.mark.triton_interpret)


def _oracle(q, k, v, mask, scale):
    """float64 attention of q [B,Sq,H,D] over k, v [B,Sk,H,D] where mask [B,H,Sq,Sk] holds."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double())


def test_qk_norm_rope_norm_weights_that_need_grad_count_as_needing_grad(monkeypatch):
    # the kernel choice looked at q and k only: trained RMSNorm weights with frozen q/k (grad through
    # the weights alone) made "auto" pick the forward-only Triton prologue on CUDA, which then raised
    # RuntimeError; an explicit backend="triton" raised that RuntimeError from inside the kernel module
    seen = []
    real = dispatch.choose_kernel
    monkeypatch.setattr(dispatch, "choose_kernel", lambda op, f, req: (seen.append(f), real(op, f, req))[1])
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    wq, wk = (torch.rand(16) + 0.5).requires_grad_(), torch.rand(16) + 0.5
    qo, ko = lk.qk_norm_rope(q, k, wq, wk)
    assert seen[-1].requires_grad
    (qo.square().sum() + ko.sum()).backward()
    assert wq.grad is not None and bool(torch.isfinite(wq.grad).all())
    with pytest.raises(lk.BackendUnavailableError, match="forward only"):
        lk.qk_norm_rope(q, k, wq, wk, backend="triton")


def test_block_sparse_attn_torch_compiles_with_dynamic_shapes():
    # the torch reference sized its key gather with counts.max().item(): under torch.compile(fullgraph=True,
    # dynamic=True) the query-block grouping loop then depended on that data-dependent width and dynamo
    # raised UserError ("Could not extract specialized integer from data-dependent expression")
    def f(q, k, v):
        return lk.block_sparse_attn(q, k, v, grid_q=(q.shape[1] // 4, 2, 2), chunk_q=(1, 2, 2), sparsity=0.5,
                                    backend="torch", return_lse=True)

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="eager")
    for S in (16, 32):
        q, k, v = (torch.randn(1, S, 2, 16) for _ in range(3))
        out, lse = cf(q, k, v)
        sel = lk.select_blocks(q, k, grid_q=(S // 4, 2, 2), chunk_q=(1, 2, 2), sparsity=0.5)
        mask = bsa_token_mask(sel.to_mask(), sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
        torch.testing.assert_close(out.double(), _oracle(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, f(q, k, v)[1])


@pytest.mark.parametrize("op", ["attn_with_kv_cache", "prefix_attn"])
@pytest.mark.parametrize("head_dim", [60, 100, 36])
def test_auto_sends_head_dims_cudnn_cannot_take_to_triton(op, head_dim):
    # torch's cuDNN SDPA takes head_dim <= 128 in multiples of 8 only: "auto" on a Hopper/Ampere GPU
    # chose the Triton prologue + cuDNN route for any head_dim <= 128 that the csrc kernels refuse
    # (not 64/128), which then failed inside torch ("No available kernel") instead of running the
    # fused Triton kernel that takes any head_dim
    for facts in (dispatch.Facts(), dispatch.Facts(capability=(8, 0), csrc_kernels=("sm80",))):
        c = dispatch.choose_kernel(op, facts._replace(head_dim=head_dim), "auto")
        assert c.impl == "triton_fused", c
    assert dispatch.choose_kernel(op, dispatch.Facts()._replace(head_dim=72), "auto").impl == "triton_prologue_cudnn"


@pytest.mark.parametrize("head_dim, triton_ok", [(256, True), (200, True), (257, False), (320, False), (512, False)])
def test_bsa_training_past_the_triton_backward_head_dim_goes_to_the_reference(head_dim, triton_ok):
    # found on the H100 by bench/dev/head_dim_probe_gpu.py: block_sparse_attn with grad at head_dim 512
    # under "auto" ran the Triton backward, which raised Triton's OutOfResources (shared memory 270,336 B
    # required, 232,448 available) at the first backward; the forward runs there
    from longcat_kernels.dispatch import BackendUnavailableError, Facts, choose_kernel

    f = Facts(head_dim=head_dim, requires_grad=True)
    c = choose_kernel("block_sparse_attn", f)
    if triton_ok:
        assert choose_kernel("block_sparse_attn", f, "triton").backend == "triton"
        assert c.backend != "torch", c
    else:
        assert c.backend == "torch", c
        with pytest.raises(BackendUnavailableError, match=r"backward kernel takes head_dim <= 256 \(got %d" % head_dim):
            choose_kernel("block_sparse_attn", f, "triton")
    # inference keeps the Triton forward at any head_dim
    assert choose_kernel("block_sparse_attn", Facts(head_dim=head_dim), "triton").backend == "triton"


@pytest.mark.parametrize("op", ["attn_with_kv_cache", "prefix_attn"])
@pytest.mark.parametrize("head_dim, triton_ok", [(256, True), (200, True), (257, False), (320, False), (512, False)])
def test_cached_kv_past_the_fused_kernel_head_dim_goes_to_the_reference(op, head_dim, triton_ok):
    # found on the H100 by bench/dev/head_dim_probe_gpu.py (session 21): attn_with_kv_cache and prefix_attn at
    # head_dim 320 and 512 under "auto" ran the fused Triton kernel, which raised Triton's OutOfResources
    # (shared memory 327,680 B required, 232,448 available)
    from longcat_kernels.dispatch import BackendUnavailableError, Facts, choose_kernel

    f = Facts(head_dim=head_dim)
    c = choose_kernel(op, f)
    if triton_ok:
        assert c.backend != "torch", c
        assert choose_kernel(op, f, "triton").backend == "triton"
    else:
        assert c.backend == "torch", c
        with pytest.raises(BackendUnavailableError, match=r"fused kernel takes head_dim <= 256 \(got %d" % head_dim):
            choose_kernel(op, f, "triton")
