"""Round 43 hostile audit of 3D RoPE / the fused q/k norm + RoPE (SPEC 5): Rope3D arguments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import longcat_kernels as lk


def test_axis_dims_numpy_ints_accepted():
    """axis_dims of numpy ints (e.g. read from an array / config) were refused with "expected 3 even
    non-negative ints summing to head_dim 16" although they are exactly that; head_dim, theta, grid and
    frame_offset already take numpy scalars."""
    ref = lk.Rope3D((2, 2, 3), 16, axis_dims=(4, 6, 6))
    for dims in ((np.int64(4), np.int32(6), 6), np.array([4, 6, 6]), [np.int16(4), 6, np.uint8(6)]):
        r = lk.Rope3D((2, 2, 3), 16, axis_dims=dims)
        assert r.dims == (4, 6, 6) and all(type(d) is int for d in r.dims)
        x = torch.randn(1, 12, 2, 16)
        torch.testing.assert_close(lk.apply_rope_3d(x, r), lk.apply_rope_3d(x, ref), rtol=0, atol=0)


def test_apply_rope_half_output_contiguous_for_any_input_layout():
    """apply_rope_3d promises a contiguous result for any strides, but with pairs="half" an x laid out
    [B, H, D, S] in memory (channels_last strides of the 4-D view) came back with strides
    (576, 1, 192, 12): torch.cat kept the input's memory format; .view(B, S, -1) then raised."""
    x = torch.randn(2, 3, 16, 12).permute(0, 3, 1, 2)  # [B, S, H, D] over [B, H, D, S] memory
    assert x.is_contiguous(memory_format=torch.channels_last)
    for pairs in ("interleaved", "half"):
        r = lk.Rope3D((2, 2, 3), 16, pairs=pairs)
        y = lk.apply_rope_3d(x, r)
        assert y.is_contiguous(), (pairs, y.stride())
        torch.testing.assert_close(y, lk.apply_rope_3d(x.contiguous(), r), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_qk_norm_rope_disjoint_outputs_of_one_buffer_accepted(backend):
    """out_q / out_k as two disjoint dense views of one buffer (buf[0], buf[1] of a stacked [2, B, S, H, D]
    buffer, or two token ranges of one) were refused as "overlapping views of one storage":
    torch._C._overlaps is True for any two views of one storage, even 1000s of bytes apart."""
    q, k = torch.randn(1, 32, 2, 32), torch.randn(1, 32, 2, 32)
    w, rope = torch.rand(32) + 0.5, lk.Rope3D((2, 4, 4), 32)
    rq, rk = lk.qk_norm_rope(q, k, w, w, rope, backend="torch")
    buf, seq = torch.empty(2, 1, 32, 2, 32), torch.empty(1, 64, 2, 32)
    for oq, ok in ((buf[0], buf[1]), (buf[1], buf[0]), (seq[:, 32:], seq[:, :32])):
        a, b = lk.qk_norm_rope(q, k, w, w, rope, out_q=oq, out_k=ok, backend=backend)
        assert a is oq and b is ok
        torch.testing.assert_close(oq, rq, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ok, rk, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^out_q, out_k: expected disjoint output buffers"):  # still refused
        lk.qk_norm_rope(q, k, w, w, rope, out_q=seq[:, 31:63], out_k=seq[:, :32], backend=backend)
