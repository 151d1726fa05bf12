"""Hostile-user audit, round 10: inputs that gave silently wrong answers or unclear failures."""

from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton_interpret


def test_torch_deterministic_switch_reaches_the_bsa_backward(monkeypatch):
    # torch.use_deterministic_algorithms(True) is how a training script asks for reproducible gradients;
    # the Triton backward read only LONGCAT_KERNELS_DETERMINISTIC and kept dq's fp32 atomics (run-to-run
    # different dq on the GPU) without a word
    monkeypatch.delenv("LONGCAT_KERNELS_DETERMINISTIC", raising=False)
    seen = []
    real = torch.ops.longcat_kernels.bsa_bwd

    def spy(*args):
        seen.append(args[13])  # the `deterministic` argument
        return real(*args)

    monkeypatch.setattr(torch.ops.longcat_kernels, "bsa_bwd", spy)
    q, k, v = (torch.randn(1, 16, 1, 16, requires_grad=True) for _ in range(3))
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for flag in (False, True):
            torch.use_deterministic_algorithms(flag)
            out = lk.block_sparse_attn(q, k, v, grid_q=(1, 4, 4), chunk_q=(1, 2, 2), sparsity=0.5, backend="triton")
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [False, True]
