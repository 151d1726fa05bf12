"""The torch reference of ``fp8_quantize`` (SPEC of the op in ``api.py``): exact, any device."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_AMAX = 1e-12


def prologue_reference(prologue: str, x: torch.Tensor, x2: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                       scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float) -> torch.Tensor:
    """The activation ``y`` in ``x.dtype`` that gets quantised (see ``api.fp8_quantize``)."""
    if prologue == "none":
        return x
    if prologue == "silu_mul":
        return F.silu(x) * x2
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)
    if prologue == "modulate":
        y = y * (scale.float() + 1) + shift.float()
    return y.to(x.dtype)


def quantize_rows_reference(y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y [..., K]`` -> ``(q [..., K] e4m3, s [..., 1] fp32)``, ``s = max(amax_k |y|, 1e-12) / 448``,
    ``q = e4m3(clamp(y / s, -448, 448))`` (round to nearest even); a row holding NaN or +-inf: NaN."""
    yf = y.float()
    amax = yf.abs().amax(dim=-1, keepdim=True)
    # NaN propagates through amax; a row holding +-inf gets a NaN scale too (an inf one made 0 * inf)
    s = torch.where(torch.isinf(amax), float("nan"), amax.clamp(min=MIN_AMAX) / E4M3_MAX)
    # row-major as the Triton kernel's (torch._scaled_mm's mat1 must be): a transposed y gave a column-major q
    q = (yf / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3, memory_format=torch.contiguous_format)
    return q, s
