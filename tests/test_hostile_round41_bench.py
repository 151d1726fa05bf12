"""Round 41 (bench audit, CPU): a dense fwd+bwd baseline timed with a wrong gradient, the README
pipeline table without the grid of its rows."""

from __future__ import annotations

import torch


def _dense_bwd_case(ctx):
    from bench.shapes import Grid
    from bench.suites import bsa

    grid = Grid("g", 4, 4, 4)
    return bsa._dense_case(ctx, grid, (1, 2, 16), "default", backward=True)


def test_dense_fwd_bwd_baseline_refused_with_a_wrong_gradient(monkeypatch):
    """The dense fwd+bwd SDPA baseline checked its forward output only: an SDPA whose backward was off by
    10% (rel. L2 0.1 on dq/dk/dv) passed with rel. L2 ~4e-7 and was timed as the baseline every fwd+bwd
    speedup divides. Its gradients are now compared to the fp32 math SDPA's too."""
    from bench.suites import Context, run_case
    from longcat_kernels.testing import baselines as BL

    real = BL.sdpa_bshd

    class _ScaledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx_, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx_, g):
            return g * 1.1

    def wrong(q, k, v, *, impl="default", scale=None):
        if impl == "math":  # the oracle stays right
            return real(q, k, v, impl=impl, scale=scale)
        return real(_ScaledGrad.apply(q), _ScaledGrad.apply(k), _ScaledGrad.apply(v), impl=impl, scale=scale)

    monkeypatch.setattr(BL, "sdpa_bshd", wrong)
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, quick=True, log=lambda s: None)
    row = run_case(ctx, _dense_bwd_case(ctx))
    assert row["status"] == "parity-failed", row
    # and the right SDPA still passes
    monkeypatch.setattr(BL, "sdpa_bshd", real)
    row = run_case(ctx, _dense_bwd_case(ctx))
    assert row["status"] == "ok" and row["rel_l2"] < 1e-5, row
