"""Hostile round 27: numerical extremes of the torch reference vs the Triton (interpreter) backends."""

from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels._validate import MAX_SCALE

pytestmark = pytest.mark.triton_interpret


def _oracle(q, k, v, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double()), torch.logsumexp(s, -1)


def _calls(q, k, v, scale):
    grid, chunk = (1, 2, 8), (1, 2, 4)
    return {
        "block_sparse_attn": lambda be: lk.block_sparse_attn(q, k, v, grid_q=grid, chunk_q=chunk, sparsity=0.0,
                                                             scale=scale, backend=be, return_lse=True),
        "attn_with_kv_cache": lambda be: lk.attn_with_kv_cache(q, k, v, scale=scale, backend=be, return_lse=True),
        "prefix_attn": lambda be: lk.prefix_attn(q, k, v, 0, scale=scale, backend=be, return_lse=True),
    }


@pytest.mark.parametrize("op", ["block_sparse_attn", "attn_with_kv_cache", "prefix_attn"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_largest_accepted_scale_gives_the_fp64_answer(op, backend):
    """A scale in (fp32 max / log2 e, fp32 max] was accepted, and the Triton kernels (which fold log2(e) into
    the scale in fp32) returned all-NaN out and lse while the torch reference returned the finite answer. The
    largest accepted scale is now fp32 max / log2(e), and there every backend matches fp64."""
    S, D = 16, 16
    q = torch.randn(1, S, 1, D) * 1e-20  # scores * scale stay O(1)
    k, v = torch.randn(1, S, 1, D) * 1e-19, torch.randn(1, S, 1, D)
    out, lse = _calls(q, k, v, MAX_SCALE)[op](backend)
    ref, lref = _oracle(q, k, v, MAX_SCALE)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("op", ["block_sparse_attn", "attn_with_kv_cache", "prefix_attn"])
@pytest.mark.parametrize("scale", [2.5e38, 3.4e38])
def test_scale_that_overflows_the_kernels_log2_scale_raises(op, scale):
    """scale * log2(e) > fp32 max: inf in the kernels, so all-NaN on Triton/csrc and finite on torch; now a
    ValueError naming the limit on every backend instead of backend-dependent silent NaN."""
    q, k, v = (torch.randn(1, 16, 1, 16) for _ in range(3))
    for be in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"^scale: expected at most the fp32 maximum / log2\(e\) = 2\.35865749\d*e\+38"):
            _calls(q, k, v, scale)[op](be)


def test_reference_computes_fp16_scores_in_fp32_on_cuda():
    """The torch reference (block-sparse and cached-KV) ran fp16 matmuls in fp16 on CUDA: a dot product past
    65504 before the scale (entries ~30 at head_dim 128) became inf, every such row NaN, while the Triton and
    csrc kernels (fp32 scores) gave the fp64 answer. fp16 now computes in fp32 there (bf16 keeps bf16)."""
    from types import SimpleNamespace

    from longcat_kernels.ops.block_sparse_attn.reference import compute_dtype

    assert compute_dtype(SimpleNamespace(dtype=torch.float16, is_cuda=True)) == torch.float32
    assert compute_dtype(SimpleNamespace(dtype=torch.float16, is_cuda=False)) == torch.float32
    assert compute_dtype(SimpleNamespace(dtype=torch.bfloat16, is_cuda=True)) == torch.bfloat16


def _fp16_overflowing_qk(device):
    D, S = 32, 32
    base = torch.randn(1, S, 2, D, device=device)
    q = (base * 150).half()
    k = (base * 150 + torch.randn_like(base) * 15).half()  # q.k up to ~1e6 > 65504 before the scale
    return q, k, torch.randn(1, S, 2, D, device=device).half()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fp16_dot_products_past_65504_match_fp64_on_every_backend(device):
    """Same finding end to end: fp16 q/k whose dot products exceed fp16's max before scaling (scaled scores
    finite), torch and Triton agree with the fp64 oracle (on CUDA the reference gave NaN rows)."""
    q, k, v = _fp16_overflowing_qk(device)
    scale = 1e-3
    ref, lref = _oracle(q, k, v, scale)
    for be in ("torch", "triton"):
        o1 = lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(1, 2, 4), sparsity=0.0, scale=scale,
                                  backend=be)
        o2, l2 = lk.attn_with_kv_cache(q[:, 16:], k[:, 16:], v[:, 16:], k[:, :16], v[:, :16], scale=scale,
                                       backend=be, return_lse=True)
        torch.testing.assert_close(o1.double(), ref, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(o2.double(), ref[:, 16:], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(l2.double(), lref[..., 16:], atol=1e-2, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_norm_eps_past_fp32_max_raises(backend):
    """qk_norm_rope and fp8_layer_norm_quantize accepted an eps past fp32's maximum (e.g. 1e39): the norms add
    eps in fp32, so it became inf and every row came out exactly 0 on every backend (fp64: ~x / sqrt(eps), not
    0). Now a ValueError; the fp32 maximum itself still gives the fp64 answer."""
    D = 24
    x = torch.randn(1, 8, 1, D) * 1e18
    w = torch.ones(D)
    with pytest.raises(ValueError, match=r"^eps: expected at most the fp32 maximum"):
        lk.qk_norm_rope(x, x, w, w, None, 0, eps=1e39, backend=backend)
    with pytest.raises(ValueError, match=r"^eps: expected at most the fp32 maximum"):
        lk.fp8_layer_norm_quantize(x.view(8, D), eps=1e39, backend=backend)
    eps = 3e38
    out = lk.qk_norm_rope(x, x, w, w, None, 0, eps=eps, backend=backend)[0]
    xd = x.double()
    exp = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=0)
