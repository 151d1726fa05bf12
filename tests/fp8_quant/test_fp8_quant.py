"""``fp8_quantize`` (row-wise e4m3 activations with fused LayerNorm / adaLN / SwiGLU prologues): the
torch reference against the formula in float64, the Triton kernel against the reference (CPU
interpreter in fp32/fp16, bf16 at DiT shapes on the GPU), NaN never turned into finite values,
and named errors for bad input.

Outputs of the kernel are NaN-poisoned before it runs (tests/conftest.py), so an element it does not
write fails the comparison. The interpreter stores fp32 values that torch casts (see the kernel's
docstring): the final e4m3 ``cvt`` is checked on the GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longcat_kernels as lk
from helpers import DEV, TRITON

E4M3 = torch.float8_e4m3fn
CPU_DTYPES = [torch.float32, torch.float16]


def _codes(q):
    """e4m3 codes as signed steps from zero (sign-magnitude: +0 and -0 are both 0, one code either side of
    zero 2 apart), so a difference counts rounding steps; raw bytes put -0 (0x80) 128 from +0, which a
    modulate rounding to zero from either side produced on the H100 (session 21)."""
    b = q.view(torch.uint8).to(torch.int16)
    return torch.where(b >= 128, -(b - 128), b)


def _assert_same_quantisation(got, exp, *, exact: bool, dtype=torch.float32):
    """Scales agree to fp32 rounding; codes agree exactly (``exact``) or, where the prologue's fp32
    reduction order moves an activation across a rounding boundary, by one code in <= 1% of the
    elements. Not exact, a row's largest activation may also round to the neighbouring value of a
    half-precision ``dtype`` (the prologue's output is rounded to it before the amax), so the scale
    may differ by one ulp of ``dtype`` (CI saw 9.1e-4 relative in fp16, ulp 9.8e-4)."""
    (qg, sg), (qe, se) = got[:2], exp[:2]
    assert qg.dtype == E4M3 and qg.shape == qe.shape and sg.shape == se.shape and sg.dtype == torch.float32
    assert not torch.isnan(sg).any() and not torch.isnan(qg.float()).any()
    half = dtype in (torch.float16, torch.bfloat16)
    torch.testing.assert_close(sg, se, rtol=torch.finfo(dtype).eps if half and not exact else 2e-6, atol=0)
    d = (_codes(qg) - _codes(qe)).abs()
    if exact:
        assert int(d.max()) == 0, f"{int((d > 0).sum())} codes differ"
    else:
        assert int(d.max()) <= 1 and float((d > 0).float().mean()) <= 0.01, (int(d.max()), float((d > 0).float().mean()))


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


# --------------------------------------------------------------------- the reference vs the formula
def test_reference_is_the_formula():
    x = torch.randn(5, 7, 96, dtype=torch.float64) * torch.logspace(-4, 3, 7, dtype=torch.float64)[:, None]
    q, s = lk.fp8_quantize_rows(x, backend="torch")
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(s, amax.float() / 448)  # fp32 scale of the fp32 amax
    # every row's largest entry lands on +-448, and e4m3 rounding is within 2^-4 relative (normal range)
    assert torch.equal(q.float().abs().amax(-1), torch.full((5, 7), 448.0))
    deq = q.double() * s.double()
    big = x.abs() > amax * 2 ** -6  # normal e4m3 range after the scale
    assert ((deq - x).abs()[big] <= x.abs()[big] * 2 ** -4 + 1e-30).all()
    # round to nearest even, not truncation: more than a third of the entries round up in magnitude
    assert 0.3 < float((deq.abs()[big] > x.abs()[big]).double().mean()) < 0.7
    # a zero row: scale 1e-12 / 448, zeros
    q0, s0 = lk.fp8_quantize_rows(torch.zeros(2, 16), backend="torch")
    assert torch.equal(q0.float(), torch.zeros(2, 16)) and torch.allclose(s0, torch.full((2, 1), 1e-12 / 448))


def test_reference_prologues_are_the_model_formulas():
    x = torch.randn(2, 3, 5, 64, dtype=torch.float64)
    shift, scale = torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64) * 0.2
    w, b = torch.randn(64), torch.randn(64)
    a, g = torch.randn(4, 80), torch.randn(4, 80)
    cases = [
        (lk.fp8_modulate_quantize(x, shift, scale, 1e-6, return_input=True, backend="torch"),
         (F.layer_norm(x, (64,), eps=1e-6) * (1 + scale.double()) + shift.double())),
        (lk.fp8_layer_norm_quantize(x, w, b, 1e-5, return_input=True, backend="torch"),
         F.layer_norm(x, (64,), w.double(), b.double(), 1e-5)),
        (lk.fp8_silu_mul_quantize(a, g, return_input=True, backend="torch"), (F.silu(a.double()) * g.double())),
    ]
    for (q, s, y), exp in cases:
        torch.testing.assert_close(y.double(), exp.to(y.dtype).double(), rtol=1e-5, atol=1e-6)
        qr, sr = lk.fp8_quantize_rows(y, backend="torch")
        assert torch.equal(_codes(q), _codes(qr)) and torch.equal(s, sr)


# --------------------------------------------------------------------- the Triton kernel
@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", CPU_DTYPES if DEV == "cpu" else [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K", [48, 100])
def test_triton_matches_reference(backend, dtype, K):
    B, T, S = 2, 3, 5
    x = _rand(B, T, S, K, dtype=dtype, scale=3.0) + _rand(K, dtype=dtype)  # rows with an offset: LN matters
    shift, scale = _rand(B, T, 1, K) * 0.5, _rand(B, T, 1, K) * 0.3
    w, b = _rand(K, dtype=dtype), _rand(K, dtype=dtype)
    a, g = _rand(7, K, dtype=dtype, scale=2.0), _rand(7, K, dtype=dtype)
    strided = _rand(7, 2 * K, dtype=dtype)[:, ::2]  # last-dim stride 2: copied to rows
    sliced = _rand(7, 2 * K, dtype=dtype)[:, K:]  # row stride 2K
    calls = [
        ("rows", lambda be, r: lk.fp8_quantize_rows(x, return_input=r, backend=be), True),
        ("rows strided", lambda be, r: lk.fp8_quantize_rows(strided, return_input=r, backend=be), True),
        ("rows sliced", lambda be, r: lk.fp8_quantize_rows(sliced, return_input=r, backend=be), True),
        ("modulate per frame", lambda be, r: lk.fp8_modulate_quantize(x, shift, scale, 1e-6, return_input=r, backend=be), False),
        ("modulate per video",
         lambda be, r: lk.fp8_modulate_quantize(x, shift[:, :1], scale[:, :1], 1e-6, return_input=r, backend=be), False),
        ("modulate chunk view", lambda be, r: lk.fp8_modulate_quantize(
            x, *torch.cat([shift, scale], -1).chunk(2, -1), 1e-6, return_input=r, backend=be), False),
        ("layer norm affine", lambda be, r: lk.fp8_layer_norm_quantize(x, w, b, 1e-6, return_input=r, backend=be), False),
        ("layer norm", lambda be, r: lk.fp8_layer_norm_quantize(x, return_input=r, backend=be), False),
        ("silu mul", lambda be, r: lk.fp8_silu_mul_quantize(a, g, return_input=r, backend=be), False),  # exp differs by ulps
    ]
    for name, call, exact in calls:
        exp = call("torch", True)
        for r in (False, True):
            got = call(backend, r)
            assert len(got) == (3 if r else 2), name
            # the exact class needs identical arithmetic: fp16/bf16 silu rounds after the same exp
            _assert_same_quantisation(got, exp, exact=exact and dtype != torch.bfloat16, dtype=dtype)
            if r:
                assert got[2].dtype == dtype and got[2].shape == exp[2].shape
                tol = 0 if exact else (1e-5 if dtype == torch.float32 else 1e-2)
                torch.testing.assert_close(got[2].float(), exp[2].float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_nan_and_inf_never_become_finite(backend):
    x = _rand(6, 40)
    x[1, 7] = float("nan")
    x[4, 0] = float("inf")
    for q, s in (lk.fp8_quantize_rows(x, backend=backend), lk.fp8_layer_norm_quantize(x, backend=backend)[:2]):
        qf = q.float()
        assert torch.isnan(s[1]).all() and torch.isnan(qf[1]).all(), "a NaN row must stay NaN"
        assert not torch.isfinite(s[4]).all() or torch.isnan(qf[4]).any()
        ok = [0, 2, 3, 5]
        assert torch.isfinite(s[ok]).all() and torch.isfinite(qf[ok]).all()


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_empty_rows(backend):
    q, s = lk.fp8_quantize_rows(torch.zeros(0, 3, 32, device=DEV), backend=backend)
    assert q.shape == (0, 3, 32) and s.shape == (0, 3, 1) and q.dtype == E4M3


# --------------------------------------------------------------------- errors
def test_bad_inputs_are_named():
    x = torch.randn(2, 3, 4, 16)
    sh = torch.randn(2, 3, 1, 16)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        lk.fp8_quantize_rows([1.0, 2.0])
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        lk.fp8_quantize_rows(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x: expected a tensor \[\.\.\., K\] with K >= 1"):
        lk.fp8_quantize_rows(torch.randn(3, 0))
    with pytest.raises(ValueError, match="backend: expected one of"):
        lk.fp8_quantize_rows(x, backend="fast")
    with pytest.raises(TypeError, match="return_input: expected a bool"):
        lk.fp8_quantize_rows(x, return_input=1)
    with pytest.raises(ValueError, match=r"shift: expected shape \(2, 3 or 1, 1, 16\)"):
        lk.fp8_modulate_quantize(x, sh[:, :2], sh)
    with pytest.raises(ValueError, match=r"scale: expected shape"):
        lk.fp8_modulate_quantize(x, sh, sh[..., :8])
    with pytest.raises(ValueError, match="scale: expected the same frames as shift"):
        lk.fp8_modulate_quantize(x, sh, sh[:, :1])
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor \[B, T, S, C\]"):
        lk.fp8_modulate_quantize(x[0], sh, sh)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps: expected a finite float >= 0"):
            lk.fp8_modulate_quantize(x, sh, sh, eps)
    for eps in (True, "1e-6"):  # not a number: a TypeError, as qk_norm_rope's
        with pytest.raises(TypeError, match="eps: expected a finite float >= 0"):
            lk.fp8_modulate_quantize(x, sh, sh, eps)
    with pytest.raises(ValueError, match="weight/bias: expected both or neither"):
        lk.fp8_layer_norm_quantize(x, torch.ones(16))
    with pytest.raises(ValueError, match=r"weight: expected shape \(16,\)"):
        lk.fp8_layer_norm_quantize(x, torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match=r"b: expected shape \(2, 3, 4, 16\) \(same as a\)"):
        lk.fp8_silu_mul_quantize(x, x[..., :8])
    with pytest.raises(TypeError, match="b: expected dtype torch.float32 .same as a., got torch.float16"):
        lk.fp8_silu_mul_quantize(x, x.half())


def test_explicit_triton_unavailable_is_named(monkeypatch):
    # bf16 in the CPU interpreter, or any CPU tensor without it: refused with the reason, never a fallback
    from longcat_kernels.dispatch import BackendUnavailableError

    if DEV == "cpu":
        with pytest.raises(BackendUnavailableError, match="fp8_quantize: backend 'triton' unavailable: .*fp32/fp16"):
            lk.fp8_quantize_rows(torch.randn(2, 16, dtype=torch.bfloat16), backend="triton")
    with pytest.raises(BackendUnavailableError, match="fp8_quantize: backend 'cuda' unavailable"):
        lk.fp8_quantize_rows(torch.randn(2, 16, device=DEV), backend="cuda")


# --------------------------------------------------------------------- GPU: the real e4m3 conversion
@pytest.mark.cuda
@pytest.mark.triton_gpu
def test_gpu_dit_shapes_bf16():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 conversion needs sm89+")
    B, T, S, C, Fh = 2, 3, 520, 4096, 11008
    x = _rand(B, T, S, C, dtype=torch.bfloat16, scale=2.0)
    shift, scale = _rand(B, T, 1, C) * 0.5, _rand(B, T, 1, C) * 0.3
    a, g = _rand(B * T * S, Fh, dtype=torch.bfloat16, scale=3.0), _rand(B * T * S, Fh, dtype=torch.bfloat16)
    w, b = _rand(C), _rand(C)
    for name, call, exact in [
        ("rows", lambda be: lk.fp8_quantize_rows(x, return_input=True, backend=be), True),
        ("modulate", lambda be: lk.fp8_modulate_quantize(x, shift, scale, return_input=True, backend=be), False),
        ("layer norm", lambda be: lk.fp8_layer_norm_quantize(x, w, b, 1e-6, return_input=True, backend=be), False),
        ("silu mul", lambda be: lk.fp8_silu_mul_quantize(a, g, return_input=True, backend=be), False),
    ]:
        got, exp = call("triton"), call("torch")
        _assert_same_quantisation(got, exp, exact=exact)
        # the activation itself: bf16 rounding of the same fp32 value (one ulp where the fp32 differs)
        d = (got[2].float() - exp[2].float()).abs()
        assert float((d > 0).float().mean()) < 0.01 and float(d.max()) <= float(exp[2].float().abs().max()) * 2 ** -7, name
    # auto picks the kernel here
    from longcat_kernels import dispatch

    with dispatch.record_choices() as got:
        lk.fp8_quantize_rows(x)
    assert got[-1].impl == "triton"
