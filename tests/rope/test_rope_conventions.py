"""Generalised 3D RoPE and q/k RMSNorm (SPEC 12) against small independent implementations written
here: Wan 2.x's formula (diffusers' WanRotaryPosEmbed + apply, written out), rotate-half per axis
part, other axis splits and theta; the all-heads RMSNorm ([H*D] weight) vs Wan's norm over the inner
dim. torch backend and the Triton prologue (interpreter), fp32."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import CPU_BACKENDS

import longcat_kernels as lk


def wan_rope(x, grid, theta=10000.0):
    """Wan 2.x: per axis d dims, freqs = theta^(-arange(0, d, 2)/d) (fp64), angle pos*freq repeated
    for pairs (2i, 2i+1); out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i] sin + x[2i+1] cos."""
    B, S, H, D = x.shape
    dh = 2 * (D // 6)
    dims = [D - 2 * dh, dh, dh]
    T, Hh, W = grid
    pos = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(W), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).double()
    angles = []
    for a, d in enumerate(dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(pos[:, a : a + 1] * freqs[None])
    ang = torch.cat(angles, -1)  # [S, D/2]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x.double()[..., 0::2], x.double()[..., 1::2]
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def half_rope(x, grid, dims, theta):
    """Rotate-half inside each axis part: lane j < d/2 pairs with j + d/2, angle pos * theta^(-2j/d)."""
    T, Hh, W = grid
    pos = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(W), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).double()
    xd, outs, c0 = x.double(), [], 0
    for a, d in enumerate(dims):
        j = torch.arange(d // 2, dtype=torch.float64)
        ang = pos[:, a : a + 1] * theta ** (-2 * j / d)[None]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        p1, p2 = xd[..., c0 : c0 + d // 2], xd[..., c0 + d // 2 : c0 + d]
        outs += [p1 * c - p2 * s, p2 * c + p1 * s]
        c0 += d
    return torch.cat(outs, -1)


def test_default_is_wan_convention():
    grid = (3, 4, 5)
    x = torch.randn(2, 60, 3, 64)
    r = lk.Rope3D(grid, 64)
    torch.testing.assert_close(lk.apply_rope_3d(x, r).double(), wan_rope(x, grid), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_half_pairs_and_custom_axis_dims(theta):
    grid, dims = (2, 3, 4), (8, 12, 12)
    x = torch.randn(1, 24, 2, 32)
    r = lk.Rope3D(grid, 32, theta, axis_dims=dims, pairs="half")
    torch.testing.assert_close(lk.apply_rope_3d(x, r).double(), half_rope(x, grid, dims, theta), atol=2e-5, rtol=1e-5)
    # interleaved with the same custom split: compare to the interleaved formula part by part
    ri = lk.Rope3D(grid, 32, theta, axis_dims=dims)
    y = lk.apply_rope_3d(x, ri).double()
    # interleaved == half after permuting each part's lanes (evens first, then odds)
    perm, c0 = [], 0
    for d in dims:
        perm += [c0 + i for i in range(0, d, 2)] + [c0 + i for i in range(1, d, 2)]
        c0 += d
    torch.testing.assert_close(y[..., perm], half_rope(x[..., perm], grid, dims, theta), atol=2e-5, rtol=1e-5)


def test_bad_rope_arguments():
    with pytest.raises(ValueError, match="axis_dims"):
        lk.Rope3D((1, 2, 2), 32, axis_dims=(10, 10, 10))
    with pytest.raises(ValueError, match="axis_dims"):
        lk.Rope3D((1, 2, 2), 32, axis_dims=(11, 11, 10))
    with pytest.raises(ValueError, match="pairs"):
        lk.Rope3D((1, 2, 2), 32, pairs="neox")


def wan_rms_all_heads(x, w, eps):
    """torch.nn.RMSNorm(H*D) as Wan's norm_q applies it on [B, S, H*D], written out in fp64."""
    B, S, H, D = x.shape
    xf = x.double().reshape(B, S, H * D)
    y = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return y.reshape(B, S, H, D)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("use_rope", [False, True])
def test_all_heads_norm_then_rope_is_wan(backend, use_rope):
    grid, H, D = (2, 3, 3), 4, 32
    S = 18
    q, k = torch.randn(2, S, H, D) * 3, torch.randn(2, S, H, D)
    wq, wk = torch.randn(H * D), torch.randn(H * D)
    r = lk.Rope3D(grid, D) if use_rope else None
    qo, ko = lk.qk_norm_rope(q, k, wq, wk, r, eps=1e-6, backend=backend)
    eq, ek = wan_rms_all_heads(q, wq, 1e-6), wan_rms_all_heads(k, wk, 1e-6)
    if use_rope:
        eq, ek = wan_rope(eq, grid), wan_rope(ek, grid)
    assert not torch.isnan(qo).any() and not torch.isnan(ko).any()
    torch.testing.assert_close(qo.double(), eq, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(ko.double(), ek, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_head_norm_stays_default(backend):
    q, k = torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32)
    w = torch.randn(32)
    qo, _ = lk.qk_norm_rope(q, k, w, w, backend=backend)
    e = q.double() / torch.sqrt(q.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(qo.double(), e, atol=5e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="q_weight"):
        lk.qk_norm_rope(q, k, torch.randn(33), w, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_with_half_and_custom_rope(backend):
    grid, H, D = (3, 2, 4), 2, 32
    hw = grid[1] * grid[2]
    r = lk.Rope3D(grid, D, 700.0, axis_dims=(12, 10, 10), pairs="half")
    q, k, v = (torch.randn(2, 2 * hw, H, D) for _ in range(3))
    kc, vc = torch.randn(1, hw, H, D), torch.randn(1, hw, H, D)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=r, backend=backend)
    qr, kr = (half_rope(x, (2,) + grid[1:], (12, 10, 10), 700.0) for x in (q, k))
    # the fresh tokens sit at frames 1..2: shift the t angle by one frame
    full = half_rope(torch.cat([torch.zeros(2, hw, H, D), q], 1), grid, (12, 10, 10), 700.0)[:, hw:]
    fullk = half_rope(torch.cat([torch.zeros(2, hw, H, D), k], 1), grid, (12, 10, 10), 700.0)[:, hw:]
    del qr, kr
    K = torch.cat([kc.expand(2, -1, -1, -1).double(), fullk], 1)
    V = torch.cat([vc.expand(2, -1, -1, -1), v], 1).double()
    s = torch.einsum("bqhd,bkhd->bhqk", full, K) / math.sqrt(D)
    exp = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), V)
    torch.testing.assert_close(out.double(), exp, atol=1e-4, rtol=1e-4)
    ri = lk.Rope3D(grid, D, 700.0, axis_dims=(12, 10, 10))
    out_i = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=ri, backend=backend)
    exp_i = lk.attn_with_kv_cache(lk.apply_rope_3d(q, ri, 1), lk.apply_rope_3d(k, ri, 1), v, kc, vc, backend="torch")
    torch.testing.assert_close(out_i, exp_i, atol=1e-4, rtol=1e-4)
