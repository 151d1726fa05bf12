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

from ..._validate import autocast_off
from ..block_sparse_attn.reference import compute_dtype, stats_dtype
from ..block_sparse_attn.selection import ieee_fp32_matmul

__all__ = ["prefix_attn_reference", "kv_cache_attn_reference", "sdpa_bshd", "cat_cache"]


def cat_cache(cache: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``[cache; x]`` along the sequence, a batch-1 cache expanded over x's batch (x alone without a cache).
    Autocast off: torch.cat under an autocast of the other half dtype (fp16 tensors in a bf16 autocast)
    raised "Unexpected floating ScalarType in at::autocast::prioritize"."""
    if cache is None:
        return x
    with autocast_off(x.device):
        return torch.cat([cache.expand(x.shape[0], -1, -1, -1), x], dim=1)


def expand_heads(x: Optional[torch.Tensor], heads: int) -> Optional[torch.Tensor]:
    """GQA/MQA in the reference: repeat each of x's ``heads / x.shape[2]`` kv heads (a copy)."""
    if x is None or x.shape[2] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense SDPA on BSHD tensors -> ``[B, Sq, H, D]`` (a transposed view)."""
    k, v = expand_heads(k, q.shape[2]), expand_heads(v, q.shape[2])
    with ieee_fp32_matmul(q.device):  # q's dtype, also inside torch.autocast
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


def prefix_attn_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float, return_lse: bool = False
):
    """Queries ``[:prefix_len]`` attend keys ``[:prefix_len]``; the rest attend all keys.

    With ``return_lse``: ``(out, lse [B, H, S])`` (fp32; fp64 for fp64 inputs).
    """
    # autocast off: the parts are joined with torch.cat, which raised under an autocast of the other half
    # dtype (fp16 inputs in a bf16 autocast: "Unexpected floating ScalarType in at::autocast::prioritize")
    with autocast_off(q.device):
        return _prefix_attn_reference(q, k, v, prefix_len, scale, return_lse)


def _prefix_attn_reference(q, k, v, prefix_len: int, scale: float, return_lse: bool):
    S = q.shape[1]
    if return_lse:
        parts = []
        if prefix_len > 0:
            parts.append(kv_cache_attn_reference(
                q[:, :prefix_len], k[:, :prefix_len], v[:, :prefix_len], None, None, scale, True))
        if prefix_len < S:
            parts.append(kv_cache_attn_reference(q[:, prefix_len:], k, v, None, None, scale, True))
        out = torch.cat([o for o, _ in parts], dim=1).contiguous()
        return out, torch.cat([ls for _, ls in parts], dim=2).contiguous()
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
    return o.view(H, B, M, b.shape[-1]).transpose(0, 1)  # explicit N: -1 is ambiguous at batch 0


def kv_cache_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: Optional[torch.Tensor],
    v_cache: Optional[torch.Tensor],
    scale: float,
    return_lse: bool = False,
):
    """``softmax(q [k_cache; k]^T * scale) [v_cache; v]`` without concatenating or repeating.

    Args:
        q, k, v (Tensor): ``[B, Sn, H, D]`` (already rotated if RoPE applies).
        k_cache, v_cache (Tensor | None): ``[Bc, Sc, H, D]``, Bc in {1, B}.
        scale (float): softmax scale.
        return_lse (bool): also return ``lse [B, H, Sn]`` (natural log of the softmax denominator
            of the scaled scores; fp32, fp64 for fp64 inputs).

    Returns:
        Tensor: ``[B, Sn, H, D]`` in q's dtype, contiguous; ``(out, lse)`` with ``return_lse``.
    """
    H = q.shape[2]
    k, v, k_cache, v_cache = (expand_heads(x, H) for x in (k, v, k_cache, v_cache))
    if k_cache is None and not return_lse:
        return sdpa_bshd(q, k, v, scale).contiguous()
    if k_cache is None:
        # an empty cache segment: the joint softmax below then covers the fresh keys alone
        k_cache, v_cache = k[:1, :0], v[:1, :0]
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
    outs, lses = [], []
    with ieee_fp32_matmul(q.device):  # an fp32 reference stays fp32 (no TF32) on GPU
        for i0 in range(0, Sn, step):
            qc = qt[:, :, i0 : i0 + step].to(cd)
            s_c = _matmul_bcast(qc, kT_c).to(sd) * scale  # [B, H, m, Sc]
            s_f = torch.matmul(qc, kT_f).to(sd) * scale  # [B, H, m, Sn]
            m = s_f.amax(dim=-1, keepdim=True)
            if Sc:
                m = torch.maximum(s_c.amax(dim=-1, keepdim=True), m)
            p_c = torch.exp(s_c - m)
            p_f = torch.exp(s_f - m)
            den = p_c.sum(dim=-1, keepdim=True) + p_f.sum(dim=-1, keepdim=True)
            o = _matmul_bcast(p_c.to(cd), vc_c).to(sd) + torch.matmul(p_f.to(cd), vf_c).to(sd)
            outs.append(o / den)
            lses.append((m + torch.log(den)).squeeze(-1))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    out = out.transpose(1, 2).to(q.dtype).contiguous()
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=2).contiguous()
