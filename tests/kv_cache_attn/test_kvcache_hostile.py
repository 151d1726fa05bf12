"""Hostile-user inputs of ``flash_attn_with_kvcache`` and of ``return_lse=`` on the attention ops:
each must raise a ValueError/TypeError naming the argument (not an AttributeError or a
ZeroDivisionError from inside, and not a silently different return type)."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk


def _t(*shape):
    return torch.randn(*shape)


def _qkv(B=1, S=8, H=2, D=16):
    return _t(B, S, H, D), _t(B, S, H, D), _t(B, S, H, D)


def test_q_not_a_tensor_is_named_on_the_cache_only_path():
    _, kc, vc = _qkv()
    # was AttributeError: 'list' object has no attribute 'device' (q was used before it was checked)
    with pytest.raises(TypeError, match=r"^q: expected a torch.Tensor, got list"):
        lk.flash_attn_with_kvcache([1.0, 2.0], kc, vc)


@pytest.mark.parametrize("bad", ["no", 1, 0, None, torch.tensor(True)])
def test_return_softmax_lse_must_be_bool(bad):
    q, kc, vc = _qkv()
    # "no" / 1 were truthy: a (out, lse) tuple came back where a tensor was asked for
    with pytest.raises(TypeError, match=r"^return_softmax_lse: expected a bool"):
        lk.flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=bad)
    k, v = _t(*q.shape), _t(*q.shape)
    with pytest.raises(TypeError, match=r"^return_softmax_lse: expected a bool"):
        lk.flash_attn_with_kvcache(q, kc, vc, k, v, return_softmax_lse=bad)


@pytest.mark.parametrize("bad,exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                     (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)])
def test_softmax_scale_is_named_as_the_caller_spelled_it(bad, exc):
    q, kc, vc = _qkv()
    with pytest.raises(exc, match=r"^softmax_scale: expected"):
        lk.flash_attn_with_kvcache(q, kc, vc, softmax_scale=bad)
    with pytest.raises(exc, match=r"^softmax_scale: expected"):
        lk.flash_attn_with_kvcache(q, kc, vc, _t(*q.shape), _t(*q.shape), softmax_scale=bad)


@pytest.mark.parametrize("hw,exc,msg", [
    ((0, 4), ValueError, "positive"),        # was ZeroDivisionError: integer modulo by zero
    ((-2, -4), ValueError, "positive"),
    (8, TypeError, "tuple of 2 ints"),       # was TypeError: cannot unpack non-iterable int object
    ((2.0, 4), TypeError, "tuple of 2 ints"),
    ((2, 4, 1), TypeError, "tuple of 2 ints"),
])
def test_cache_only_block_sparse_frame_hw(hw, exc, msg):
    q, kc, vc = _qkv()
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 1, 1), frame_hw=hw)
    with pytest.raises(exc, match=rf"^block_sparse.frame_hw: expected .*{msg}"):
        lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=bs)


def test_block_sparse_of_the_wrong_type_is_named():
    q, kc, vc = _qkv()
    # was "block_sparse.frame_hw: expected (H, W) when k is None, got None" for a dict
    with pytest.raises(TypeError, match=r"^block_sparse: expected a BlockSparseParams or None, got dict"):
        lk.flash_attn_with_kvcache(q, kc, vc, block_sparse={"sparsity": 0.5})


def test_cache_only_block_sparse_still_matches_the_explicit_op():
    # the checks above must not change a good call: same result as block_sparse_attn on the cache
    q, kc, vc = _qkv(S=8)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 1, 2), frame_hw=(2, 4))
    out = lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=bs, backend="torch")
    want = lk.block_sparse_attn(q, kc, vc, grid_q=(1, 2, 4), grid_k=(1, 2, 4), chunk_q=(1, 1, 2), sparsity=0.5,
                                backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.0])
def test_return_lse_must_be_bool_on_every_op(bad):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^return_lse: expected a bool"):
        lk.block_sparse_attn(q, k, v, grid_q=(1, 2, 4), chunk_q=(1, 1, 1), sparsity=0.5, return_lse=bad)
    with pytest.raises(TypeError, match=r"^return_lse: expected a bool"):
        lk.attn_with_kv_cache(q, k, v, return_lse=bad)
    with pytest.raises(TypeError, match=r"^return_lse: expected a bool"):
        lk.prefix_attn(q, k, v, 2, return_lse=bad)


def test_return_lse_bools_still_give_the_documented_types():
    q, k, v = _qkv()
    for f in (lambda **kw: lk.block_sparse_attn(q, k, v, grid_q=(1, 2, 4), chunk_q=(1, 1, 1), sparsity=0.5, **kw),
              lambda **kw: lk.attn_with_kv_cache(q, k, v, **kw),
              lambda **kw: lk.prefix_attn(q, k, v, 2, **kw)):
        assert isinstance(f(return_lse=False), torch.Tensor)
        out, lse = f(return_lse=True)
        assert out.shape == q.shape and lse.shape == (1, 2, 8) and lse.dtype == torch.float32


def test_gqa_heads_that_do_not_divide_are_named():
    q = _t(1, 8, 4, 16)
    kc, vc = _t(1, 8, 3, 16), _t(1, 8, 3, 16)
    with pytest.raises(ValueError, match=r"^k_cache: expected a number of heads dividing q's 4 heads"):
        lk.flash_attn_with_kvcache(q, kc, vc)
    with pytest.raises(ValueError, match=r"^k: expected a number of heads dividing q's 4 heads"):
        lk.flash_attn_with_kvcache(q, kc, vc, _t(1, 8, 3, 16), _t(1, 8, 3, 16))


def test_cache_only_grad_and_batch_errors_name_the_cache():
    q = _t(1, 8, 2, 16)
    kc, vc = _t(1, 8, 2, 16).requires_grad_(), _t(1, 8, 2, 16)
    # was "k: attn_with_kv_cache is forward-only": neither the argument nor the function the user called
    with pytest.raises(ValueError, match=r"^k_cache: flash_attn_with_kvcache is forward-only"):
        lk.flash_attn_with_kvcache(q, kc, vc)
    # was "expected batch 1 or 1"
    with pytest.raises(ValueError, match=r"^k_cache: expected batch 1 \(q's batch 1\), got 2"):
        lk.flash_attn_with_kvcache(q, _t(2, 8, 2, 16), _t(2, 8, 2, 16))


@pytest.mark.parametrize("bs,msg", [
    (lk.BlockSparseParams(sparsity=0.5, chunk_q=(4, 4, 4), frame_hw=(2, 4)), r"^block_sparse.chunk_q: expected"),
    (lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 1, 1), chunk_k=(2, 1, 1), frame_hw=(2, 4)),
     r"^block_sparse.chunk_k: expected"),
    (lk.BlockSparseParams(sparsity=1.0, chunk_q=(1, 1, 1), frame_hw=(2, 4)), r"^sparsity: expected"),
])
def test_cache_only_block_sparse_names_match_the_fresh_kv_path(bs, msg):
    q, kc, vc = _qkv()
    with pytest.raises(ValueError, match=msg):
        lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=bs)


def test_new_checks_do_not_break_fullgraph_compile():
    # the checks above are skipped while dynamo traces (a guard on every call would be the cost)
    q, kc, vc = _qkv()

    def f(q, kc, vc):
        return lk.flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True, softmax_scale=0.3, backend="torch")

    got = torch.compile(f, fullgraph=True, backend="eager")(q, kc, vc)
    for g, w in zip(got, f(q, kc, vc)):
        assert not g.isnan().any()
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_cache_only_block_sparse_is_forward_only_too():
    """k=None with block_sparse= runs block_sparse_attn, which is differentiable: the documented
    forward-only contract held only on the dense path (gradients went through)."""
    q, kc, vc = _t(1, 16, 2, 16), _t(1, 16, 2, 16), _t(1, 16, 2, 16)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2), frame_hw=(4, 4))
    with pytest.raises(ValueError, match=r"^q: flash_attn_with_kvcache is forward-only"):
        lk.flash_attn_with_kvcache(q.requires_grad_(True), kc, vc, block_sparse=bs, backend="torch")
    with torch.no_grad():
        out = lk.flash_attn_with_kvcache(q, kc, vc, block_sparse=bs, backend="torch")
    assert out.shape == q.shape and torch.isfinite(out).all()
