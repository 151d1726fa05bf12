"""Round 72: Triton launches on a non-current GPU. Triton compiles for and launches on the *current* device's
stream; tensors on ``cuda:1`` while ``cuda:0`` was current (``model.to("cuda:1")`` without
``torch.cuda.set_device``, diffusers' ``device_map``) failed with Triton's "Pointer argument (at 0) cannot be
accessed from Triton (cpu tensor?)" (the csrc ops already set the device with a CUDAGuard). ``dispatch.launcher``
now makes the first CUDA tensor argument's device current around the launch. Host logic pinned on the CPU with
fake CUDA tensors and a recording ``torch.cuda.device``; the two-GPU run is marked ``cuda`` and needs 2 GPUs."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from longcat_kernels import dispatch


class _Kernel:
    def __init__(self, seen):
        self.seen = seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(("launch", _CURRENT[0]))
            return "ran"

        return launch


_CURRENT = [0]


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda.current_device`` / ``torch.cuda.device`` replaced by a recorder of the current index."""
    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        before, _CURRENT[0] = _CURRENT[0], index
        try:
            yield
        finally:
            _CURRENT[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: _CURRENT[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    _CURRENT[0] = 0
    return entered


def _on(device):
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(4, device=device)


def test_a_launch_on_another_gpu_runs_with_that_gpu_current(fake_cuda):
    seen = []
    x = _on("cuda:1")
    assert dispatch.launcher(_Kernel(seen), (2,))(x, x, 3, BLOCK=16) == "ran"
    assert seen == [("launch", 1)] and fake_cuda == [1] and _CURRENT[0] == 0  # restored after


def test_the_first_cuda_tensor_decides_and_scalars_and_none_are_skipped(fake_cuda):
    seen = []
    dispatch.launcher(_Kernel(seen), (1,))(None, 5, _on("cuda:3"), _on("cuda:2"))
    assert seen == [("launch", 3)] and fake_cuda == [3]


def test_a_launch_on_the_current_gpu_or_without_cuda_tensors_enters_no_guard(fake_cuda):
    seen = []
    dispatch.launcher(_Kernel(seen), (1,))(_on("cuda:0"), 1)
    dispatch.launcher(_Kernel(seen), (1,))(torch.zeros(2), None, 2.0)
    _CURRENT[0] = 2
    dispatch.launcher(_Kernel(seen), (1,))(_on("cuda:2"))
    assert seen == [("launch", 0), ("launch", 0), ("launch", 2)] and fake_cuda == []


def test_an_exception_in_the_launch_restores_the_current_gpu(fake_cuda):
    class Failing:
        def __getitem__(self, grid):
            def launch(*a):
                raise RuntimeError("launch failed")

            return launch

    with pytest.raises(RuntimeError, match="launch failed"):
        dispatch.launcher(Failing(), (1,))(_on("cuda:1"))
    assert _CURRENT[0] == 0 and fake_cuda == [1]


@pytest.mark.cuda
def test_triton_ops_on_the_second_gpu_match_the_reference():
    """Every Triton op family on ``cuda:1`` with ``cuda:0`` current (needs 2 GPUs; not yet run: no multi-GPU
    machine has been lent)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    import longcat_kernels as lk
    from longcat_kernels.testing.tolerance import rel_l2

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    q, k, v = (torch.randn(1, 256, 2, 64, device=dev, dtype=torch.float16) for _ in range(3))
    kc, vc = (torch.randn(1, 128, 2, 64, device=dev, dtype=torch.float16) for _ in range(2))
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, backend="triton")
    ref = lk.attn_with_kv_cache(q, k, v, kc, vc, backend="torch")
    assert out.device == dev and rel_l2(out.float(), ref.float()) < 1e-2
    grid = (4, 8, 8)
    lk.select_blocks(q, k, grid_q=grid, grid_k=grid, chunk_q=(4, 4, 4), sparsity=0.5, backend="triton")  # runs there
    ref_sel = lk.select_blocks(q, k, grid_q=grid, grid_k=grid, chunk_q=(4, 4, 4), sparsity=0.5, backend="torch")
    out = lk.block_sparse_attn(q, k, v, selection=ref_sel, backend="triton")
    ref = lk.block_sparse_attn(q, k, v, selection=ref_sel, backend="torch")
    assert rel_l2(out.float(), ref.float()) < 1e-2
    assert torch.cuda.current_device() == 0
