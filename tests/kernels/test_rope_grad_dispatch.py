"""The Triton q/k prologue is forward only: it refuses inputs that need gradients through the
backend hook (``unsupported_reason``), so ``"auto"`` can pass them to the torch reference during
training while an explicit ``backend="triton"`` still raises with the reason."""

from __future__ import annotations

import pytest
import torch

from longcat_kernels import Rope3D, qk_norm_rope
from longcat_kernels._backend import BackendUnavailableError, op_backend_status
from longcat_kernels.testing import make_tensor


@pytest.mark.triton_interpret
def test_triton_prologue_refuses_grad_and_torch_gives_grads():
    rope = Rope3D((2, 2, 2), 32)
    q = make_tensor((1, 8, 2, 32), requires_grad=True)
    k = make_tensor((1, 8, 2, 32), requires_grad=True)
    w = torch.ones(32)
    assert "forward only" in (op_backend_status("qk_norm_rope", "triton", q, k) or "")
    with torch.no_grad():
        assert op_backend_status("qk_norm_rope", "triton", q, k) is None
    assert op_backend_status("qk_norm_rope", "triton", q.detach(), k.detach()) is None
    with pytest.raises(BackendUnavailableError, match="forward only"):
        qk_norm_rope(q, k, w, w, rope=rope, backend="triton")
    qo, ko = qk_norm_rope(q, k, w, w, rope=rope, backend="torch")
    (qo.sum() + ko.square().sum()).backward()
    assert q.grad is not None and k.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():  # and the triton forward still runs for inference
        tq, tk = qk_norm_rope(q, k, w, w, rope=rope, backend="triton")
    torch.testing.assert_close(tq, qo.detach(), atol=1e-5, rtol=1e-5)
