"""Round 50: the torch.library ops (``longcat_kernels::*``) called directly, opchecked, compiled and exported."""

from __future__ import annotations

import importlib
import pytest
import torch
import torch._dynamo

import longcat_kernels as lk

pytestmark = pytest.mark.triton_interpret

GQ, CQ = [2, 3, 5], [1, 2, 4]  # odd extents, chunk dividing none of them
NQ = 2 * 2 * 2


def _ops():
    for mod in ("block_sparse_attn", "kv_cache_attn", "rope"):  # importing registers the ops
        importlib.import_module(f"longcat_kernels.ops.{mod}.triton")
    return torch.ops.longcat_kernels


def _selection(B, H, nq, nk, sel, gen):
    idx = torch.stack([torch.randperm(nk, generator=gen)[:sel] for _ in range(B * H * nq)]).view(B, H, nq, sel)
    cnt = torch.randint(0, sel + 1, (B, H, nq), generator=gen)
    return idx.to(torch.int32), cnt.to(torch.int32)


def _qkv(B, S, H, D, dtype=torch.float32):
    return tuple(torch.randn(B, S, H, D, dtype=dtype) for _ in range(3))


def _no_nan(*ts):
    for t in ts:
        assert not torch.isnan(t).any()


# ---------------------------------------------------------------------------------------------------------
# bugs: the ops took k/v of another dtype than q (silently mixed precision, or a Triton assertion) and
# float block ids (a Triton "unexpected type fp32"), where the public functions raise TypeError
# ---------------------------------------------------------------------------------------------------------

