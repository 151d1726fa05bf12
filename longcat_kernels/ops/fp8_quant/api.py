"""Row-wise float8 e4m3 quantisation of activations, for fp8 GEMMs (``torch._scaled_mm`` row-wise).

Semantics (every backend)::

    y    = prologue(x, ...)            in x.dtype (the activation the unfused model would hold)
    s[m] = max(max_k |y[m, k]|, 1e-12) / 448                                  fp32, shape [..., 1]
    q    = e4m3(clamp(y / s, -448, 448))                         round to nearest even, [..., K]

so ``y ~= q * s`` row by row. Prologues, each fused into the same pass over the row:

- ``fp8_quantize_rows(x)``: ``y = x``.
- ``fp8_layer_norm_quantize(x, weight, bias, eps)``: ``y = LayerNorm_fp32(x; weight, bias).to(x.dtype)``.
- ``fp8_modulate_quantize(x, shift, scale, eps)``: adaLN, ``y = (LayerNorm_fp32(x) * (1 + scale) +
  shift).to(x.dtype)`` with ``x [B, T, S, C]`` and per-frame (``[B, T, 1, C]``) or per-video
  (``[B, 1, 1, C]``) fp32 ``shift``/``scale``.
- ``fp8_silu_mul_quantize(a, b)``: SwiGLU gate ``y = silu(a) * b`` in the activation dtype.

A row holding NaN or +-inf gets a NaN scale and NaN values (e4m3fn has NaN), never a clamped finite
row; the scale is never 0 or inf.
``return_input=True`` also returns ``y`` (e.g. for LoRA adapters that run beside the fp8 GEMM).
Forward only. Backends: ``torch`` (reference, any device), ``triton`` (CUDA sm89+, or the CPU
interpreter in fp32/fp16); ``auto`` takes Triton on CUDA.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ...dispatch import choose, impl_fn
from ..._validate import check_backend_name, check_eps, check_same_device, check_tensor, compiling
from ..._validate import needs_grad as _needs_grad
from . import reference as ref

__all__ = ["fp8_quantize_rows", "fp8_layer_norm_quantize", "fp8_modulate_quantize", "fp8_silu_mul_quantize",
           "E4M3_MAX"]

E4M3_MAX = ref.E4M3_MAX
Result = Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _check_x(x, name: str) -> None:
    check_tensor(x, name, ndim=None)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected a tensor [..., K] with K >= 1, got shape {tuple(x.shape)}")


def _check_flag(v, name: str) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__} {v!r}")


def _run(prologue: str, x: torch.Tensor, x2=None, shift=None, scale=None, weight=None, bias=None, eps: float = 0.0,
         return_input: bool = False, backend: str = "auto") -> Result:
    lead, K = tuple(x.shape[:-1]), x.shape[-1]
    # only y (return_input) carries a gradient (q and s are not differentiable): the Triton kernel is
    # forward only, so a y that needs one goes to the torch path (an explicit "triton" raises)
    ts = [t for t in (x, x2, shift, scale, weight, bias) if t is not None]
    needs_grad = return_input and _needs_grad(*ts)
    choice = choose("fp8_quantize", x, x2, shift, scale, weight, bias, requested=backend, needs_grad=needs_grad)
    if choice.impl == "torch_reference":
        y = ref.prologue_reference(prologue, x, x2, shift, scale, weight, bias, eps)
        q, s = ref.quantize_rows_reference(y.detach())  # no gradient, as from the Triton kernel
        return (q, s, y) if return_input else (q, s)
    x2d = x.reshape(-1, K)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    b2d = None
    if x2 is not None:
        b2d = x2.reshape(-1, K)
        if b2d.stride(-1) != 1:
            b2d = b2d.contiguous()
    sh = sc = None
    if prologue == "modulate":
        sh, sc = shift[:, :, 0, :], scale[:, :, 0, :]  # [B, F, C] views
        if sh.stride(-1) != 1:
            sh = sh.contiguous()
        if sc.stride(-1) != 1:
            sc = sc.contiguous()
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    q, s, y = impl_fn("fp8_quantize", choice.impl)(prologue, x2d, b2d, sh, sc, w, b, eps, return_input)
    q, s = q.view(*lead, K), s.view(*lead, 1)
    return (q, s, y.view(*lead, K)) if return_input else (q, s)


def fp8_quantize_rows(x: torch.Tensor, *, return_input: bool = False, backend: str = "auto") -> Result:
    """``x [..., K]`` -> ``(q [..., K] float8_e4m3fn, s [..., 1] fp32)`` with ``x ~= q * s`` per row.

    Args:
        x (Tensor): float16/bfloat16/float32 (float64: torch backend), any strides.
        return_input (bool): also return ``x`` (the third element; for symmetry with the prologues).
        backend (str): ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    if not compiling():
        check_backend_name(backend)
        _check_x(x, "x")
        _check_flag(return_input, "return_input")
    return _run("none", x, return_input=return_input, backend=backend)


