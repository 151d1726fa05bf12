"""Hostile audit, round 39: numerics and the op surface (registered ops called directly).

The public functions validate their arguments; ``torch.ops.longcat_kernels.*`` (reachable by any caller and
by traced graphs) took the geometry as given, where the csrc twins (csrc/ops.cpp) check it.
"""

from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk

pytestmark = pytest.mark.triton_interpret

triton = pytest.importorskip("triton")

import importlib  # noqa: E402

from longcat_kernels.ops.rope.triton import rope_table_args  # noqa: E402

for _m in ("block_sparse_attn", "kv_cache_attn"):  # registers their torch.ops
    importlib.import_module(f"longcat_kernels.ops.{_m}.triton")

L = torch.ops.longcat_kernels


def _qkv(B=1, S=12, H=2, D=16):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, S, H, D, generator=g) for _ in range(3))


@pytest.mark.parametrize("prefix_len", [-1, -5, 13, 40])
def test_registered_prefix_attn_op_refuses_a_prefix_outside_the_sequence(prefix_len):
    """``prefix_attn_fwd`` with prefix_len < 0 or > seq sliced k[:, :P] / k[:, P:] as Python slices and
    returned plain dense attention (max diff 0 against prefix_len=0), silently; the csrc op raises."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="prefix_len"):
        L.prefix_attn_fwd(q, k, v, prefix_len, 0.25)
    # the edges stay valid and equal the public op
    for p in (0, 5, 12):
        out, _ = L.prefix_attn_fwd(q, k, v, p, 0.25)
        torch.testing.assert_close(out, lk.prefix_attn(q, k, v, p, scale=0.25, backend="torch"))


def test_registered_prefix_attn_op_refuses_keys_of_another_length():
    """``prefix_attn_fwd`` with k/v longer than q ran (q rows past the prefix saw keys no query has); the
    csrc op and ``prefix_attn`` require one sequence."""
    q, k, v = _qkv()
    k2, v2 = torch.cat([k, k], 1), torch.cat([v, v], 1)
    with pytest.raises(ValueError, match="k: expected seq 12"):
        L.prefix_attn_fwd(q, k2, v2, 4, 0.25)


def _selection(q, k, grid=(1, 3, 4), chunk=(1, 2, 2)):
    return lk.select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")


@pytest.mark.parametrize("case", ["grid_q_product", "grid_k_product", "grid_k_hw", "chunk_zero", "grid_two",
                                  "indices_shape", "k_heads"])
def test_registered_bsa_fwd_refuses_a_geometry_it_would_index_out_of_bounds(case):
    """``bsa_fwd`` with a grid_q whose product is not q's seq (2x3x4 for 12 tokens) wrote out of bounds: the
    process died (SIGSEGV / "corrupted size vs. prev_size" under the interpreter); a chunk of 0 was a
    ZeroDivisionError, a 2-entry grid an unpacking error, a selection of other shape or k with fewer heads
    read past the tensors. Now a ValueError naming the argument."""
    q, k, v = _qkv()
    sel = _selection(q, k)
    args = dict(indices=sel.indices, counts=sel.counts, grid_q=[1, 3, 4], grid_k=[1, 3, 4], chunk_q=[1, 2, 2],
                chunk_k=[1, 2, 2])
    match = {"grid_q_product": "grid_q", "grid_k_product": "grid_k", "grid_k_hw": "grid_k", "chunk_zero": "chunk_q",
             "grid_two": "grid_q", "indices_shape": "indices", "k_heads": "k"}[case]
    if case == "grid_q_product":
        args["grid_q"] = [2, 3, 4]
    elif case == "grid_k_product":
        args["grid_k"] = [2, 3, 4]
    elif case == "grid_k_hw":
        args["grid_k"] = [1, 4, 3]
    elif case == "chunk_zero":
        args["chunk_q"] = [1, 0, 2]
    elif case == "grid_two":
        args["grid_q"] = [3, 4]
    elif case == "indices_shape":
        args["indices"] = sel.indices[:, :, :2]
    elif case == "k_heads":
        k, v = k[:, :, :1], v[:, :, :1]
    with pytest.raises(ValueError, match=match):
        L.bsa_fwd(q, k, v, args["indices"], args["counts"], args["grid_q"], args["grid_k"], args["chunk_q"],
                  args["chunk_k"], 0.25)


def test_registered_bsa_ops_still_run_valid_geometry():
    """The checks refuse nothing the public functions pass: Tq != Tk, partial edge blocks, other chunk_k."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2 * 3 * 5, 2, 16, generator=g)
    k, v = (torch.randn(2, 3 * 3 * 5, 2, 16, generator=g) for _ in range(2))
    sel = lk.select_blocks(q, k, grid_q=(2, 3, 5), grid_k=(3, 3, 5), chunk_q=(1, 2, 2), chunk_k=(2, 2, 3),
                           sparsity=0.5, backend="torch")
    want = lk.block_sparse_attn(q, k, v, selection=sel, backend="torch")
    out, _ = L.bsa_fwd(q, k, v, sel.indices, sel.counts, [2, 3, 5], [3, 3, 5], [1, 2, 2], [2, 2, 3], 16 ** -0.5)
    torch.testing.assert_close(out, want)
    pq, pk, _ = L.bsa_pool_scores(q, k, [2, 3, 5], [3, 3, 5], [1, 2, 2], [2, 2, 3])
    assert (pq.shape[2], pk.shape[2]) == (sel.counts.shape[2], sel.num_k_blocks)


