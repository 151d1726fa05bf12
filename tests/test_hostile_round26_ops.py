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
