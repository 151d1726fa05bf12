"""Hostile inputs, round 17 (kernels): each test names the silent or unclear behaviour it pins."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk


@pytest.mark.parametrize("theta", [
    1e39,     # past fp32's maximum: inf in the fp32 tables, every frequency but the first 0 (no rotation),
              # the very result theta=inf is refused for
    1e-300,   # 0 in fp32: inverse frequencies inf, NaN tables (every rotated token NaN)
])
def test_rope_theta_beyond_fp32_is_refused(theta):
    with pytest.raises(ValueError, match=r"^theta: expected"):
        lk.Rope3D((2, 2, 3), 48, theta=theta)


def test_rope_theta_whose_angles_overflow_on_a_long_grid_is_refused():
    # finite inverse frequencies (at most 2.5e37) but position * frequency past fp32 from frame 14 on
    with pytest.raises(ValueError, match=r"^theta: expected"):
        lk.Rope3D((20, 2, 3), 256, theta=2e-38, axis_dims=(252, 2, 2))


@pytest.mark.parametrize("theta", [0.5, 1.0, 1e-6, 3e38, 10000.0, 1e6])
def test_rope_thetas_with_finite_tables_still_work(theta):
    r = lk.Rope3D((3, 2, 3), 48, theta=theta)
    for t in (r.cos_t, r.sin_t, r.cos_h, r.sin_h, r.cos_w, r.sin_w):
        assert torch.isfinite(t).all()


def test_prefix_attn_takes_a_numpy_prefix_len():
    """A numpy int prefix_len (e.g. from an array of cond lengths) works as frame_offset's does; it was a
    TypeError. Floats and bools are still refused."""
    import numpy as np

    q, k, v = (torch.randn(1, 12, 2, 8, dtype=torch.float64) for _ in range(3))
    ref = lk.prefix_attn(q, k, v, 5, backend="torch")
    torch.testing.assert_close(lk.prefix_attn(q, k, v, np.int64(5), backend="torch"), ref, rtol=0, atol=0)
    for bad in (5.0, True, np.float32(5)):
        with pytest.raises(TypeError, match="prefix_len: expected an int"):
            lk.prefix_attn(q, k, v, bad, backend="torch")
