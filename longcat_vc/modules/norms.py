"""Normalisation and modulation with LongCat's fp32 islands (SPEC 6 step 4).

All three helpers compute in fp32 whatever the input dtype and return the dtype stated in their
docstring; they are the only place these islands are written, so the golden tests and the model
cannot drift apart.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RMSNorm", "FP32LayerNorm", "modulate", "gated_residual", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x / rms(x))`` in fp32, cast to ``x.dtype``, then times ``weight`` (in ``x.dtype``)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight.to(x.dtype)


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
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``LayerNorm_fp32(x, no affine) * (1 + scale) + shift`` in fp32, cast to ``out_dtype``.

    Args:
        x (Tensor): ``[B, T, S, C]`` any float dtype (tokens grouped per latent frame).
        shift, scale (Tensor): ``[B, T, 1, C]`` fp32 (per-frame modulation).
        out_dtype: result dtype; defaults to ``x.dtype``.
    """
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    # Same expression order as upstream (scale + 1 first) so fp32 results agree bit for bit.
    y = y * (scale + 1) + shift
    return y.to(out_dtype or x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + gate * branch`` in fp32, cast to ``x.dtype``.

    Args:
        x (Tensor): ``[B, T, S, C]`` residual stream (weight dtype).
        gate (Tensor): ``[B, T, 1, C]`` fp32.
        branch (Tensor): ``[B, T, S, C]`` attention or FFN output (weight dtype).
    """
    return (x.float() + gate * branch.float()).to(x.dtype)
