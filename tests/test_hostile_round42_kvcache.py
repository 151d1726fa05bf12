"""Hostile round 42: cached-KV attention (SPEC 4) -- attn_with_kv_cache, flash_attn_with_kvcache.

Numerics were swept against an fp64 oracle written from SPEC 4/5/3/12 (torch reference and Triton
interpreter, fp32/fp16, head_dim 8..256, GQA/MQA, batch-1 cache, permuted strides, RoPE with
custom axis_dims/theta/pairs, block-sparse top-k/cdf over cache + fresh, lse) without a mismatch;
what follows are the argument-handling defects found on the way.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.ops.kv_cache_attn.api import BlockSparseParams
from longcat_kernels.ops.rope.api import Rope3D

BACKENDS = ["torch", "triton"]


def _qkv(B=2, S=8, H=2, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3))


def _oracle(q, ks, vs, scale):
    """fp64 softmax(q [ks]^T * scale) [vs] with a batch-1 segment broadcast; -> (out, lse)."""
    B = q.shape[0]
    K = torch.cat([k.double().expand(B, -1, -1, -1) for k in ks], 1)
    V = torch.cat([v.double().expand(B, -1, -1, -1) for v in vs], 1)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), K) * scale
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]), V), lse


@pytest.mark.parametrize("fa", [False, True])
def test_a_cache_that_is_not_a_tensor_is_named(fa):
    """k_cache=[tensor] (a list) gave AttributeError: 'list' object has no attribute 'shape' (k_cache.shape
    was read before k_cache was checked); now a TypeError naming k_cache."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^k_cache: expected a torch.Tensor, got list"):
        if fa:
            lk.flash_attn_with_kvcache(q, [k], [v], k, v)
        else:
            lk.attn_with_kv_cache(q, k, v, [k], [v])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope", [False, True])
def test_an_empty_cache_is_attention_over_the_fresh_keys(backend, rope):
    """A cache of 0 tokens (``[Bc, 0, H, D]``, e.g. the first window of a growing cache, flash-attn's
    cache_seqlens=0) raised "expected a non-empty cache"; SPEC 4 allows Sc = 0 and every kernel already
    handled an empty first segment. Now it is attention over the fresh keys, at frames 0.. with rope."""
    q, k, v = _qkv(S=4, D=16)
    kc, vc = k[:1, :0], v[:1, :0]
    r = Rope3D((1, 2, 2), 16) if rope else None
    out, lse = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=r, backend=backend, return_lse=True)
    want, want_lse = lk.attn_with_kv_cache(q, k, v, rope=r, backend="torch", return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    if not rope:
        o64, l64 = _oracle(q, [k], [v], 16 ** -0.5)
        torch.testing.assert_close(out.double(), o64, atol=1e-5, rtol=1e-5)
        out2 = lk.flash_attn_with_kvcache(q, kc, vc, k, v, backend=backend)
        torch.testing.assert_close(out2, want, atol=1e-5, rtol=1e-5)
    # block-sparse over [empty cache; fresh] == block-sparse over the fresh keys
    bs = BlockSparseParams(sparsity=0.5, chunk_q=(1, 1, 2), frame_hw=(2, 2))
    o_bs = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend=backend)
    torch.testing.assert_close(o_bs, lk.attn_with_kv_cache(q, k, v, block_sparse=bs, backend="torch"),
                               atol=1e-5, rtol=1e-5)


