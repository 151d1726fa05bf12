"""The fused (torch.compile) fp32 islands compute what the eager islands compute.

On CUDA the model runs the compiled versions; here the same compiled functions run through
inductor's CPU backend, which checks the traced math (shapes dynamic, dtypes, expression).
"""

from __future__ import annotations

import pytest
import torch

from longcat_vc.modules import norms
from test_dit import rel_l2


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_islands_equal_eager(dtype):
    g = torch.Generator().manual_seed(0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for B, T, S, C in [(2, 3, 5, 64), (1, 2, 7, 48)]:  # second shape: no recompilation needed
        x = torch.randn(B, T, S, C, generator=g).to(dtype)
        br = torch.randn(B, T, S, C, generator=g).to(dtype)
        shift, scale, gate = (torch.randn(B, T, 1, C, generator=g) for _ in range(3))
        w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
        cases = [
            (norms._modulate, (x, shift, scale, 1e-6, dtype)),
            (norms._gated_residual, (x, gate, br)),
            (norms._layer_norm_fp32, (x, w.to(dtype), b.to(dtype), 1e-6)),
            (norms._rms_norm, (x, w.to(dtype), 1e-6)),
            (norms._silu_mul, (x, br)),
        ]
        for fn, args in cases:
            eager = fn(*args)
            fused = norms.compiled(fn)(*args)
            assert fused.dtype == eager.dtype == dtype, fn.__name__
            assert rel_l2(fused, eager) < tol, fn.__name__


def test_each_dtype_signature_compiles_its_own_code_object():
    """Dynamo's recompile limit is per code object: fp32/bf16/fp16 models in one process must not
    share one (they did on the H100 and the island fell back to eager)."""
    a = norms.compiled(norms._rms_norm, (torch.float32, torch.float32, 1e-6))
    b = norms.compiled(norms._rms_norm, (torch.bfloat16, torch.bfloat16, 1e-6))
    assert a is norms.compiled(norms._rms_norm, (torch.float32, torch.float32, 1e-6))
    assert a is not b
    fa, fb = (getattr(c, "_torchdynamo_orig_callable", None) for c in (a, b))
    if fa is not None and fb is not None:
        assert fa.__code__ is not fb.__code__ and fa.__code__ is not norms._rms_norm.__code__
    x = torch.randn(2, 3, 8)
    assert norms._signature(x, (torch.ones(8), 1e-6)) == (torch.float32, torch.float32, 1e-6)