def test_registered_bsa_bwd_and_pool_scores_refuse_a_grid_of_another_length():
    """``bsa_bwd`` and ``bsa_pool_scores`` took a grid_q of 24 tokens for q of 12 (pool_scores returned 8
    pooled blocks read past q, silently)."""
    q, k, v = _qkv()
    sel = _selection(q, k)
    with pytest.raises(ValueError, match="grid_q"):
        L.bsa_pool_scores(q, k, [2, 3, 4], [1, 3, 4], [1, 2, 2], [1, 2, 2])
    out, lse = L.bsa_fwd(q, k, v, sel.indices, sel.counts, [1, 3, 4], [1, 3, 4], [1, 2, 2], [1, 2, 2], 0.25)
    with pytest.raises(ValueError, match="grid_q"):
        L.bsa_bwd(torch.ones_like(out), q, k, v, out, lse, sel.indices, sel.counts, [2, 3, 4], [1, 3, 4],
                  [1, 2, 2], [1, 2, 2], 0.25, False)


def test_registered_kv_cache_bsa_op_refuses_a_key_grid_of_another_length():
    """``kv_cache_bsa_fwd`` with a grid_k whose product is not cache + fresh keys read and wrote out of
    bounds (the process died with SIGSEGV under the interpreter)."""
    q, k, v = _qkv()
    kc, vc = k[:, :4].clone(), v[:, :4].clone()  # 4 cached tokens: the key grid must hold 16
    q3, k3, v3 = (torch.randn(1, 12, 2, 16) for _ in range(3))
    kc3, vc3 = (torch.randn(1, 12, 2, 16) for _ in range(2))
    sel = lk.select_blocks(q3, torch.cat([kc3, k3], 1), grid_q=(1, 3, 4), grid_k=(2, 3, 4), chunk_q=(1, 2, 2),
                           sparsity=0.5, backend="torch")
    good, _ = L.kv_cache_bsa_fwd(q3, k3, v3, kc3, vc3, sel.indices, sel.counts, [1, 3, 4], [2, 3, 4], [1, 2, 2],
                                 [1, 2, 2], 0.25)
    want = lk.attn_with_kv_cache(q3, k3, v3, kc3, vc3, scale=0.25, backend="torch",
                                 block_sparse=lk.BlockSparseParams(selection=sel, sparsity=None, frame_hw=(3, 4)))
    torch.testing.assert_close(good, want)
    with pytest.raises(ValueError, match="grid_k"):
        L.kv_cache_bsa_fwd(q, k, v, kc, vc, sel.indices, sel.counts, [1, 3, 4], [2, 3, 4], [1, 2, 2], [1, 2, 2], 0.25)
    with pytest.raises(ValueError, match="k_cache"):
        L.kv_cache_bsa_fwd(q3, k3, v3, kc3[:, :, :1], vc3[:, :, :1], sel.indices, sel.counts, [1, 3, 4], [2, 3, 4],
                           [1, 2, 2], [1, 2, 2], 0.25)


@pytest.mark.parametrize("case", ["offset_past_grid", "grid_h_zero", "partial_frame", "short_sin"])
def test_registered_rope_op_refuses_tables_that_do_not_cover_its_input(case):
    """``rope_3d`` read its tables out of bounds and returned garbage, silently: frame_offset 5 on a 2-frame
    table, grid_h 0, a seq of 10 tokens on a 3x4 grid, a sin table shorter than its cos table (the csrc op
    refuses each)."""
    q, _, _ = _qkv()
    rope = lk.Rope3D((2, 3, 4), 16)
    tabs, gh, gw = rope_table_args(rope)
    x, out, off = q, torch.empty_like(q), 0
    if case == "offset_past_grid":
        off = 5
    elif case == "grid_h_zero":
        gh = 0
    elif case == "partial_frame":
        x, out = q[:, :10], torch.empty_like(q[:, :10])
    elif case == "short_sin":
        tabs[1] = tabs[1][:1]
    with pytest.raises(ValueError, match="rope_3d"):
        L.rope_3d(x, *tabs, gh, gw, off, out)
    if case == "offset_past_grid":  # the last frame that fits still runs
        L.rope_3d(q, *tabs, gh, gw, 1, out)
        torch.testing.assert_close(out, lk.apply_rope_3d(q, rope, 1))