def _dtype_calls(ops, q, k, v, idx, cnt):
    S = q.shape[1]
    return {
        "bsa_fwd": lambda k, v: ops.bsa_fwd(q, k, v, idx, cnt, GQ, GQ, CQ, CQ, 0.25),
        "kv_cache_bsa_fwd": lambda k, v: ops.kv_cache_bsa_fwd(q, k, v, None, None, idx, cnt, GQ, GQ, CQ, CQ, 0.25,
                                                              False),
        "kv_cache_attn_fwd": lambda k, v: ops.kv_cache_attn_fwd(q, k, v, None, None, None, None, None, None, None,
                                                                None, 3, 5, 0.25, False),
        "prefix_attn_fwd": lambda k, v: ops.prefix_attn_fwd(q, k, v, S // 2, 0.25, False),
        "bsa_pool_scores": lambda k, v: ops.bsa_pool_scores(q, k if v is None else v, GQ, GQ, CQ, CQ),
    }


@pytest.mark.parametrize("op", ["bsa_fwd", "kv_cache_bsa_fwd", "kv_cache_attn_fwd", "prefix_attn_fwd",
                                "bsa_pool_scores"])
@pytest.mark.parametrize("which", ["k", "v"])
def test_op_rejects_kv_of_another_dtype(op, which):
    """``v`` fp16 with fp32 q and k: bsa_fwd, kv_cache_bsa_fwd and kv_cache_attn_fwd ran and returned fp32
    from a mixed-precision product; k fp16 failed inside Triton ("Both operands must be same dtype")."""
    ops = _ops()
    gen = torch.Generator().manual_seed(50)
    q, k, v = _qkv(1, 30, 2, 16)
    idx, cnt = _selection(1, 2, NQ, NQ, 3, gen)
    call = _dtype_calls(ops, q, k, v, idx, cnt)[op]
    if which == "k":
        bad = (k.half(), v) if op != "bsa_pool_scores" else (k.half(), None)
    else:
        if op == "bsa_pool_scores":
            pytest.skip("bsa_pool_scores takes no v")
        bad = (k, v.half())
    with pytest.raises(TypeError, match=rf"{op}: {which}: expected q's dtype torch.float32"):
        call(*bad)
    out = call(k, v if op != "bsa_pool_scores" else None)  # the same call of one dtype runs
    _no_nan(*out)


def test_op_rejects_integer_q():
    ops = _ops()
    q, k, v = (t.to(torch.int32) for t in _qkv(1, 30, 2, 16))
    with pytest.raises(TypeError, match="prefix_attn_fwd: q: expected a floating dtype"):
        ops.prefix_attn_fwd(q, k, v, 3, 0.25, False)


@pytest.mark.parametrize("op", ["bsa_fwd", "bsa_bwd", "kv_cache_bsa_fwd"])
@pytest.mark.parametrize("name", ["indices", "counts"])
def test_op_rejects_float_block_ids(op, name):
    ops = _ops()
    gen = torch.Generator().manual_seed(51)
    q, k, v = _qkv(1, 30, 2, 16)
    idx, cnt = _selection(1, 2, NQ, NQ, 3, gen)
    if name == "indices":
        idx = idx.float()
    else:
        cnt = cnt.float()
    with pytest.raises(TypeError, match=rf"{op}: {name}: expected an integer dtype"):
        if op == "bsa_fwd":
            ops.bsa_fwd(q, k, v, idx, cnt, GQ, GQ, CQ, CQ, 0.25)
        elif op == "bsa_bwd":
            lse = torch.zeros(1, 2, 30)
            ops.bsa_bwd(q, q, k, v, q, lse, idx, cnt, GQ, GQ, CQ, CQ, 0.25, False, None)
        else:
            ops.kv_cache_bsa_fwd(q, k, v, None, None, idx, cnt, GQ, GQ, CQ, CQ, 0.25, False)


def test_bsa_fwd_int64_indices_match_int32():
    """Pinned: int64 block ids (the kernel loads them typed) give the int32 result, bit for bit."""
    ops = _ops()
    gen = torch.Generator().manual_seed(52)
    q, k, v = _qkv(1, 30, 2, 16)
    idx, cnt = _selection(1, 2, NQ, NQ, 3, gen)
    a = ops.bsa_fwd(q, k, v, idx, cnt, GQ, GQ, CQ, CQ, 0.25)
    b = ops.bsa_fwd(q, k, v, idx.long(), cnt.long(), GQ, GQ, CQ, CQ, 0.25)
    _no_nan(a[0])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------------------
# pinned: opcheck (schema, fake, autograd registration, aot dispatch) on odd shapes
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,grid,chunk,D", [(1, (2, 3, 5), (1, 2, 4), 16), (3, (3, 2, 3), (2, 2, 2), 32)])
def test_bsa_ops_opcheck_odd_shapes(B, grid, chunk, D):
    ops = _ops()
    gen = torch.Generator().manual_seed(53 + B)
    H, S = 2, grid[0] * grid[1] * grid[2]
    nq = 1
    for g, c in zip(grid, chunk):
        nq *= -(-g // c)
    q, k, v = (t.requires_grad_() for t in _qkv(B, S, H, D))
    idx, cnt = _selection(B, H, nq, nq, 2, gen)
    g_, c_ = list(grid), list(chunk)
    torch.library.opcheck(ops.bsa_fwd.default, (q, k, v, idx, cnt, g_, g_, c_, c_, 0.3))
    with torch.no_grad():
        out, lse = ops.bsa_fwd(q, k, v, idx, cnt, g_, g_, c_, c_, 0.3)
    _no_nan(out)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    do = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(ops.bsa_bwd.default, (do, qd, kd, vd, out, lse, idx, cnt, g_, g_, c_, c_, 0.3, False,
                                                    dlse))
    torch.library.opcheck(ops.bsa_pool_scores.default, (qd, kd, g_, g_, c_, c_))
    torch.library.opcheck(ops.bsa_topk.default, (torch.randn(B, H, nq, nq), max(1, nq // 2)))
    kc, vc = torch.randn(1, S, H, D), torch.randn(1, S, H, D)
    gk = [2 * grid[0], grid[1], grid[2]]
    nk = nq // (-(-grid[0] // chunk[0])) * (-(-gk[0] // chunk[0]))
    idx2, _ = _selection(B, H, nq, nk, 2, gen)
    torch.library.opcheck(ops.kv_cache_bsa_fwd.default, (qd, kd, vd, kc, vc, idx2, cnt, g_, gk, c_, c_, 0.3, True))
    torch.library.opcheck(ops.kv_cache_attn_fwd.default,
                          (qd, kd, vd, kc, vc, None, None, None, None, None, None, grid[1], grid[2], 0.3, True))
    torch.library.opcheck(ops.prefix_attn_fwd.default, (qd, kd, vd, S // 2, 0.3, False))


@pytest.mark.parametrize("B,D,grid,fo", [(1, 18, (3, 2, 3), 1), (3, 32, (2, 3, 1), 0)])
def test_rope_ops_opcheck(B, D, grid, fo):
    from longcat_kernels.ops.rope.triton import rope_table_args

    ops = _ops()
    tabs, gh, gw = rope_table_args(lk.Rope3D(grid, D))
    S = (grid[0] - fo) * gh * gw
    x, k = torch.randn(B, S, 2, D), torch.randn(B, S, 1, D)
    qw, kw = torch.randn(D), torch.randn(D)
    torch.library.opcheck(ops.rope_3d.default, (x, *tabs, gh, gw, fo, torch.empty_like(x)))
    torch.library.opcheck(ops.qk_norm_rope.default,
                          (x, k, qw, kw, *tabs, gh, gw, fo, 1e-6, torch.empty_like(x), torch.empty_like(k)))
    torch.library.opcheck(ops.qk_norm_rope.default, (x, k, qw, kw, None, None, None, None, None, None, gh, gw, fo,
                                                     1e-6, torch.empty_like(x), torch.empty_like(k)))


@pytest.mark.parametrize("B,H", [(0, 2), (2, 0)])
def test_ops_empty_batch_or_heads_opcheck(B, H):
    ops = _ops()
    q, k, v = _qkv(B, 30, H, 16)
    idx, cnt = torch.zeros(B, H, NQ, 1, dtype=torch.int32), torch.ones(B, H, NQ, dtype=torch.int32)
    torch.library.opcheck(ops.bsa_fwd.default, (q, k, v, idx, cnt, GQ, GQ, CQ, CQ, 0.3))
    torch.library.opcheck(ops.bsa_pool_scores.default, (q, k, GQ, GQ, CQ, CQ))
    torch.library.opcheck(ops.kv_cache_bsa_fwd.default, (q, k, v, None, None, idx, cnt, GQ, GQ, CQ, CQ, 0.3, True))
    torch.library.opcheck(ops.prefix_attn_fwd.default, (q, k, v, 3, 0.3, True))


# ---------------------------------------------------------------------------------------------------------
# pinned: compiled (dynamic) graphs follow non-tensor arguments; export
# ---------------------------------------------------------------------------------------------------------

def test_compiled_ops_follow_non_tensor_args():
    ops = _ops()
    torch._dynamo.reset()
    q, k = torch.randn(1, 24, 2, 16), torch.randn(1, 24, 2, 16)

    def pool(q, k, g, c):
        return ops.bsa_pool_scores(q, k, g, g, c, c)

    cp = torch.compile(pool, backend="aot_eager", fullgraph=True, dynamic=True)
    for g, c in (([2, 3, 4], [1, 2, 2]), ([2, 3, 4], [2, 3, 3]), ([4, 3, 2], [1, 2, 2]), ([1, 4, 6], [1, 3, 4])):
        got, want = cp(q, k, g, c), pool(q, k, g, c)
        for a, b in zip(got, want):
            _no_nan(a)
            torch.testing.assert_close(a, b)

    def topk(s, n):
        return ops.bsa_topk(s, n)

    ct = torch.compile(topk, backend="aot_eager", fullgraph=True, dynamic=True)
    s = torch.randn(2, 3, 7)
    for n in (1, 3, 7):
        assert torch.equal(ct(s, n), topk(s, n))

    def bsa(q, k, v, sp, ch):
        return lk.block_sparse_attn(q, k, v, grid_q=(2, 3, 4), chunk_q=ch, sparsity=sp, backend="triton")

    cb = torch.compile(bsa, backend="aot_eager", fullgraph=True, dynamic=True)
    v = torch.randn(1, 24, 2, 16)
    for sp, ch in ((0.5, (1, 2, 2)), (0.75, (1, 2, 2)), (0.5, (1, 2, 3))):
        got, want = cb(q, k, v, sp, ch), bsa(q, k, v, sp, ch)
        _no_nan(got)
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_export_block_sparse_attn_triton():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return lk.block_sparse_attn(q, k, v, grid_q=(2, 3, 4), chunk_q=(1, 2, 2), sparsity=0.5, backend="triton")

    q, k, v = _qkv(3, 24, 2, 16)
    ep = torch.export.export(M(), (q, k, v))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"longcat_kernels.bsa_fwd.default", "longcat_kernels.bsa_topk.default"} <= names
    got = ep.module()(q, k, v)
    _no_nan(got)
    torch.testing.assert_close(got, M()(q, k, v))