def fp8_layer_norm_quantize(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                            eps: float = 1e-5, *, return_input: bool = False, backend: str = "auto") -> Result:
    """LayerNorm over the last dim in fp32 (``weight`` and ``bias [K]``, both or neither: a weight-only
    LayerNorm is refused), cast to ``x.dtype``, then
    row-wise e4m3 quantisation. Returns ``(q, s)`` or ``(q, s, y)``."""
    if not compiling():
        check_backend_name(backend)
        _check_x(x, "x")
        _check_flag(return_input, "return_input")
        K = x.shape[-1]
        if (weight is None) != (bias is None):
            raise ValueError("weight/bias: expected both or neither (an affine LayerNorm has both)")
        for n, t in (("weight", weight), ("bias", bias)):
            if t is not None:
                check_tensor(t, n, ndim=1, layout=f"[{K}]")
                if t.shape[0] != K:
                    raise ValueError(f"{n}: expected shape ({K},) (x's last dim), got {tuple(t.shape)}")
        check_same_device([("x", x), ("weight", weight), ("bias", bias)])
    return _run("layer_norm", x, weight=weight, bias=bias, eps=check_eps(eps, "LayerNorm"), return_input=return_input,
                backend=backend)


def fp8_modulate_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *,
                          return_input: bool = False, backend: str = "auto") -> Result:
    """adaLN modulation ``(LayerNorm_fp32(x) * (1 + scale) + shift).to(x.dtype)`` then row-wise e4m3.

    Args:
        x (Tensor): ``[B, T, S, C]`` (tokens grouped per latent frame), any strides.
        shift, scale (Tensor): ``[B, T, 1, C]`` (per frame) or ``[B, 1, 1, C]`` (per video), fp32.
        eps (float): LayerNorm epsilon (LongCat: 1e-6).

    Returns:
        ``(q [B, T, S, C] e4m3, s [B, T, S, 1] fp32)``, plus ``y`` with ``return_input=True``.
    """
    if not compiling():
        check_backend_name(backend)
        check_tensor(x, "x", ndim=4, layout="[B, T, S, C]")
        _check_flag(return_input, "return_input")
        B, T, _, C = x.shape
        if C < 1:
            raise ValueError(f"x: expected C >= 1, got shape {tuple(x.shape)}")
        for n, t in (("shift", shift), ("scale", scale)):
            check_tensor(t, n, ndim=4, layout=f"[B, T or 1, 1, C] = [{B}, {T} or 1, 1, {C}]")
            if t.shape[0] != B or t.shape[1] not in (T, 1) or t.shape[2] != 1 or t.shape[3] != C:
                raise ValueError(f"{n}: expected shape ({B}, {T} or 1, 1, {C}) for x of shape {tuple(x.shape)}, "
                                 f"got {tuple(t.shape)}")
        if shift.shape[1] != scale.shape[1]:
            raise ValueError(f"scale: expected the same frames as shift ({shift.shape[1]}), got {scale.shape[1]}")
        check_same_device([("x", x), ("shift", shift), ("scale", scale)])
    return _run("modulate", x, shift=shift, scale=scale, eps=check_eps(eps, "LayerNorm"), return_input=return_input,
                backend=backend)


def fp8_silu_mul_quantize(a: torch.Tensor, b: torch.Tensor, *, return_input: bool = False,
                          backend: str = "auto") -> Result:
    """SwiGLU gate ``silu(a) * b`` in the activation dtype, then row-wise e4m3. ``a``, ``b`` same shape
    ``[..., K]`` and dtype. Returns ``(q, s)`` or ``(q, s, y)``."""
    if not compiling():
        check_backend_name(backend)
        _check_x(a, "a")
        _check_x(b, "b")
        _check_flag(return_input, "return_input")
        if b.shape != a.shape:
            raise ValueError(f"b: expected shape {tuple(a.shape)} (same as a), got {tuple(b.shape)}")
        if b.dtype != a.dtype:
            raise TypeError(f"b: expected dtype {a.dtype} (same as a), got {b.dtype}")
        check_same_device([("a", a), ("b", b)])
    return _run("silu_mul", a, x2=b, return_input=return_input, backend=backend)
