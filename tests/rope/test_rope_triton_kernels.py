"""Triton 3D RoPE and fused q/k RMSNorm + RoPE prologue vs the fp64 oracle and the torch reference.

CPU: Triton interpreter (TRITON_INTERPRET=1, set by conftest), fp32/fp16, tiny grids.
GPU (marker triton_gpu): bf16 and a strided [cache; fresh] buffer write.
"""
from __future__ import annotations

import pytest
import torch

from longcat_kernels import Rope3D, apply_rope_3d, qk_norm_rope
from longcat_kernels.testing import assert_close
from longcat_kernels.testing.inputs import make_tensor
from longcat_kernels.testing.oracle import rms_norm_oracle, rope_oracle

rt = pytest.importorskip("longcat_kernels.ops.rope.triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]


def _tt(grid, frames, heads, D, dtype, permuted=False, batch=2):
    S = frames * grid[1] * grid[2]
    return make_tensor((batch, S, heads, D), dtype, DEV, permuted=permuted)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("grid,frame_offset,D", [((4, 3, 5), 1, 64), ((3, 2, 3), 0, 128),
                                                  ((5, 3, 2), 2, 48)])
@pytest.mark.parametrize("permuted", [False, True])
def test_apply_rope_triton_matches_oracle(dtype, grid, frame_offset, D, permuted):
    rope = Rope3D(grid, D, device=DEV)
    x = _tt(grid, grid[0] - frame_offset, 3, D, dtype, permuted)
    out = rt.apply_rope_3d_triton(x, rope, frame_offset)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    ref = apply_rope_3d(x, rope, frame_offset)  # torch reference, same rounding point
    assert_close(out, rope_oracle(x, grid, frame_offset), baseline=ref, name="rope")
    if dtype == torch.float32:
        assert_close(out, ref.double(), floor=1e-6, name="rope vs reference")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("use_rope", [True, False])
def test_qk_norm_rope_triton_matches_oracle(dtype, use_rope):
    grid, D = (4, 3, 5), 64
    rope = Rope3D(grid, D, device=DEV) if use_rope else None
    c = 1 if use_rope else 0  # frame offset: without a rope only 0 is accepted
    q = _tt(grid, 3, 4, D, dtype, permuted=True)
    k = _tt(grid, 3, 4, D, dtype)
    qw = (1 + 0.2 * torch.randn(D)).to(DEV, dtype)
    kw = (1 + 0.2 * torch.randn(D)).to(DEV, dtype)
    oq, ok = qk_norm_rope(q, k, qw, kw, rope, c, 1e-6, backend="triton")
    rq, rk = qk_norm_rope(q, k, qw, kw, rope, c, 1e-6, backend="torch")
    for name, x, w, o, r in (("q", q, qw, oq, rq), ("k", k, kw, ok, rk)):
        exp = rms_norm_oracle(x, w)
        if use_rope:
            exp = rope_oracle(exp, grid, c)
        assert_close(o, exp, baseline=r, name=name)
        if dtype == torch.float32:
            assert_close(o, r.double(), floor=1e-6, name=f"{name} vs reference")


@pytest.mark.triton_interpret
def test_rope_triton_forward_only():
    rope = Rope3D((2, 2, 2), 64, device=DEV)
    x = _tt((2, 2, 2), 2, 1, 64, torch.float32).requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward only"):
        rt.apply_rope_3d_triton(x, rope, 0)
    w = torch.ones(64, device=DEV)
    with pytest.raises(RuntimeError, match="forward only"):
        rt.qk_norm_rope_triton(x, x, w, w, rope, 0)
    with torch.no_grad():
        rt.apply_rope_3d_triton(x, rope, 0)


@pytest.mark.triton_interpret
def test_rope_triton_rejects_bad_grid():
    rope = Rope3D((2, 2, 3), 64, device=DEV)
    x = make_tensor((1, 7, 1, 64), torch.float32, DEV)
    with pytest.raises(ValueError, match="whole number of frames"):
        rt.apply_rope_3d_triton(x, rope, 0)
    x = make_tensor((1, 12, 1, 64), torch.float32, DEV)
    with pytest.raises(ValueError, match="do not fit"):
        rt.apply_rope_3d_triton(x, rope, 1)


@pytest.mark.triton_interpret
def test_rope_ops_opcheck():
    rope = Rope3D((2, 2, 3), 64, device=DEV)
    tabs, gh, gw = rt.rope_table_args(rope)
    x = make_tensor((1, 12, 2, 64), torch.float32, DEV, permuted=True)
    torch.library.opcheck(torch.ops.longcat_kernels.rope_3d.default,
                          (x, *tabs, gh, gw, 0, torch.empty(x.shape)))
    w = torch.randn(64)
    torch.library.opcheck(torch.ops.longcat_kernels.qk_norm_rope.default,
                          (x, x.clone(), w, w, *tabs, gh, gw, 0, 1e-6, torch.empty(x.shape),
                           torch.empty(x.shape)))
    torch.library.opcheck(torch.ops.longcat_kernels.qk_norm_rope.default,
                          (x, x.clone(), w, w, *([None] * 6), 1, 1, 0, 1e-6, torch.empty(x.shape),
                           torch.empty(x.shape)))


@pytest.mark.triton_interpret
def test_qk_norm_rope_triton_compiles_fullgraph():
    grid, D = (2, 2, 3), 64
    rope = Rope3D(grid, D, device=DEV)
    q = _tt(grid, 2, 2, D, torch.float32)
    k = _tt(grid, 2, 2, D, torch.float32)
    w = torch.randn(D)

    def f(q, k):
        return qk_norm_rope(q, k, w, w, rope, 0, backend="triton")

    f(q, k)  # eager first: the backend resolver imports triton.py outside the traced graph
    torch._dynamo.reset()
    with torch.no_grad():
        oq, ok = torch.compile(f, fullgraph=True)(q, k)
    rq, rk = qk_norm_rope(q, k, w, w, rope, 0, backend="torch")
    assert_close(oq, rq.double(), floor=1e-6)
    assert_close(ok, rk.double(), floor=1e-6)


@pytest.mark.triton_gpu
@pytest.mark.parametrize("grid,c", [((6, 30, 52), 2), ((5, 7, 9), 1)])
def test_qk_norm_rope_triton_bf16_gpu(grid, c):
    D = 128
    rope = Rope3D(grid, D, device="cuda")
    qkv = make_tensor((2, (grid[0] - c) * grid[1] * grid[2], 3, 8, D), torch.bfloat16, "cuda")
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    qw = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
    kw = (1 + 0.1 * torch.randn(D, device="cuda")).bfloat16()
    oq, ok = qk_norm_rope(q, k, qw, kw, rope, c, backend="triton")
    rq, rk = qk_norm_rope(q, k, qw, kw, rope, c, backend="torch")
    # same math and rounding points as the reference: equal up to rare 1-ulp bf16 differences
    assert_close(oq, rq.double(), floor=2e-3, name="q")
    assert_close(ok, rk.double(), floor=2e-3, name="k")
    x = rt.apply_rope_3d_triton(q, rope, c)
    assert_close(x, apply_rope_3d(q, rope, c).double(), floor=2e-3, name="rope")
