"""Every bad input raises ValueError/TypeError naming the argument, the expected and the actual value."""

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing import make_cache, make_qkv

GRID = (2, 4, 4)
S = 32


def qkv(B=2, Sq=S, H=2, D=64, Sk=None):
    return make_qkv(B, Sq, H, D, Sk)


def bsa(q, k, v, **kw):
    kw.setdefault("grid_q", GRID)
    kw.setdefault("chunk_q", (2, 2, 2))
    return lk.block_sparse_attn(q, k, v, **kw)


def sel(q, k, **kw):
    kw.setdefault("grid_q", GRID)
    kw.setdefault("chunk_q", (2, 2, 2))
    return lk.select_blocks(q, k, **kw)


OPS = {
    "block_sparse_attn": lambda q, k, v: bsa(q, k, v),
    "select_blocks": lambda q, k, v: sel(q, k),
    "prefix_attn": lambda q, k, v: lk.prefix_attn(q, k, v, 3),
    "attn_with_kv_cache": lambda q, k, v: lk.attn_with_kv_cache(q, k, v),
}


@pytest.mark.parametrize("op", list(OPS))
def test_wrong_rank(op):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor .* got shape \(2, 32, 128\)"):
        OPS[op](q.flatten(2), k, v)
    with pytest.raises(ValueError, match=r"k: expected a 4-D tensor"):
        OPS[op](q, k[0], v)


MISMATCH = [
    (op, which, dim, label)
    for op in OPS
    for which in ("k", "v")
    for dim, label in ((0, "batch"), (2, "heads"), (3, "head_dim"))
    if not (op == "select_blocks" and which == "v")  # select_blocks takes no v
]


@pytest.mark.parametrize("op,which,dim,label", MISMATCH)
def test_mismatched_bhd(op, which, dim, label):
    q, k, v = qkv()
    shape = list(k.shape)
    shape[dim] += 1
    bad = torch.randn(shape)
    args = (q, bad, v) if which == "k" else (q, k, bad)
    with pytest.raises(ValueError, match=rf"{which}: expected .*{label}.* got {shape[dim]}"):
        OPS[op](*args)


@pytest.mark.parametrize("op", list(OPS))
def test_non_floating_dtype(op):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q: expected a floating dtype .* got torch.int32"):
        OPS[op](q.to(torch.int32), k, v)
    with pytest.raises(TypeError, match=r"k: expected dtype torch.float32 \(same as q\), got torch.float16"):
        OPS[op](q, k.half(), v)
    with pytest.raises(TypeError, match=r"q: expected a torch.Tensor, got list"):
        OPS[op]([1.0], k, v)


@pytest.mark.parametrize("op", list(OPS))
def test_different_devices(op):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k: expected a tensor on q's device cpu, got meta"):
        OPS[op](q, k.to("meta"), v)


def test_cache_batch_not_1_or_B():
    q, k, v = qkv(B=2)
    kc, vc = make_cache(3, 16, 2, 64)
    with pytest.raises(ValueError, match=r"k_cache: expected batch 1 or 2 .* got 3"):
        lk.attn_with_kv_cache(q, k, v, kc, vc)
    kc, vc = make_cache(1, 16, 2, 64)
    with pytest.raises(ValueError, match=r"k_cache/v_cache: expected both or neither"):
        lk.attn_with_kv_cache(q, k, v, kc, None)
    with pytest.raises(ValueError, match=r"k_cache: expected 2 heads .* got 3"):
        lk.attn_with_kv_cache(q, k, v, torch.randn(1, 16, 3, 64), vc)
    with pytest.raises(ValueError, match=r"k_cache: expected head_dim 64 .* got 32"):
        lk.attn_with_kv_cache(q, k, v, torch.randn(1, 16, 2, 32), vc)
    with pytest.raises(TypeError, match=r"k_cache: expected dtype torch.float32 .* got torch.float16"):
        lk.attn_with_kv_cache(q, k, v, kc.half(), vc)
    with pytest.raises(ValueError, match=r"k_cache: expected a tensor on q's device cpu, got meta"):
        lk.attn_with_kv_cache(q, k, v, kc.to("meta"), vc)
    with pytest.raises(ValueError, match=r"v_cache: expected batch and seq \(1, 16\)"):
        lk.attn_with_kv_cache(q, k, v, kc, vc[:, :8])


