"""Triton kernel of ``fp8_quantize``: one program per row, the whole row in registers.

One read of the input row(s), one write of the e4m3 row and its scale (and, when asked, of the
activation in its dtype): the quantisation of a ``[62,400, 11,008]`` SwiGLU product reads 2.7 GB
and writes 0.7 GB once. ``torch.compile`` of the same expressions (the first fp8 path) generated
looped reductions that read each row two or three times: 2.1 ms for that shape vs ~1 ms here
(H200, ``bench/dev/fp8_step_dev.py``).

Prologues (constexpr ``PROLOGUE``): 0 none, 1 LayerNorm (optional affine), 2 adaLN modulate
(LayerNorm without affine, ``* (1 + scale) + shift`` with per-frame fp32 rows), 3 ``silu(a) * b``.
The activation is rounded to the input dtype before the scale is taken, as the unfused path does.
NaN or +-inf in a row makes its scale NaN and every element of the row NaN (never a clamped finite
value, never an inf scale).

In the Triton CPU interpreter (``TRITON_INTERPRET=1``, CPU tensors) the kernel stores the clamped
fp32 values and torch casts them to e4m3: the interpreter's own float8 conversion is wrong (triton
3.9: subnormals flushed to zero, 124.7 -> 64 where the mantissa carries into the next binade), so
the CPU tests check everything but the final ``cvt`` instruction, which the GPU tests check.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from longcat_kernels.dispatch import launcher

PROLOGUES = {"none": 0, "layer_norm": 1, "modulate": 2, "silu_mul": 3}


@triton.jit
def fp8_rows_kernel(X, X2, SHIFT, SCALE, W, BIAS, Q, S, Y,
                    C, stride_x, stride_x2, stride_q, stride_y,
                    rows_per_frame, frames, sh_b, sh_t, sc_b, sc_t, eps,
                    PROLOGUE: tl.constexpr, HAS_AFFINE: tl.constexpr, WRITE_Y: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < C
    x = tl.load(X + row * stride_x + offs, mask=m, other=0.0)
    act = X.dtype.element_ty
    xf = x.to(tl.float32)
    if PROLOGUE == 3:
        b = tl.load(X2 + row * stride_x2 + offs, mask=m, other=0.0).to(tl.float32)
        sa = (xf / (1.0 + tl.exp(-xf))).to(act).to(tl.float32)
        y = (sa * b).to(act).to(tl.float32)
    elif PROLOGUE == 1 or PROLOGUE == 2:
        mean = tl.sum(xf, axis=0) / C
        d = tl.where(m, xf - mean, 0.0)
        var = tl.sum(d * d, axis=0) / C
        # a variance past fp32's range (|x - mean| ~ 1e19, bf16/fp32 rows) gave rsqrt 0 and a row of zeros
        # (a finite row, scale 1e-12 / 448); NaN instead, as torch's layer_norm gives for it
        var = tl.where(var == float("inf"), float("nan"), var)
        yn = d * tl.math.rsqrt(var + eps)
        if PROLOGUE == 1:
            if HAS_AFFINE:
                w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
                bb = tl.load(BIAS + offs, mask=m, other=0.0).to(tl.float32)
                yn = yn * w + bb
        else:
            f = row // rows_per_frame
            bi = f // frames
            ti = f % frames
            sh = tl.load(SHIFT + bi * sh_b + ti * sh_t + offs, mask=m, other=0.0).to(tl.float32)
            sc = tl.load(SCALE + bi * sc_b + ti * sc_t + offs, mask=m, other=0.0).to(tl.float32)
            yn = yn * (sc + 1.0) + sh
        y = yn.to(act).to(tl.float32)
    else:
        y = xf
    y = tl.where(m, y, 0.0)
    nan_row = tl.max((y != y).to(tl.int32), axis=0) > 0
    amax = tl.max(tl.abs(y), axis=0)
    nan_row = nan_row | (amax == float("inf"))  # +-inf: a NaN scale too, never an inf one
    s = tl.maximum(amax, 1e-12) / 448.0
    s = tl.where(nan_row, float("nan"), s)
    r = tl.math.div_rn(y, tl.zeros_like(y) + s)
    r = tl.minimum(tl.maximum(r, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    tl.store(Q + row * stride_q + offs, r.to(Q.dtype.element_ty), mask=m)  # e4m3, or fp32 in the interpreter
    tl.store(S + row, s)
    if WRITE_Y:
        tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=m)


def _num_warps(block: int) -> int:
    return 4 if block <= 4096 else (8 if block <= 8192 else 16)


def fp8_quantize_triton(prologue: str, x: torch.Tensor, x2: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        eps: float, return_input: bool):
    """``x [M, C]`` (rows contiguous along C), ``x2 [M, C]`` (silu_mul), ``shift/scale [B, T', C]`` with
    ``M = B * frames * rows_per_frame`` (modulate; the api passes ``frames`` and ``rows_per_frame``
    through ``shift``'s view, see api.py) -> ``(q [M, C] e4m3, s [M, 1] fp32, y [M, C] or None)``.

    One registered op, ``longcat_kernels::fp8_quantize_rows`` (a fake beside it), so that
    ``torch.compile`` keeps the call as one op instead of tracing into the launcher."""
    # no output carries a gradient here (a y that needs one goes to the torch path): detached inputs, or the op
    # (no autograd registered) would hand back outputs whose backward raises
    x, x2, shift, scale, weight, bias = (None if t is None else t.detach() for t in (x, x2, shift, scale, weight, bias))
    q, s, y = torch.ops.longcat_kernels.fp8_quantize_rows(x, x2, shift, scale, weight, bias, prologue, float(eps),
                                                          bool(return_input))
    return q, s, (y if return_input else None)


def _check_op_args(x, x2, shift, scale, weight, bias, prologue) -> None:
    """Shape-only checks of what the kernel indexes (the public functions pass valid arguments; a direct
    ``torch.ops`` call may not, and the kernel would read out of bounds): rows with a unit last stride."""
    op = "fp8_quantize_rows"
    if prologue not in PROLOGUES:
        raise ValueError(f"{op}: prologue: expected one of {sorted(PROLOGUES)}, got {prologue!r}")
    if x.dim() != 2 or (x.numel() and x.stride(1) != 1):
        raise ValueError(f"{op}: x: expected [M, C] with unit stride along C, got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    M, C = x.shape
    need = {"silu_mul": ("x2",), "modulate": ("shift", "scale")}.get(prologue, ())
    given = {"x2": x2, "shift": shift, "scale": scale}
    for n, t in given.items():
        if (t is not None) != (n in need):
            raise ValueError(f"{op}: {n}: expected {'a tensor' if n in need else 'None'} with prologue "
                             f"{prologue!r}, got {'None' if t is None else 'a tensor'}")
    if x2 is not None and (x2.shape != x.shape or (x2.numel() and x2.stride(1) != 1)):
        raise ValueError(f"{op}: x2: expected x's shape {tuple(x.shape)} with unit stride along C, got shape "
                         f"{tuple(x2.shape)}, strides {x2.stride()}")
    if shift is not None:
        for n, t in (("shift", shift), ("scale", scale)):
            if t.dim() != 3 or t.shape[2] != C or t.shape != shift.shape or t.stride(2) != 1:
                raise ValueError(f"{op}: {n}: expected [B, F, {C}] (shift's shape) with unit stride along C, got "
                                 f"shape {tuple(t.shape)}")
        bf = shift.shape[0] * shift.shape[1]
        if (M % bf) if bf else M:
            raise ValueError(f"{op}: x: expected rows a multiple of B*F = {shift.shape[0] * shift.shape[1]} "
                             f"(shift {tuple(shift.shape)}), got {M}")
    if (weight is None) != (bias is None) or (weight is not None and prologue != "layer_norm"):
        raise ValueError(f"{op}: weight/bias: expected both (prologue 'layer_norm') or neither")
    for n, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != C or t.stride(0) != 1):
            raise ValueError(f"{op}: {n}: expected a contiguous [{C}], got shape {tuple(t.shape)}")


@torch.library.custom_op("longcat_kernels::fp8_quantize_rows", mutates_args=())
def _fp8_quantize_rows_op(x: torch.Tensor, x2: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                          scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          prologue: str, eps: float, return_input: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(q [M, C] e4m3, s [M, 1] fp32, y [M, C] in x's dtype, or an empty tensor when not return_input)``."""
    _check_op_args(x, x2, shift, scale, weight, bias, prologue)
    M, C = x.shape
    interp = x.device.type == "cpu"  # the interpreter: fp32 values, cast by torch below
    q = torch.empty((M, C), device=x.device, dtype=torch.float32 if interp else torch.float8_e4m3fn)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    y = torch.empty((M, C) if return_input else (0,), device=x.device, dtype=x.dtype)
    if M == 0:
        return q.to(torch.float8_e4m3fn), s, y
    rows_per_frame, frames = 1, 1
    sh_b = sh_t = sc_b = sc_t = 0
    if prologue == "modulate":
        # shift/scale arrive as [B, F, C] with frames F (1: per video) and rows per frame R = M / (B F)
        B, F_, _ = shift.shape
        rows_per_frame = M // (B * F_)
        frames = F_
        sh_b, sh_t = shift.stride(0), shift.stride(1)
        sc_b, sc_t = scale.stride(0), scale.stride(1)
    block = triton.next_power_of_2(C)
    dummy = x
    launcher(fp8_rows_kernel, (M,))(
        x, x2 if x2 is not None else dummy, shift if shift is not None else dummy,
        scale if scale is not None else dummy, weight if weight is not None else dummy,
        bias if bias is not None else dummy, q, s, y if return_input else dummy,
        C, x.stride(0), x2.stride(0) if x2 is not None else 0, q.stride(0), y.stride(0) if return_input else 0,
        rows_per_frame, frames, sh_b, sh_t, sc_b, sc_t, float(eps),
        PROLOGUE=PROLOGUES[prologue], HAS_AFFINE=weight is not None, WRITE_Y=return_input,
        BLOCK=block, num_warps=_num_warps(block),
    )
    if interp:
        q = q.to(torch.float8_e4m3fn)
    return q, s, y


@_fp8_quantize_rows_op.register_fake
def _(x, x2, shift, scale, weight, bias, prologue, eps, return_input):
    M, C = x.shape
    return (x.new_empty((M, C), dtype=torch.float8_e4m3fn), x.new_empty((M, 1), dtype=torch.float32),
            x.new_empty((M, C) if return_input else (0,)))
