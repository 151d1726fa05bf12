"""Cached-KV and prefix attention, torch reference (SPEC 4). Imports no triton.

- ``prefix_attn_reference``: two SDPA calls (prefix vs prefix, rest vs all), one output.
- ``kv_cache_attn_reference``: softmax over the two key segments [cache; fresh] computed jointly,
  chunked over queries. A batch-1 cache is never expanded into a copy: the queries of all batch
  entries are folded into one matrix against the single cache, so the cache is read as is.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..block_sparse_attn.reference import compute_dtype, stats_dtype
from ..block_sparse_attn.selection import ieee_fp32_matmul

__all__ = ["prefix_attn_reference", "kv_cache_attn_reference", "sdpa_bshd"]


def sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense SDPA on BSHD tensors -> ``[B, Sq, H, D]`` (a transposed view)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


def prefix_attn_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float
) -> torch.Tensor:
    """Queries ``[:prefix_len]`` attend keys ``[:prefix_len]``; the rest attend all keys."""
    S = q.shape[1]
    parts = []
    if prefix_len > 0:
        parts.append(sdpa_bshd(q[:, :prefix_len], k[:, :prefix_len], v[:, :prefix_len], scale))
    if prefix_len < S:
        parts.append(sdpa_bshd(q[:, prefix_len:], k, v, scale))
    return torch.cat(parts, dim=1).contiguous() if len(parts) > 1 else parts[0].contiguous()


def _matmul_bcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [B, H, M, X] @ b [Bc, H, X, N]`` with Bc in {1, B}, never copying ``b``."""
    B, H, M, X = a.shape
    if b.shape[0] == B:
        return torch.matmul(a, b)
    # fold the batch into the rows: [H, B*M, X] @ [H, X, N]
    a2 = a.transpose(0, 1).reshape(H, B * M, X)
    o = torch.matmul(a2, b[0])
    return o.view(H, B, M, -1).transpose(0, 1)


def kv_cache_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: Optional[torch.Tensor],
    v_cache: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """``softmax(q [k_cache; k]^T * scale) [v_cache; v]`` without concatenating or repeating.

    Args:
        q, k, v (Tensor): ``[B, Sn, H, D]`` (already rotated if RoPE applies).
        k_cache, v_cache (Tensor | None): ``[Bc, Sc, H, D]``, Bc in {1, B}.
        scale (float): softmax scale.

    Returns:
        Tensor: ``[B, Sn, H, D]`` in q's dtype, contiguous.
    """
    if k_cache is None:
        return sdpa_bshd(q, k, v, scale).contiguous()
    B, Sn, H, D = q.shape
    Sc = k_cache.shape[1]
    cd, sd = compute_dtype(q), stats_dtype(q)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    kct, vct = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [Bc, H, Sc, D]
    kT_c = kct.to(cd).transpose(-1, -2)  # [Bc, H, D, Sc] (no copy when cd == dtype)
    kT_f = kt.to(cd).transpose(-1, -2)
    vc_c, vf_c = vct.to(cd), vt.to(cd)
    # score elements per query chunk (fp32 scores, probabilities and their casts live at once)
    if q.is_cuda:
        free, _ = torch.cuda.mem_get_info(q.device)
        budget = min(max(free // 32, 1 << 26), 1 << 30)
    else:
        budget = 1 << 26
    step = max(1, budget // max(1, B * H * (Sc + Sn)))
    outs = []
    with ieee_fp32_matmul(q.device):  # an fp32 reference stays fp32 (no TF32) on GPU
        for i0 in range(0, Sn, step):
            qc = qt[:, :, i0 : i0 + step].to(cd)
            s_c = _matmul_bcast(qc, kT_c).to(sd) * scale  # [B, H, m, Sc]
            s_f = torch.matmul(qc, kT_f).to(sd) * scale  # [B, H, m, Sn]
            m = torch.maximum(s_c.amax(dim=-1, keepdim=True), s_f.amax(dim=-1, keepdim=True))
            p_c = torch.exp(s_c - m)
            p_f = torch.exp(s_f - m)
            den = p_c.sum(dim=-1, keepdim=True) + p_f.sum(dim=-1, keepdim=True)
            o = _matmul_bcast(p_c.to(cd), vc_c).to(sd) + torch.matmul(p_f.to(cd), vf_c).to(sd)
            outs.append(o / den)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).to(q.dtype).contiguous()
