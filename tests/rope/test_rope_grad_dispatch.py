"""The Triton q/k prologue is forward only: ``choose_kernel`` refuses it for inputs that need
gradients, so ``"auto"`` passes them to the torch reference during training while an explicit
``backend="triton"`` still raises with the reason."""

from __future__ import annotations

import pytest
import torch

from longcat_kernels import Rope3D, qk_norm_rope
from longcat_kernels.dispatch import BackendUnavailableError, Facts, choose, choose_kernel
from longcat_kernels.testing import make_tensor


@pytest.mark.triton_interpret
def test_triton_prologue_refuses_grad_and_torch_gives_grads():
    rope = Rope3D((2, 2, 2), 32)
    q = make_tensor((1, 8, 2, 32), requires_grad=True)
    k = make_tensor((1, 8, 2, 32), requires_grad=True)
    w = torch.ones(32)
    with pytest.raises(BackendUnavailableError, match="forward only"):
        choose("qk_norm_rope", q, k, requested="triton")
    with torch.no_grad():
        assert choose("qk_norm_rope", q, k, requested="triton").impl == "triton"
    assert choose("qk_norm_rope", q.detach(), k.detach(), requested="triton").impl == "triton"
    # on a GPU, "auto" with gradients takes the differentiable reference
    gpu = Facts(requires_grad=True)
    assert choose_kernel("qk_norm_rope", gpu, "auto").impl == "torch_reference"
    assert choose_kernel("qk_norm_rope", gpu._replace(requires_grad=False), "auto").impl == "triton"
    with pytest.raises(BackendUnavailableError, match="forward only"):
        qk_norm_rope(q, k, w, w, rope=rope, backend="triton")
    qo, ko = qk_norm_rope(q, k, w, w, rope=rope, backend="torch")
    (qo.sum() + ko.square().sum()).backward()
    assert q.grad is not None and k.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():  # and the triton forward still runs for inference
        tq, tk = qk_norm_rope(q, k, w, w, rope=rope, backend="triton")
    torch.testing.assert_close(tq, qo.detach(), atol=1e-5, rtol=1e-5)
