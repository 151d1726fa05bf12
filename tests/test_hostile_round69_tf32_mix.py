"""Round 69: ``ieee_fp32_matmul`` (around the torch references' and the gating's matmuls on CUDA) after the
common ``torch.set_float32_matmul_precision("high")``.

It set only the per-backend switch (``torch.backends.cuda.matmul.fp32_precision = "ieee"``) and left the legacy
one at "high". torch checks the two against each other whenever it asks whether cuBLAS may use TF32 (every
cuBLAS handle it hands out, ``Context::allowTF32CuBLAS``): inside the block every cuBLAS call of such a user
raised "you have used mix of the legacy and new APIs". ``torch.backends.cuda.matmul.allow_tf32`` runs the same
C++ check, so it is testable on a CPU build.
"""
from __future__ import annotations

import pytest
import torch

from longcat_kernels.ops.block_sparse_attn import selection

_M = torch.backends.cuda.matmul
pytestmark = pytest.mark.skipif(not hasattr(_M, "fp32_precision"),
                                reason="torch without torch.backends.cuda.matmul.fp32_precision")


def _state():
    mk = torch.backends.mkldnn.matmul
    return torch.get_float32_matmul_precision(), _M.fp32_precision, mk.fp32_precision


@pytest.fixture
def restore_precision():
    mk = torch.backends.mkldnn.matmul
    before = (torch.get_float32_matmul_precision(), _M.fp32_precision, mk.fp32_precision)
    yield
    torch.set_float32_matmul_precision(before[0])
    _M.fp32_precision, mk.fp32_precision = before[1], before[2]


@pytest.mark.parametrize("user", ["high", "medium", "highest"])
def test_the_cublas_tf32_check_passes_inside_the_block_after_a_legacy_setting(user, restore_precision):
    torch.set_float32_matmul_precision(user)
    found = _state()
    assert _M.allow_tf32 == (user != "highest")  # consistent before
    with selection.ieee_fp32_matmul(torch.device("cuda")):
        assert _M.allow_tf32 is False  # raised "mix of the legacy and new APIs" for "high" / "medium"
        assert _M.fp32_precision == "ieee"
        with selection.ieee_fp32_matmul(torch.device("cuda")):
            assert _M.allow_tf32 is False
    assert _state() == found
    assert _M.allow_tf32 == (user != "highest")


def test_an_exception_inside_the_block_restores_the_legacy_setting(restore_precision):
    torch.set_float32_matmul_precision("high")
    found = _state()
    with pytest.raises(KeyError):
        with selection.ieee_fp32_matmul(torch.device("cuda")):
            raise KeyError("inside")
    assert _state() == found and selection._IEEE_STATE["depth"] == 0
    assert _M.allow_tf32 is True


def test_cpu_blocks_leave_every_setting_alone(restore_precision):
    torch.set_float32_matmul_precision("high")
    found = _state()
    with selection.ieee_fp32_matmul(torch.device("cpu")):
        assert _state() == found
    a, b = torch.randn(3, 8, 5, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    got = selection.exact_matmul(a.float(), b.float())
    assert torch.allclose(got.double(), a.float().double() @ b.float().double(), rtol=1e-5, atol=1e-5)
    assert _state() == found


@pytest.mark.cuda
@pytest.mark.parametrize("user", ["high", "highest"])
def test_torch_reference_on_cuda_after_a_legacy_setting(user, restore_precision):
    """The GPU run of the above: after ``set_float32_matmul_precision(user)`` the BSA torch reference (gating,
    attention, backward) on CUDA fp32 raises nothing and is IEEE fp32 (TF32 would be ~1e-3 off); the user's
    setting is back afterwards, and cuBLAS matmuls outside run. Written in session 30 without a device."""
    import longcat_kernels as lk
    from helpers import bsa_oracle  # noqa: PLC0415
    from longcat_kernels.testing.tolerance import rel_l2

    torch.set_float32_matmul_precision(user)
    found = _state()
    grid = (4, 8, 8)
    q, k, v = (torch.randn(1, 256, 2, 64, device="cuda", requires_grad=True) for _ in range(3))
    sel = lk.select_blocks(q, k, grid_q=grid, grid_k=grid, chunk_q=(4, 4, 4), sparsity=0.5, backend="torch")
    out = lk.block_sparse_attn(q, k, v, selection=sel, backend="torch")
    out.square().sum().backward()
    assert _state() == found
    assert all(t.grad is not None and bool(t.grad.isfinite().all()) for t in (q, k, v))
    ref, _, _, _ = bsa_oracle(q.detach(), k.detach(), v.detach(), sel, 64**-0.5)
    assert not out.isnan().any() and rel_l2(out.detach(), ref) < 2e-5, rel_l2(out.detach(), ref)
    a = torch.randn(64, 64, device="cuda")
    assert torch.isfinite(a @ a).all()
