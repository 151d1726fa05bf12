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
