"""Hostile inputs, round 26 (the public ops as a library user calls them: registered torch.library ops,
torch.compile, aliasing): each test names the silent behaviour it pins."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk


def _ref_qk(q, k, qw, kw, rope):
    return lk.qk_norm_rope(q.double(), k.double(), qw.double(), kw.double(), rope, backend="torch")


@pytest.mark.triton_interpret
def test_qk_norm_rope_swapped_outputs_under_compile_eager_backend():
    """``out_q=k, out_k=q`` (each result written over the other input): the eager wrapper routes it
    through temporaries, but that check is skipped while dynamo traces, and ``torch.compile(backend=
    "eager")`` (no functionalization) ran the Triton prologue on the aliased buffers: k was read after
    out_q had overwritten it, so out_k came back silently wrong (errors of order 1)."""
    rope = lk.Rope3D((2, 2, 4), 16)
    buf = torch.randn(1, 16, 2, 2, 16)
    qw, kw = torch.rand(16) + 0.5, torch.rand(16) + 0.5
    rq, rk = _ref_qk(buf[:, :, 0], buf[:, :, 1], qw, kw, rope)

    def f(b):
        q, k = b[:, :, 0], b[:, :, 1]
        return lk.qk_norm_rope(q, k, qw, kw, rope, backend="triton", out_q=k, out_k=q)

    torch._dynamo.reset()
    with torch.no_grad():
        oq, ok = torch.compile(f, backend="eager", fullgraph=True)(buf)
    torch.testing.assert_close(oq.double(), rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok.double(), rk, atol=1e-5, rtol=1e-5)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("heads_k", [2, 1])  # one fused launch (same shapes), two launches (q first)
def test_registered_qk_norm_rope_op_with_an_output_over_the_other_input(heads_k):
    """``torch.ops.longcat_kernels.qk_norm_rope`` (a registered op any caller or traced graph can reach)
    with ``out_q`` over k's memory: the kernel wrote q's result into k before reading k, and k's result
    was computed from q's normalised values."""
    rope = lk.Rope3D((2, 2, 4), 16)
    from longcat_kernels.ops.rope.triton import rope_table_args

    tabs, gh, gw = rope_table_args(rope)
    q = torch.randn(1, 16, 2, 16)
    kbuf = torch.randn(1, 16, 2, 16)
    k = kbuf[:, :, :heads_k]
    qw, kw = torch.rand(16) + 0.5, torch.rand(16) + 0.5
    rq, rk = _ref_qk(q, k, qw, kw, rope)
    out_q, out_k = kbuf, torch.empty_like(k)  # q's result over k (and, with one k head, beside it)
    torch.ops.longcat_kernels.qk_norm_rope(q, k, qw, kw, *tabs, gh, gw, 0, 1e-6, out_q, out_k)
    torch.testing.assert_close(out_q.double(), rq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k.double(), rk, atol=1e-5, rtol=1e-5)


@pytest.mark.triton_interpret
def test_registered_rope_3d_op_with_an_output_shifted_over_its_input():
    """``torch.ops.longcat_kernels.rope_3d(x, ..., out)`` with ``out`` a view of x's storage one frame
    later: programs read tokens another program had already rotated in place (rotated twice)."""
    rope = lk.Rope3D((5, 2, 4), 16)
    from longcat_kernels.ops.rope.triton import rope_table_args

    tabs, gh, gw = rope_table_args(rope)
    buf = torch.randn(1, 40, 2, 16)
    x, out = buf[:, :32], buf[:, 8:]
    ref = lk.apply_rope_3d(x.double(), rope, 0)
    torch.ops.longcat_kernels.rope_3d(x, *tabs, gh, gw, 0, out)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def _bsa_inputs(strided: bool):
    """q, k, v [1, 32, 2, 16] on a (2, 4, 4) grid; strided: every other element of a [.., 32] last dim."""
    qkv = [torch.randn(1, 32, 2, 32)[..., ::2] for _ in range(3)]
    return qkv if strided else [t.contiguous() for t in qkv]


@pytest.mark.triton_interpret
def test_registered_bsa_ops_take_a_last_dim_stride_other_than_one():
    """``torch.ops.longcat_kernels.bsa_fwd`` / ``bsa_bwd`` / ``bsa_pool_scores`` index head_dim as if its
    stride were 1 (the public functions made it so, the registered ops did not): a q/k/v/grad view with a
    last-dim stride of 2 gave silently wrong outputs, gradients and block scores (errors of order 1).
    Non-contiguous ``indices``/``counts``/``lse`` were read as contiguous the same way."""
    o = torch.ops.longcat_kernels
    G, C = [2, 4, 4], [1, 2, 2]
    torch.manual_seed(0)
    q, k, v = _bsa_inputs(strided=True)
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    sel = lk.select_blocks(qc, kc, grid_q=G, chunk_q=C, sparsity=0.5, backend="torch")
    # the same selection (and lse below) as stride-2 views
    cnt_t = torch.stack([sel.counts, sel.counts], -1)[..., 0]
    idx_t = torch.stack([sel.indices, sel.indices], -1)[..., 0]
    assert not cnt_t.is_contiguous() and not idx_t.is_contiguous()
    want_o, want_l = o.bsa_fwd(qc, kc, vc, sel.indices, sel.counts, G, G, C, C, 0.25)
    got_o, got_l = o.bsa_fwd(q, k, v, idx_t, cnt_t, G, G, C, C, 0.25)
    torch.testing.assert_close(got_o, want_o)
    torch.testing.assert_close(got_l, want_l)
    do = torch.randn(1, 32, 2, 32)[..., ::2]
    lse_t = torch.stack([want_l, want_l], -1)[..., 0]
    want = o.bsa_bwd(do.contiguous(), qc, kc, vc, want_o, want_l, sel.indices, sel.counts, G, G, C, C, 0.25, True)
    got = o.bsa_bwd(do, q, k, v, want_o.transpose(1, 2).contiguous().transpose(1, 2), lse_t, idx_t, cnt_t,
                    G, G, C, C, 0.25, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    want_s = o.bsa_pool_scores(qc, kc, G, G, C, C)[2]
    got_s = o.bsa_pool_scores(q, k, G, G, C, C)[2]
    torch.testing.assert_close(got_s, want_s)