def test_registered_qk_norm_rope_and_cached_attention_ops_refuse_uncovered_tables():
    """``qk_norm_rope`` and ``kv_cache_attn_fwd`` rotated at table rows past the tables' end (frame offset
    past the grid; a cache of 5 tokens on a 3x4 grid put the fresh tokens at frame 0), silently."""
    q, k, v = _qkv()
    rope = lk.Rope3D((2, 3, 4), 16)
    tabs, gh, gw = rope_table_args(rope)
    w = torch.ones(16)
    with pytest.raises(ValueError, match="qk_norm_rope"):
        L.qk_norm_rope(q, k, w, w, *tabs, gh, gw, 2, 1e-6, torch.empty_like(q), torch.empty_like(k))
    with pytest.raises(ValueError, match="kv_cache_attn_fwd"):
        L.kv_cache_attn_fwd(q, k, v, k[:, :5], v[:, :5], *tabs, gh, gw, 0.25)
    # a cache of a whole frame on a grid long enough: runs and equals the public op
    rope3 = lk.Rope3D((3, 3, 4), 16)
    tabs3, _, _ = rope_table_args(rope3)
    out, _ = L.kv_cache_attn_fwd(q, k, v, k, v, *tabs3, gh, gw, 0.25)
    torch.testing.assert_close(out, lk.attn_with_kv_cache(q, k, v, k, v, rope=rope3, scale=0.25, backend="torch"))


def test_numpy_float32_scalars_are_taken_as_the_numpy_ints_are():
    """A numpy float32 sparsity / cdf_threshold / scale / softmax_scale / eps / theta (e.g. read from an
    ``np.float32`` array of settings) was a TypeError ("expected a float, got float32") while numpy ints
    (prefix_len, frame_offset, grids) and numpy float64 were taken; now each is used as the Python float of
    its value, giving exactly the result of that float."""
    np = pytest.importorskip("numpy")
    f32 = np.float32
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 24, 2, 16, generator=g) for _ in range(3))
    kc, vc = (torch.randn(1, 12, 2, 16, generator=g) for _ in range(2))
    kw = dict(grid_q=(2, 3, 4), chunk_q=(1, 2, 2), backend="torch")
    for sp, cdf in ((f32(0.5), None), (None, f32(0.7)), (f32(0.75), f32(0.3))):
        want = lk.block_sparse_attn(q, k, v, sparsity=None if sp is None else float(sp),
                                    cdf_threshold=None if cdf is None else float(cdf), scale=float(f32(0.3)), **kw)
        torch.testing.assert_close(lk.block_sparse_attn(q, k, v, sparsity=sp, cdf_threshold=cdf, scale=f32(0.3), **kw),
                                   want, rtol=0, atol=0)
        sel = lk.select_blocks(q, k, sparsity=sp, cdf_threshold=cdf, **kw)
        assert torch.equal(sel.counts, lk.select_blocks(q, k, sparsity=None if sp is None else float(sp),
                                                        cdf_threshold=None if cdf is None else float(cdf),
                                                        **kw).counts)
        bs = lk.BlockSparseParams(sparsity=sp, cdf_threshold=cdf, chunk_q=(1, 2, 2), frame_hw=(3, 4))
        bs_f = lk.BlockSparseParams(sparsity=None if sp is None else float(sp),
                                    cdf_threshold=None if cdf is None else float(cdf), chunk_q=(1, 2, 2), frame_hw=(3, 4))
        torch.testing.assert_close(lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="torch"),
                                   lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs_f, backend="torch"),
                                   rtol=0, atol=0)
    s = float(f32(0.3))
    torch.testing.assert_close(lk.prefix_attn(q, k, v, 5, scale=f32(0.3)), lk.prefix_attn(q, k, v, 5, scale=s))
    torch.testing.assert_close(lk.attn_with_kv_cache(q, k, v, kc, vc, scale=f32(0.3)),
                               lk.attn_with_kv_cache(q, k, v, kc, vc, scale=s))
    torch.testing.assert_close(lk.flash_attn_with_kvcache(q, kc, vc, k, v, softmax_scale=f32(0.3)),
                               lk.flash_attn_with_kvcache(q, kc, vc, k, v, softmax_scale=s))
    rope = lk.Rope3D((4, 3, 4), np.int64(16), theta=f32(10000))
    assert rope.theta == 10000.0 and rope.head_dim == 16 and type(rope.head_dim) is int
    w = torch.ones(16)
    for a, b in zip(lk.qk_norm_rope(q, k, w, w, rope, 1, eps=f32(1e-6), backend="torch"),
                    lk.qk_norm_rope(q, k, w, w, rope, 1, eps=float(f32(1e-6)), backend="torch")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(4, 32, generator=g)
    for a, b in zip(lk.fp8_layer_norm_quantize(x, eps=f32(1e-5)), lk.fp8_layer_norm_quantize(x, eps=float(f32(1e-5)))):
        assert torch.equal(a.float(), b.float())
    # still refused: bools and non-numbers, named
    with pytest.raises(TypeError, match="sparsity"):
        lk.select_blocks(q, k, sparsity=np.bool_(True), **kw)
    with pytest.raises(TypeError, match="scale"):
        lk.prefix_attn(q, k, v, 5, scale="0.3")
