"""Normalisation and modulation with LongCat's fp32 islands (SPEC 6 step 4).

Every helper computes in fp32 whatever the input dtype and returns the dtype stated in its
docstring; they are the only place these islands are written, so the golden tests and the model
cannot drift apart.

Fusion: on CUDA tensors each island runs as one ``torch.compile``-generated kernel (dynamic
shapes, so one compilation serves every token count) instead of 4-6 eager passes over fp32
copies of the activations (about 20 GB of memory traffic per block at 480p B2 eagerly). The math
is the same fp32 expression; only the order of the fp32 reduction inside the LayerNorm / RMSNorm
differs, so results agree with the eager path to fp32 rounding (the numerics class of upstream).
``LONGCAT_KERNELS_FUSE_ISLANDS=0`` keeps the eager path (read at each CUDA call, not at import: a
bad value raises ``ValueError`` naming it there, and the import of the package never fails on it).
CPU tensors always take the eager path.
If compilation fails, a warning says why and the eager path is used from then on.
"""

from __future__ import annotations

import types
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_kernels._envvars import env_flag
from longcat_kernels._validate import needs_grad

__all__ = [
    "RMSNorm",
    "FP32LayerNorm",
    "modulate",
    "gated_residual",
    "rms_norm",
    "layer_norm_fp32",
    "silu_mul",
    "fused_islands_enabled",
]


# ---------------------------------------------------------------------- eager definitions
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight.to(x.dtype)


def _layer_norm_fp32(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float) -> torch.Tensor:
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
              out_dtype: torch.dtype) -> torch.Tensor:
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    # Same expression order as upstream (scale + 1 first).
    y = y * (scale + 1) + shift
    return y.to(out_dtype)


def _gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    return (x.float() + gate * branch.float()).to(x.dtype)


def _silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


# ---------------------------------------------------------------------- fusion switch
_compiled: Dict[Callable, Callable] = {}
_failed: Dict[Callable, str] = {}


def fused_islands_enabled() -> bool:
    """True when CUDA activations run the compiled (fused) islands (``LONGCAT_KERNELS_FUSE_ISLANDS``,
    read now: a bad value raises ``ValueError`` naming the variable)."""
    return env_flag("LONGCAT_KERNELS_FUSE_ISLANDS", True)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def _signature(x: torch.Tensor, args: tuple) -> tuple:
    """The dtypes (and non-tensor constants) of one call: one compiled copy per signature."""
    return (x.dtype,) + tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)


def compiled(fn: Callable, signature: tuple = ()) -> Callable:
    """``torch.compile(fn, dynamic=True, fullgraph=True)``, built once per (function, signature).

    Dynamo keeps its compiled graphs, and its recompile limit (8), per *code object*. One graph per
    dtype signature x {batch 1, batch >= 2} x {per-frame, per-video modulation} already adds up to
    the limit in a process that runs fp32, bf16 and fp16 models (seen on the H100 in the GPU tests:
    the limit was hit and the island fell back to eager). Each signature therefore compiles its own
    copy of ``fn``'s code, so only the shape variants of one dtype signature share a limit.
    """
    key = (fn, signature)
    c = _compiled.get(key)
    if c is None:
        code = fn.__code__.replace()  # a new code object: its own dynamo cache
        copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        c = torch.compile(copy, dynamic=True, fullgraph=True)
        _compiled[key] = c
    return c


def _run(fn: Callable, x: torch.Tensor, *args):
    if not x.is_cuda or _compiling() or not fused_islands_enabled():
        return fn(x, *args)
    if needs_grad(x, *args):
        # Training (longcat_vc.training): the islands are an inference fusion. Under activation
        # checkpointing the recompute stops early by raising inside the compiled region (seen on the
        # H200: _StopRecomputationError, then a checkpoint assertion); eager autograd is exact.
        return fn(x, *args)
    sig = _signature(x, args)
    if (fn, sig) in _failed:
        return fn(x, *args)
    # A view carries guards on its base's sizes/strides: every new base shape (batch 1 vs 2, each
    # frame count) recompiled until the recompile limit was hit on the H100. Detached aliases have no
    # base, so one dynamic-shape graph serves them all.
    x = x.detach()
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        return compiled(fn, sig)(x, *args)
    except Exception as e:  # compilation problems (no compiler, triton mismatch...): say so once
        _failed[(fn, sig)] = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"longcat_vc: fused {fn.__name__.lstrip('_')} ({', '.join(map(str, sig))}) could not be compiled "
            f"({_failed[(fn, sig)][:300]}); using the eager fp32 path (set LONGCAT_KERNELS_FUSE_ISLANDS=0 to silence)",
            RuntimeWarning,
            stacklevel=3,
        )
        return fn(x, *args)


# ---------------------------------------------------------------------- public helpers
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x / rms(x))`` in fp32, cast to ``x.dtype``, then times ``weight`` (in ``x.dtype``)."""
    return _run(_rms_norm, x, weight, eps)


def layer_norm_fp32(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim in fp32 (affine params upcast), cast back to ``x.dtype``."""
    return _run(_layer_norm_fp32, x, weight, bias, eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``LayerNorm_fp32(x, no affine) * (1 + scale) + shift`` in fp32, cast to ``out_dtype``.

    Args:
        x (Tensor): ``[B, T, S, C]`` any float dtype (tokens grouped per latent frame).
        shift, scale (Tensor): ``[B, T, 1, C]`` fp32 (per-frame modulation).
        out_dtype: result dtype; defaults to ``x.dtype``.
    """
    return _run(_modulate, x, shift, scale, eps, out_dtype or x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + gate * branch`` in fp32, cast to ``x.dtype``.

    Args:
        x (Tensor): ``[B, T, S, C]`` residual stream (weight dtype).
        gate (Tensor): ``[B, T, 1, C]`` fp32.
        branch (Tensor): ``[B, T, S, C]`` attention or FFN output (weight dtype).
    """
    return _run(_gated_residual, x, gate, branch)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate ``silu(a) * b`` in the activation dtype."""
    return _run(_silu_mul, a, b)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (head_dim), normalised in fp32 (upstream ``RMSNorm_FP32``).

    State dict: ``weight [dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (affine params upcast), result cast back to the input dtype.

    With ``elementwise_affine=True`` the state dict holds ``weight`` and ``bias`` ``[dim]``
    (``pre_crs_attn_norm``); the modulation norms are non-affine and hold nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return layer_norm_fp32(x, self.weight, self.bias, self.eps)