def test_kv_cache_rope_and_block_sparse_args():
    q, k, v = qkv(Sq=32)
    kc, vc = make_cache(1, 16, 2, 64)
    with pytest.raises(TypeError, match=r"rope: expected a Rope3D"):
        lk.attn_with_kv_cache(q, k, v, kc, vc, rope=(4, 4, 4))
    with pytest.raises(ValueError, match=r"rope: expected a grid of at least 3 frames"):
        lk.attn_with_kv_cache(q, k, v, kc, vc, rope=lk.Rope3D((2, 4, 4), 64))
    with pytest.raises(ValueError, match=r"k_cache: expected seq to be a multiple of H\*W = 16"):
        lk.attn_with_kv_cache(q, k, v, kc[:, :10], vc[:, :10], rope=lk.Rope3D((3, 4, 4), 64))
    with pytest.raises(ValueError, match=r"block_sparse.frame_hw: expected \(H, W\)"):
        lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=lk.BlockSparseParams())
    with pytest.raises(TypeError, match=r"block_sparse: expected a BlockSparseParams"):
        lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse={"sparsity": 0.5})
    with pytest.raises(ValueError, match=r"block_sparse.chunk_q: expected each chunk size <="):
        lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=lk.BlockSparseParams(frame_hw=(4, 4)))
    q.requires_grad_(True)
    with pytest.raises(ValueError, match=r"q: attn_with_kv_cache is forward-only"):
        lk.attn_with_kv_cache(q, k, v, kc, vc)


def test_grid_product_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"grid_q: expected t\*h\*w == q's seq length 32, got \(2, 4, 5\)"):
        bsa(q, k, v, grid_q=(2, 4, 5))
    with pytest.raises(ValueError, match=r"grid_k: expected t\*h\*w == k's seq length 32, got \(3, 4, 4\)"):
        bsa(q, k, v, grid_k=(3, 4, 4))
    with pytest.raises(ValueError, match=r"grid_k: expected the same \(h, w\) as grid_q"):
        bsa(q, k, v, grid_k=(2, 2, 8))
    q2, k2, v2 = qkv(Sk=40)
    with pytest.raises(ValueError, match=r"grid_k: k's seq length 40 is not a multiple of grid_q's H\*W = 16"):
        bsa(q2, k2, v2)
    with pytest.raises(TypeError, match=r"grid_q: expected a tuple of 3 ints"):
        bsa(q, k, v, grid_q=(2, 16))
    with pytest.raises(ValueError, match=r"grid_q: expected a tuple"):
        bsa(q, k, v, grid_q=None)


def test_chunk_larger_than_grid():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"chunk_q: expected each chunk size <= grid_q \(2, 4, 4\), got \(4, 4, 4\)"):
        bsa(q, k, v, chunk_q=(4, 4, 4))
    with pytest.raises(ValueError, match=r"chunk_k: expected each chunk size <= grid_k"):
        bsa(q, k, v, chunk_k=(1, 8, 1))
    with pytest.raises(ValueError, match=r"chunk_q: expected 3 positive ints"):
        sel(q, k, chunk_q=(0, 2, 2))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(bad):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"sparsity: expected a float in \[0, 1\), got {bad}"):
        bsa(q, k, v, sparsity=bad)
    with pytest.raises(ValueError, match=r"sparsity: expected a float in \[0, 1\)"):
        sel(q, k, sparsity=bad)
    with pytest.raises(ValueError, match=r"cdf_threshold: expected a float in \[0, 1\]"):
        sel(q, k, cdf_threshold=bad + 2)


