"""3D RoPE and the q/k RMSNorm + RoPE prologue against SPEC 5 written out longhand.

What every backend of ``qk_norm_rope`` must do with caller buffers is one test parameterised over
``backend`` (``torch``; ``triton``: the CPU interpreter without CUDA). Triton kernel tests (fp64
oracle parity, opcheck, compile, bf16 on GPU) are in ``test_rope_triton_kernels.py``; other RoPE
conventions (Wan, rotate-half, custom axis splits) in ``test_rope_conventions.py``.
"""

import math

import pytest
import torch
from helpers import DEV, TRITON

import longcat_kernels as lk
from longcat_kernels.testing import assert_close, make_tensor, rms_norm_oracle, rope_oracle


def test_part_dims_and_tables_longhand():
    rope = lk.Rope3D((3, 4, 5), 128)
    assert rope.dims == (44, 42, 42)
    assert rope.cos_t.shape == (3, 44) and rope.cos_h.shape == (4, 42) and rope.sin_w.shape == (5, 42)
    assert rope.cos_t.dtype == torch.float32
    # element (pos=2, i=5) of the h part: angle 2 * 10000**(-10/42), repeated at 10 and 11
    a = 2 * 10000 ** (-(2 * 5) / 42)
    assert rope.cos_h[2, 10].item() == pytest.approx(math.cos(a), abs=1e-6)
    assert rope.cos_h[2, 11].item() == pytest.approx(math.cos(a), abs=1e-6)
    assert rope.sin_h[2, 11].item() == pytest.approx(math.sin(a), abs=1e-6)
    cos, sin = rope.tables(1, 2)
    assert cos.shape == (2 * 20, 128)
    # token (t=1+1, h=3, w=4) -> row (1*4 + 3)*5 + 4
    row = (1 * 4 + 3) * 5 + 4
    torch.testing.assert_close(cos[row], torch.cat([rope.cos_t[2], rope.cos_h[3], rope.cos_w[4]]))
    assert lk.Rope3D((1, 1, 1), 64).dims == (24, 20, 20)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("offset", [0, 2])
def test_apply_rope_matches_longhand(D, offset):
    grid = (4, 3, 5)
    rope = lk.Rope3D(grid, D)
    x = make_tensor((2, 2 * 15, 3, D), permuted=True)
    out = lk.apply_rope_3d(x, rope, frame_offset=offset)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, rope_oracle(x, grid, offset))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rope_low_precision_fp32_math(dtype):
    grid = (2, 3, 5)
    rope = lk.Rope3D(grid, 128)
    x = make_tensor((1, 30, 2, 128), dtype)
    out = lk.apply_rope_3d(x, rope)
    assert out.dtype == dtype
    # fp32 math then one rounding: within one ulp-ish of the fp64 result
    assert_close(out, rope_oracle(x, grid), floor=4e-3 if dtype == torch.bfloat16 else 6e-4)


def test_rope_rotation_pairs_are_interleaved():
    """Only the pair (x0, x1) of a position mixes; position 0 of every axis is the identity."""
    rope = lk.Rope3D((2, 2, 2), 64)
    x = torch.zeros(1, 8, 1, 64)
    x[0, :, 0, 0] = 1.0
    out = lk.apply_rope_3d(x, rope)
    assert torch.allclose(out[0, 0, 0], x[0, 0, 0])  # token (0,0,0)
    t1 = 4  # token (1, 0, 0): first t-pair rotated by angle 1
    assert out[0, t1, 0, 0].item() == pytest.approx(math.cos(1.0), abs=1e-6)
    assert out[0, t1, 0, 1].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert out[0, t1, 0, 2:].abs().max() == 0


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope(use_rope, dtype):
    grid = (3, 2, 3)
    rope = lk.Rope3D(grid, 128) if use_rope else None
    q = make_tensor((2, 12, 3, 128), dtype, permuted=True, std=3.0)
    k = make_tensor((2, 12, 2, 128), dtype)
    wq, wk = make_tensor((128,), dtype), make_tensor((128,), dtype)
    oq, ok = lk.qk_norm_rope(q, k, wq, wk, rope, frame_offset=1 if use_rope else 0, backend="torch")
    assert oq.dtype == dtype and ok.shape == k.shape
    # SPEC 6: normalise in fp32, round to the input dtype, times the weight in the input dtype
    nq = (rms_norm_oracle(q, torch.ones(128)).to(dtype) * wq)
    nk = (rms_norm_oracle(k, torch.ones(128)).to(dtype) * wk)
    eq = rope_oracle(nq, grid, 1) if use_rope else nq.double()
    ek = rope_oracle(nk, grid, 1) if use_rope else nk.double()
    floor = 1e-6 if dtype == torch.float32 else 4e-3
    assert_close(oq, eq, floor=floor, name="q")
    assert_close(ok, ek, floor=floor, name="k")


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_qk_norm_rope_out_buffers(backend):
    """out_q / out_k given (out_k = the fresh tail of a [cache; fresh] buffer), heads_q != heads_k:
    results land in the buffers, the cache part stays untouched, values equal the fp64 oracle."""
    grid, D, c = (4, 2, 3), 64, 2
    rope = lk.Rope3D(grid, D, device=DEV)
    q, k = make_tensor((2, 12, 4, D), device=DEV), make_tensor((2, 12, 2, D), device=DEV)
    wq, wk = torch.randn(D, device=DEV), torch.randn(D, device=DEV)
    Sc = c * 6
    buf = torch.full((2, Sc + 12, 2, D), float("nan"), device=DEV)
    out_k = buf[:, Sc:]
    out_q = torch.full_like(q, float("nan"))
    rq, rk = lk.qk_norm_rope(q, k, wq, wk, rope, frame_offset=c, out_q=out_q, out_k=out_k, backend=backend)
    assert rq.data_ptr() == out_q.data_ptr() and rk.data_ptr() == out_k.data_ptr()
    assert not torch.isnan(buf[:, Sc:]).any() and torch.isnan(buf[:, :Sc]).all(), "cache part of the buffer was touched"
    assert_close(rk, rope_oracle(rms_norm_oracle(k, wk), grid, c), name="k into buffer")
    assert_close(rq, rope_oracle(rms_norm_oracle(q, wq), grid, c), name="q")
