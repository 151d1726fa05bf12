"""Reference 3D RoPE and q/k RMSNorm (SPEC 5, SPEC 6 step 4). Pure torch, imports no triton."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _math(x: torch.Tensor) -> torch.Tensor:
    """x in the math dtype: fp32, or fp64 for fp64 inputs (never narrower than x)."""
    return x if x.dtype == torch.float64 else x.float()


def rope_part_dims(head_dim: int) -> Tuple[int, int, int]:
    """(t, h, w) dims of the LongCat split: ``(D - 4*(D//6), 2*(D//6), 2*(D//6))``."""
    dh = 2 * (head_dim // 6)
    return head_dim - 2 * dh, dh, dh


def axis_angles(n: int, dim: int, theta: float, device=None) -> torch.Tensor:
    """Angles ``[n, dim // 2]`` fp32: position ``0..n-1`` times ``theta ** (-2i / dim)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    pos = torch.arange(n, dtype=torch.float32, device=device)
    return torch.outer(pos, inv_freq)


def axis_tables(n: int, dim: int, theta: float, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[n, dim]`` fp32 for integer positions ``0..n-1``, each angle repeated for a pair."""
    ang = axis_angles(n, dim, theta, device).repeat_interleave(2, dim=1)
    return ang.cos(), ang.sin()


def full_tables(cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, frame_offset: int, num_frames: int):
    """Token tables ``[num_frames*H*W, D]`` fp32 (concatenation [t | h | w] per token)."""
    H, W = cos_h.shape[0], cos_w.shape[0]
    T = num_frames
    parts = []
    for ct, ch, cw in ((cos_t, cos_h, cos_w), (sin_t, sin_h, sin_w)):
        a = ct[frame_offset : frame_offset + T][:, None, None, :].expand(T, H, W, ct.shape[1])
        b = ch[None, :, None, :].expand(T, H, W, ch.shape[1])
        c = cw[None, None, :, :].expand(T, H, W, cw.shape[1])
        # the width spelt out: -1 cannot be inferred for 0 frames (tables(frame_offset=T) crashed in reshape)
        parts.append(torch.cat([a, b, c], dim=-1).reshape(T * H * W, a.shape[-1] + b.shape[-1] + c.shape[-1]))
    return parts[0], parts[1]


def apply_rope_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: str = "interleaved", dims=None
) -> torch.Tensor:
    """Rotation of ``x [B, S, H, D]`` by token tables ``cos, sin [S, D]`` (each angle at both lanes of
    its pair, ``[t | h | w]``); fp32 math (fp64 for fp64 x; the tables stay fp32).

    ``pairs="interleaved"``: lanes (2i, 2i+1) of the head. ``pairs="half"`` (rotate-half, per axis
    part): inside each part of ``dims`` (d lanes), lane j < d/2 pairs with lane j + d/2, both at the
    part's angle j: ``(a, b) -> (a cos - b sin, b cos + a sin)``.
    """
    if pairs == "half":
        return _apply_rope_half(x, cos, sin, dims)
    xf = _math(x)
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    c = cos[None, :, None, 0::2]
    s = sin[None, :, None, 0::2]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)
    return out.to(x.dtype)


def _apply_rope_half(x, cos, sin, dims):
    xf = _math(x)
    outs, c0 = [], 0
    for d in dims:
        a, b = xf[..., c0 : c0 + d // 2], xf[..., c0 + d // 2 : c0 + d]
        # the table holds angle i at lanes 2i and 2i+1 of the part
        c = cos[None, :, None, c0 : c0 + d : 2]
        s_ = sin[None, :, None, c0 : c0 + d : 2]
        outs += [a * c - b * s_, b * c + a * s_]
        c0 += d
    return torch.cat(outs, dim=-1).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """SPEC 6: normalise in fp32 (fp64 for fp64 x), cast to the input dtype, multiply by the weight in that dtype.

    ``weight [D]``: over each head (LongCat); ``weight [H*D]``: over all heads of a token together
    (Wan's ``norm_q``/``norm_k`` over the inner dim), the weight indexed ``h*D + d``.
    """
    if weight.dim() == 1 and x.dim() == 4 and weight.shape[0] == x.shape[2] * x.shape[3] and x.shape[2] > 1:
        B, S, H, D = x.shape
        return rms_norm_reference(x.reshape(B, S, 1, H * D), weight, eps).view(B, S, H, D)
    xf = _math(x)
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight.to(x.dtype)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    tables: Optional[Tuple[torch.Tensor, torch.Tensor]],
    eps: float,
    pairs: str = "interleaved",
    dims=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    qn = rms_norm_reference(q, q_weight, eps)
    kn = rms_norm_reference(k, k_weight, eps)
    if tables is not None:
        cos, sin = tables
        qn = apply_rope_reference(qn, cos, sin, pairs, dims)
        kn = apply_rope_reference(kn, cos, sin, pairs, dims)
    return qn, kn