def test_selection_rules_both_or_neither():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"sparsity/cdf_threshold: expected at least one selection rule"):
        bsa(q, k, v, sparsity=None, cdf_threshold=None)
    with pytest.raises(ValueError, match=r"sparsity/cdf_threshold: expected at least one selection rule"):
        sel(q, k, sparsity=None)
    s = sel(q, k, sparsity=0.5)
    with pytest.raises(ValueError, match=r"selection: expected either selection= or a selection rule"):
        lk.block_sparse_attn(q, k, v, selection=s, cdf_threshold=0.5)
    with pytest.raises(ValueError, match=r"selection: expected either selection= or a selection rule"):
        lk.block_sparse_attn(q, k, v, selection=s, sparsity=0.5)
    with pytest.raises(TypeError, match=r"selection: expected a BlockSelection"):
        lk.block_sparse_attn(q, k, v, selection=s.indices)
    with pytest.raises(ValueError, match=r"grid_q: expected \(2, 4, 4\) \(selection.grid_q\)"):
        lk.block_sparse_attn(q, k, v, selection=s, grid_q=(1, 4, 8))
    q3, k3, v3 = qkv(B=3)
    with pytest.raises(ValueError, match=r"selection.counts: expected shape \(3, 2, 4\)"):
        lk.block_sparse_attn(q3, k3, v3, selection=s)
    from longcat_kernels.ops.block_sparse_attn.api import _forward

    with pytest.raises(ValueError, match=r"expected at least one selection rule"):
        _forward(q, k, v, None, None, "torch")


@pytest.mark.parametrize("bad", [-1, 33])
def test_prefix_len_out_of_range(bad):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"prefix_len: expected 0 <= prefix_len <= seq = 32, got {bad}"):
        lk.prefix_attn(q, k, v, bad)
    with pytest.raises(TypeError, match=r"prefix_len: expected an int, got float"):
        lk.prefix_attn(q, k, v, 3.0)


def test_scale_and_backend_names():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scale: expected a finite positive float, got -1"):
        lk.prefix_attn(q, k, v, 3, scale=-1.0)
    with pytest.raises(ValueError, match=r"backend: expected one of .* got 'fast'"):
        lk.prefix_attn(q, k, v, 3, backend="fast")


def test_rope_bad_inputs():
    with pytest.raises(ValueError, match=r"head_dim: expected an even int >= 6, got 63"):
        lk.Rope3D((2, 2, 2), 63)
    rope = lk.Rope3D((2, 4, 4), 64)
    with pytest.raises(ValueError, match=r"x: expected seq to be a multiple of H\*W = 16"):
        lk.apply_rope_3d(torch.randn(1, 20, 2, 64), rope)
    with pytest.raises(ValueError, match=r"frame_offset: expected 0 <= frame_offset <= 1"):
        lk.apply_rope_3d(torch.randn(1, 16, 2, 64), rope, frame_offset=2)
    with pytest.raises(ValueError, match=r"x: expected head_dim 64 \(rope.head_dim\), got 128"):
        lk.apply_rope_3d(torch.randn(1, 16, 2, 128), rope)
    q = torch.randn(1, 16, 2, 64)
    with pytest.raises(ValueError, match=r"q_weight: expected shape \(64,\)"):
        lk.qk_norm_rope(q, q, torch.ones(32), torch.ones(64))
    with pytest.raises(ValueError, match=r"out_k: expected shape \(1, 16, 2, 64\)"):
        lk.qk_norm_rope(q, q, torch.ones(64), torch.ones(64), out_k=torch.empty(1, 8, 2, 64))
    with pytest.raises(TypeError, match=r"q: expected a floating dtype"):
        lk.qk_norm_rope(q.long(), q, torch.ones(64), torch.ones(64))
