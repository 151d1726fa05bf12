"""Hostile-user inputs of ``Rope3D(axis_dims=, theta=, pairs=)`` and ``qk_norm_rope`` weights: a
ValueError/TypeError naming the argument, never a silently different result."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk


@pytest.mark.parametrize("dims,exc", [
    (5, TypeError),               # was TypeError: 'int' object is not iterable (argument not named)
    ("abc", TypeError),
    ((5, 5, 6), ValueError),      # odd
    ((4, 4, 4), ValueError),      # does not add up to head_dim
    ((4.0, 6, 6), ValueError),
    ((8, 8), ValueError),
    ((-2, 10, 8), ValueError),
])
def test_axis_dims(dims, exc):
    with pytest.raises(exc, match=r"^axis_dims: expected"):
        lk.Rope3D((1, 2, 3), 16, axis_dims=dims)


@pytest.mark.parametrize("theta,exc", [
    (0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
    (float("inf"), ValueError),   # was accepted: every frequency but the first became 0 (no rotation)
    ("1e4", TypeError), (True, TypeError), (None, TypeError),
])
def test_theta(theta, exc):
    with pytest.raises(exc, match=r"^theta: expected"):
        lk.Rope3D((1, 2, 3), 16, theta=theta)


@pytest.mark.parametrize("pairs,exc", [("neox", ValueError), ("HALF", ValueError), (["half"], TypeError),
                                       (None, TypeError)])
def test_pairs(pairs, exc):
    with pytest.raises(exc, match=r"^pairs: expected 'interleaved' or 'half'"):
        lk.Rope3D((1, 2, 3), 16, pairs=pairs)


def _qk(H=2, D=16):
    return torch.randn(1, 6, H, D), torch.randn(1, 6, H, D), lk.Rope3D((1, 2, 3), D)


@pytest.mark.parametrize("which", ["q_weight", "k_weight"])
def test_weight_not_a_tensor_is_named(which):
    q, k, r = _qk()
    w = torch.ones(32)
    kw = {"q_weight": w, "k_weight": w, which: [1.0] * 32}
    # was AttributeError: 'list' object has no attribute 'device'
    with pytest.raises(TypeError, match=rf"^{which}: expected a torch.Tensor, got list"):
        lk.qk_norm_rope(q, k, kw["q_weight"], kw["k_weight"], r)


@pytest.mark.parametrize("w,exc,msg", [
    (torch.ones(24), ValueError, r"\(16,\) .* or \(32,\)"),
    (torch.ones(2, 16), ValueError, "1-D"),
    (torch.ones(32, dtype=torch.int64), TypeError, "floating dtype"),
])
def test_all_heads_weight_of_wrong_length_or_dtype(w, exc, msg):
    q, k, r = _qk()
    with pytest.raises(exc, match=rf"^q_weight: expected .*{msg}"):
        lk.qk_norm_rope(q, k, w, torch.ones(32), r)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_mixed_norm_kinds_raise_on_every_backend(backend):
    # the torch path used to run a per-head q norm with an all-heads k norm while the fused kernels
    # (one kind per launch) refused: the backend decided whether the call worked
    q, k, r = _qk()
    for qw, kw, expect in ((torch.ones(16), torch.ones(32), r"per head, shape \(16,\)"),
                           (torch.ones(32), torch.ones(16), r"all heads, shape \(32,\)")):
        with pytest.raises(ValueError, match=rf"^k_weight: expected the same norm kind as q_weight \({expect}\)"):
            lk.qk_norm_rope(q, k, qw, kw, r, backend=backend)


def test_one_head_weight_is_both_kinds_and_still_allowed():
    # q has one head: its [D] weight is per-head and all-heads at once, so k's [Hk*D] weight is consistent
    q, k, r = _qk()
    q1 = q[:, :, :1]
    wq, wk = torch.rand(16) + 0.5, torch.rand(32) + 0.5
    qo, ko = lk.qk_norm_rope(q1, k, wq, wk, r, backend="torch")
    # k's all-heads norm: one rms over both heads of a token
    kf = k.reshape(1, 6, 32)
    kn = (kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + 1e-6) * wk).view(1, 6, 2, 16)
    torch.testing.assert_close(ko, lk.apply_rope_3d(kn, r), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(qo).all()


@pytest.mark.parametrize("backend", [pytest.param("auto", marks=pytest.mark.cuda),
                                     pytest.param("triton", marks=pytest.mark.triton_gpu),
                                     pytest.param("cuda", marks=pytest.mark.ext)])
def test_mixed_norm_kinds_raise_on_gpu_backends(backend):
    q, k = torch.randn(1, 6, 2, 16, device="cuda"), torch.randn(1, 6, 2, 16, device="cuda")
    r = lk.Rope3D((1, 2, 3), 16, device="cuda")
    with pytest.raises(ValueError, match=r"^k_weight: expected the same norm kind as q_weight"):
        lk.qk_norm_rope(q, k, torch.ones(16, device="cuda"), torch.ones(32, device="cuda"), r, backend=backend)
    # the same all-heads weights on both still run (Wan's fused prologue); the cuda backend has no
    # qk_norm_rope kernel and says so
    w = torch.rand(32, device="cuda") + 0.5
    if backend == "cuda":
        with pytest.raises(lk.BackendUnavailableError, match="qk_norm_rope has no csrc kernel"):
            lk.qk_norm_rope(q, k, w, w, r, backend=backend)
        return
    qo, ko = lk.qk_norm_rope(q, k, w, w, r, backend=backend)
    rq, rk = lk.qk_norm_rope(q, k, w, w, r, backend="torch")
    torch.testing.assert_close(qo, rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, rk, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [3, -1, True, 1.0])
def test_frame_offset_without_rope_is_refused(offset):
    """frame_offset positions tokens on the rope grid; with rope=None it was dropped silently."""
    q, k = torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    w = torch.ones(16)
    with pytest.raises(ValueError, match=r"^frame_offset: expected 0 without a rope"):
        lk.qk_norm_rope(q, k, w, w, None, frame_offset=offset, backend="torch")
    qo, _ = lk.qk_norm_rope(q, k, w, w, None, frame_offset=0, backend="torch")
    assert torch.isfinite(qo).all()
