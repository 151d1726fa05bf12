"""Hostile inputs of the fp8 activation quantisation found by the eighth audit: each test fails on the
code before its fix.

- The Triton LayerNorm / adaLN prologue of a bf16/fp32 row whose variance overflows fp32
  (``|x - mean|`` around 1e19 and beyond) took ``rsqrt(inf) = 0`` and quantised a row of zeros with
  the floor scale 1e-12 / 448: a diverged activation came back finite (zero), without a word, where
  torch's ``layer_norm`` (and so the reference backend) gives NaN. Now the row is NaN, scale and values.
- A row holding +-inf got an inf scale (values NaN at the inf, 0 elsewhere) on both backends; the
  contract is a NaN scale and NaN values for a non-finite row, never an inf (or 0) scale.
- The reference returned ``q`` with the input's strides (a transposed ``x [M, K]`` gave a
  column-major ``q``), the Triton kernel a row-major one; ``torch._scaled_mm`` needs a row-major mat1.
"""

import pytest
import torch

import longcat_kernels as lk
from helpers import CPU_BACKENDS, DEV, TRITON


@pytest.mark.parametrize("backend", [TRITON])
def test_layer_norm_whose_variance_overflows_is_nan_not_a_zero_row(backend):
    x = torch.randn(3, 32, device=DEV) * 1e20
    x[1] = torch.randn(32, device=DEV)  # an ordinary row beside them stays finite
    sh = torch.zeros(1, 3, 1, 32, device=DEV)
    for q, s, y in (lk.fp8_layer_norm_quantize(x, return_input=True, backend=backend),
                    lk.fp8_modulate_quantize(x.view(1, 3, 1, 32), sh, sh, return_input=True, backend=backend)):
        q, s, y = q.view(3, 32).float(), s.view(3), y.view(3, 32)
        for r in (0, 2):
            assert torch.isnan(s[r]) and torch.isnan(q[r]).all() and torch.isnan(y[r]).all(), (r, s, y[r])
        assert torch.isfinite(s[1]) and torch.isfinite(q[1]).all() and float(q[1].abs().max()) == 448.0


@pytest.mark.parametrize("backend", CPU_BACKENDS if DEV == "cpu" else ["torch", TRITON])
def test_a_row_holding_inf_gets_a_nan_scale_never_an_inf_one(backend):
    x = torch.randn(4, 24, device=DEV)
    x[0, 5] = float("inf")
    x[2, 0] = -float("inf")
    a = torch.randn(4, 24, device=DEV)
    a[3, 1] = float("inf")  # silu(inf) * b = +-inf
    for (q, s), bad in ((lk.fp8_quantize_rows(x, backend=backend), [0, 2]),
                        (lk.fp8_silu_mul_quantize(a, torch.ones_like(a), backend=backend), [3])):
        assert not torch.isinf(s).any() and (s != 0).all(), s.flatten()
        for r in bad:
            assert torch.isnan(s[r]).all() and torch.isnan(q[r].float()).all(), (r, q[r].float())
        ok = [r for r in range(4) if r not in bad]
        assert torch.isfinite(s[ok]).all() and torch.isfinite(q[ok].float()).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS if DEV == "cpu" else ["torch", TRITON])
def test_q_is_row_major_for_a_transposed_input(backend):
    x = torch.randn(48, 5, device=DEV).t()  # [5, 48], column-major
    q, s = lk.fp8_quantize_rows(x, backend=backend)
    assert q.is_contiguous() and q.shape == (5, 48) and s.shape == (5, 1)
    qc, sc = lk.fp8_quantize_rows(x.contiguous(), backend="torch")
    assert torch.equal(q.view(torch.uint8), qc.view(torch.uint8)) and torch.equal(s, sc)
    a = torch.randn(40, 3, device=DEV).t()
    assert lk.fp8_silu_mul_quantize(a, a.clone(), backend=backend)[0].is_contiguous()
