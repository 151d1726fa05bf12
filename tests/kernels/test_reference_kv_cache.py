"""Reference attn_with_kv_cache / prefix_attn against the explicit formulations and the fp64 oracle."""

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing import (
    assert_close,
    attention_lowp,
    attention_oracle,
    bsa_token_mask,
    make_cache,
    make_qkv,
    prefix_mask,
    rope_oracle,
)

GRID_HW = (3, 5)  # tokens per frame 15 (odd)
HW = GRID_HW[0] * GRID_HW[1]


def _explicit(q, k, v, kc, vc, rope, c):
    """Rotate fresh q/k in fp64 longhand at frames c.., concatenate with the repeated cache."""
    B = q.shape[0]
    if rope is not None:
        q = rope_oracle(q, rope.grid, c)
        k = rope_oracle(k, rope.grid, c)
    if kc is None:
        return q, k, v
    ka = torch.cat([kc.double().expand(B, -1, -1, -1), k.double()], dim=1)
    va = torch.cat([vc.double().expand(B, -1, -1, -1), v.double()], dim=1)
    return q, ka, va


@pytest.mark.parametrize("Bc", [1, 2])
@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("H,D", [(1, 128), (3, 64)])
def test_kv_cache_equals_explicit_concat(Bc, use_rope, H, D):
    c, tn = 2, 3
    rope = lk.Rope3D((c + tn,) + GRID_HW, D) if use_rope else None
    q, k, v = make_qkv(2, tn * HW, H, D, permuted=True)
    kc, vc = make_cache(Bc, c * HW, H, D)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, backend="torch")
    ref, _ = attention_oracle(*_explicit(q, k, v, kc, vc, rope, c))
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kv_cache_low_precision(dtype):
    c, tn, H, D = 1, 2, 2, 64
    rope = lk.Rope3D((c + tn,) + GRID_HW, D)
    q, k, v = make_qkv(2, tn * HW, H, D, dtype=dtype)
    kc, vc = make_cache(1, c * HW, H, D, dtype=dtype)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)
    qr, kr = lk.apply_rope_3d(q, rope, c), lk.apply_rope_3d(k, rope, c)
    ka, va = torch.cat([kc.expand(2, -1, -1, -1), kr], 1), torch.cat([vc.expand(2, -1, -1, -1), v], 1)
    ref, _ = attention_oracle(qr, ka, va)
    assert out.dtype == dtype
    assert_close(out, ref, attention_lowp(qr, ka, va))


def test_kv_cache_batch1_is_not_copied(monkeypatch):
    """A batch-1 cache must never be expanded/repeated into a batch-B tensor by the dense path."""
    c, tn, H, D = 2, 2, 2, 64
    q, k, v = make_qkv(3, tn * HW, H, D)
    kc, vc = make_cache(1, c * HW, H, D)
    seen = []
    orig_cat, orig_expand = torch.cat, torch.Tensor.expand

    def spy_cat(tensors, *a, **kw):
        out = orig_cat(tensors, *a, **kw)
        seen.append(tuple(out.shape))
        return out

    def spy_expand(self, *sizes):
        if self.data_ptr() in (kc.data_ptr(), vc.data_ptr()):
            raise AssertionError("the batch-1 cache was expanded")
        return orig_expand(self, *sizes)

    monkeypatch.setattr(torch, "cat", spy_cat)
    monkeypatch.setattr(torch.Tensor, "repeat", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("repeat")))
    monkeypatch.setattr(torch.Tensor, "expand", spy_expand)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc)
    monkeypatch.undo()
    assert all((c + tn) * HW not in s for s in seen), "the [cache; fresh] concatenation was materialised"
    ref, _ = attention_oracle(*_explicit(q, k, v, kc, vc, None, c))
    assert_close(out, ref)


def test_kv_cache_without_cache_is_dense_attention():
    rope = lk.Rope3D((2,) + GRID_HW, 64)
    q, k, v = make_qkv(2, 2 * HW, 3, 64)
    out = lk.attn_with_kv_cache(q, k, v, rope=rope)
    ref, _ = attention_oracle(rope_oracle(q, rope.grid), rope_oracle(k, rope.grid), v)
    assert_close(out, ref)


def test_kv_cache_cached_keys_are_not_rotated():
    """Cached K is stored rotated: the op must not rotate it again (result depends on it as given)."""
    c, tn = 2, 1
    rope = lk.Rope3D((c + tn,) + GRID_HW, 64)
    q, k, v = make_qkv(1, tn * HW, 2, 64)
    kc, vc = make_cache(1, c * HW, 2, 64)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)
    wrong, _ = attention_oracle(*_explicit(q, k, v, rope_oracle(kc, rope.grid, 0).float(), vc, rope, c))
    right, _ = attention_oracle(*_explicit(q, k, v, kc, vc, rope, c))
    assert_close(out, right)
    assert (out.double() - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("Bc", [1, 2])
def test_kv_cache_block_sparse(Bc):
    c, tn, H, D = 2, 3, 2, 64
    grid_k = (c + tn,) + GRID_HW
    rope = lk.Rope3D(grid_k, D)
    q, k, v = make_qkv(2, tn * HW, H, D)
    kc, vc = make_cache(Bc, c * HW, H, D)
    params = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=params)
    qr, kr = lk.apply_rope_3d(q, rope, c), lk.apply_rope_3d(k, rope, c)
    ka, va = torch.cat([kc.expand(2, -1, -1, -1), kr], 1), torch.cat([vc.expand(2, -1, -1, -1), v], 1)
    grid_q = (tn,) + GRID_HW
    sel = lk.select_blocks(qr, ka, grid_q=grid_q, grid_k=grid_k, chunk_q=(1, 2, 2), sparsity=0.5)
    ref, _ = attention_oracle(qr, ka, va, bsa_token_mask(sel.to_mask(), grid_q, grid_k, (1, 2, 2), (1, 2, 2)))
    assert_close(out, ref)
    # a precomputed selection gives the same result; sparsity 0 equals dense
    out2 = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=lk.BlockSparseParams(selection=sel))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    dense = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)
    full = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 2, 2)))
    assert_close(full, dense.double(), floor=2e-5)


@pytest.mark.parametrize("S,p,H,D", [(37, 0, 3, 64), (37, 1, 1, 128), (37, 17, 3, 64), (37, 37, 1, 64), (59, 30, 3, 128)])
def test_prefix_attn_matches_oracle(S, p, H, D):
    q, k, v = make_qkv(2, S, H, D, permuted=True)
    out = lk.prefix_attn(q, k, v, p)
    ref, _ = attention_oracle(q, k, v, prefix_mask(S, p))
    assert out.shape == q.shape and out.is_contiguous()
    assert_close(out, ref)


def test_prefix_attn_equals_two_call_formulation():
    S, p = 45, 15
    q, k, v = make_qkv(2, S, 2, 128)
    out = lk.prefix_attn(q, k, v, p, scale=0.1)
    cond, _ = attention_oracle(q[:, :p], k[:, :p], v[:, :p], scale=0.1)
    noisy, _ = attention_oracle(q[:, p:], k, v, scale=0.1)
    assert_close(out, torch.cat([cond, noisy], dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefix_attn_low_precision(dtype):
    S, p = 40, 13
    q, k, v = make_qkv(1, S, 2, 64, dtype=dtype)
    m = prefix_mask(S, p)
    out = lk.prefix_attn(q, k, v, p)
    ref, _ = attention_oracle(q, k, v, m)
    assert_close(out, ref, attention_lowp(q, k, v, m))
