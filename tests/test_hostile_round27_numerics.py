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
        with pytest.raises(ValueError, match=r"^scale: expected at most the fp32 maximum / log2\(e\) = 2\.3587e\+38"):
            _calls(q, k, v, scale)[op](be)
