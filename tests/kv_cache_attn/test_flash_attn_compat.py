"""``flash_attn_with_kvcache`` (flash-attn's names and order) equals ``attn_with_kv_cache``; GQA/MQA
in the dense ops equals attention with the kv heads repeated; the cache is never written."""
from __future__ import annotations

import pytest
import torch

from helpers import CPU_BACKENDS, DEV

import longcat_kernels as lk


def _r(*s):
    return torch.randn(*s, device=DEV)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("Bc", [1, 2])
def test_equals_attn_with_kv_cache_and_cache_untouched(backend, Bc):
    B, H, D, Sc, Sn = 2, 2, 32, 21, 13
    q, k, v = _r(B, Sn, H, D), _r(B, Sn, H, D), _r(B, Sn, H, D)
    kc, vc = _r(Bc, Sc, H, D), _r(Bc, Sc, H, D)
    kc0, vc0 = kc.clone(), vc.clone()
    out = lk.flash_attn_with_kvcache(q, kc, vc, k, v, softmax_scale=0.3, backend=backend)
    exp = lk.attn_with_kv_cache(q, k, v, kc, vc, scale=0.3, backend=backend)
    assert not torch.isnan(out).any()
    assert torch.equal(out, exp)
    o2, lse = lk.flash_attn_with_kvcache(q, kc, vc, k, v, softmax_scale=0.3, return_softmax_lse=True,
                                         backend=backend)
    e2, e_lse = lk.attn_with_kv_cache(q, k, v, kc, vc, scale=0.3, backend=backend, return_lse=True)
    assert torch.equal(o2, e2) and torch.equal(lse, e_lse)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cache_alone(backend):
    B, H, D, Sc, Sq = 2, 2, 32, 19, 7
    q = _r(B, Sq, H, D)
    kc, vc = _r(1, Sc, H, D), _r(1, Sc, H, D)
    out = lk.flash_attn_with_kvcache(q, kc, vc, backend=backend)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kc.expand(B, -1, -1, -1).double()) * D**-0.5
    exp = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vc.expand(B, -1, -1, -1).double())
    torch.testing.assert_close(out.double(), exp, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_mqa_dense_ops(backend, Hkv):
    B, H, D, Sc, Sn = 2, 4, 32, 16, 11
    q = _r(B, Sn, H, D)
    k, v = _r(B, Sn, Hkv, D), _r(B, Sn, Hkv, D)
    kc, vc = _r(1, Sc, Hkv, D), _r(1, Sc, Hkv, D)
    rep = lambda x: x.repeat_interleave(H // Hkv, dim=2)  # noqa: E731
    out, lse = lk.flash_attn_with_kvcache(q, kc, vc, k, v, return_softmax_lse=True, backend=backend)
    exp, e_lse = lk.attn_with_kv_cache(q, rep(k), rep(v), rep(kc), rep(vc), backend="torch", return_lse=True)
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, e_lse, atol=1e-5, rtol=1e-5)
    out = lk.prefix_attn(q, k, v, 4, backend=backend)
    exp = lk.prefix_attn(q, rep(k), rep(v), 4, backend="torch")
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)


def test_bad_arguments_name_themselves():
    q = _r(1, 8, 4, 32)
    kc = _r(1, 8, 3, 32)
    with pytest.raises(ValueError, match="k_cache"):
        lk.flash_attn_with_kvcache(q, kc, kc)
    with pytest.raises(ValueError, match="k/v"):
        lk.flash_attn_with_kvcache(q, _r(1, 8, 4, 32), _r(1, 8, 4, 32), k=_r(1, 8, 4, 32))
    with pytest.raises(ValueError, match="block_sparse"):
        lk.attn_with_kv_cache(q, _r(1, 8, 2, 32), _r(1, 8, 2, 32),
                              block_sparse=lk.BlockSparseParams(frame_hw=(2, 4), chunk_q=(1, 2, 2)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gqa_with_fused_rope(backend):
    grid, H, Hkv, D = (3, 2, 4), 4, 2, 32
    hw = grid[1] * grid[2]
    rope = lk.Rope3D(grid, D)
    q = _r(2, 2 * hw, H, D)
    k, v = _r(2, 2 * hw, Hkv, D), _r(2, 2 * hw, Hkv, D)
    kc, vc = _r(1, hw, Hkv, D), _r(1, hw, Hkv, D)
    out = lk.flash_attn_with_kvcache(q, kc, vc, k, v, rope=rope, backend=backend)
    rep = lambda x: x.repeat_interleave(H // Hkv, dim=2)  # noqa: E731
    exp = lk.attn_with_kv_cache(q, rep(k), rep(v), rep(kc), rep(vc), rope=rope, backend="torch")
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)


def test_cache_alone_block_sparse():
    grid, H, D = (4, 4, 4), 2, 32
    S = 64
    q = _r(1, 32, H, D)
    kc, vc = _r(1, S, H, D), _r(1, S, H, D)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(2, 2, 2), frame_hw=(4, 4))
    out, lse = lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=bs, return_softmax_lse=True, backend="torch")
    exp, e_lse = lk.block_sparse_attn(q, kc, vc, grid_q=(2, 4, 4), grid_k=grid, chunk_q=(2, 2, 2), sparsity=0.5,
                                      backend="torch", return_lse=True)
    assert torch.equal(out, exp) and torch.equal(lse, e_lse)