def test_an_empty_cache_alone_still_has_no_keys():
    """k=None with an empty cache leaves no key at all: still refused, naming the cache."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k_cache: expected non-empty"):
        lk.flash_attn_with_kvcache(q, k[:1, :0], v[:1, :0])


@pytest.mark.parametrize("call,msg", [
    (lambda q, k, v: lk.attn_with_kv_cache(q, k, v, None, [v]),
     r"^k_cache/v_cache: expected both or neither, got k_cache=None, v_cache=list"),
    (lambda q, k, v: lk.flash_attn_with_kvcache(q, k, v, None, [v]),
     r"^k/v: expected both or neither, got k=None, v=list"),
    (lambda q, k, v: lk.flash_attn_with_kvcache(q, k, v, rope=5),
     r"^rope: expected None when k is None .*, got int"),
])
def test_errors_name_the_type_that_was_passed(call, msg):
    """The "both or neither" and "rope with k=None" errors called anything not None a Tensor / a Rope3D
    ("got k_cache=None, v_cache=Tensor" for a list); now they name the type that was passed."""
    q, k, v = _qkv()
    with pytest.raises((TypeError, ValueError), match=msg):
        call(q, k, v)


def test_a_numpy_bool_flag_is_not_called_a_bool():
    """return_lse=np.bool_(True) was refused with "expected a bool (True or False), got bool np.True_"
    (numpy's class is also named bool): the message contradicted itself. Now it names numpy.bool."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^return_lse: expected a bool \(True or False\), got numpy\.bool"):
        lk.attn_with_kv_cache(q, k, v, return_lse=np.bool_(True))


def _fake_cudnn_aten(monkeypatch):
    """``aten._scaled_dot_product_cudnn_attention`` on CPU: math SDPA, with the lse shaped as torch itself
    declares it (its meta kernel: ``[B, H, S, 1]``, as the CUDA kernel of recent torch allocates it)."""
    from longcat_kernels.ops.kv_cache_attn import cudnn

    real = torch.ops.aten._scaled_dot_product_cudnn_attention
    x = torch.empty(2, 3, 5, 16, device="meta", dtype=torch.float16)
    meta = real(x, x, x, None, True, 0.0, False, False, scale=0.25)
    assert meta[1].shape[:3] == (2, 3, 5)  # [B, H, S] or [B, H, S, 1]

    def fake(q, k, v, bias, compute_lse, dropout, causal, debug, scale=None):
        s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
        lse = torch.logsumexp(s, dim=-1)
        o = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v.float()).to(q.dtype)
        return (o, lse.reshape(lse.shape + meta[1].shape[3:])) + tuple(meta[2:])

    fake.default = real.default  # torch's own lazy registrations look it up

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", fake)
    return cudnn


@pytest.mark.triton_interpret
@pytest.mark.parametrize("Bc", [1, 2])
def test_cudnn_route_lse_is_three_dimensional(monkeypatch, Bc):
    """The cuDNN route (``auto`` on CUDA without the compiled extension) took the lse of
    ``aten._scaled_dot_product_cudnn_attention`` as ``[B, H, S]``; torch declares (meta kernel) and
    allocates it as ``[B, H, S, 1]``. So ``return_lse=True`` gave a 4-D lse (no cache, or a batch-B
    cache), broadcast ``logaddexp([B,H,S], [B,H,S,1])`` (a batch-1 cache) and made the prefix op's
    ``lse[:, :, a:b] = ls`` raise. Now the trailing 1 is dropped: lse ``[B, H, S]`` everywhere."""
    cudnn = _fake_cudnn_aten(monkeypatch)
    q, k, v = _qkv(B=2, S=4, H=3, D=16)
    kc, vc = k[:Bc] * 0.5, v[:Bc] + 1
    for cache in ((kc, vc), (None, None)):
        got, glse = cudnn._kv_cache_attn_cudnn_op(q, k, v, *cache, *([None] * 6), 1, 1, 0.25, True)
        ks, vs = ([kc, k], [vc, v]) if cache[0] is not None else ([k], [v])
        o64, l64 = _oracle(q, ks, vs, 0.25)
        assert glse.shape == (2, 3, 4)
        torch.testing.assert_close(got.double(), o64, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(glse.double(), l64, atol=1e-5, rtol=1e-5)
    out, lse = cudnn._prefix_attn_cudnn_op(q, k, v, 2, 0.25, True)
    want, wlse = torch.ops.longcat_kernels.prefix_attn_fwd(q, k, v, 2, 0.25, True)
    assert lse.shape == (2, 3, 4)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, wlse, atol=1e-5, rtol=1e-5)
