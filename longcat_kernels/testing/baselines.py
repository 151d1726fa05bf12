"""Baselines the kernels are measured against (benchmarks and tests import them from here).

Plain PyTorch, written the way a straightforward implementation would do the work:
- ``sdpa_bshd``: ``scaled_dot_product_attention`` on BSHD tensors with a chosen SDPA backend.
- ``prebuilt_kv_inputs`` + ``sdpa_bshd``: attention alone on inputs built ahead of time (rotated q,
  ``[cache; fresh]`` keys/values concatenated and repeated to the batch): the floor to beat.
- ``unfused_kv_cache_attn``: the per-step work of an unfused VC step (upstream's layout): repeat the
  batch-1 cache, concatenate with the fresh keys/values, 3D RoPE in fp32 eager torch over q and over
  all keys (the cache is kept unrotated, as upstream stores it), SDPA.
- ``prefix_attn_two_calls``: the cache-off cond/noisy rule as two SDPA calls and a concatenation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["SDPA_IMPLS", "sdpa_bshd", "rope_eager_fp32", "prebuilt_kv_inputs", "unfused_kv_cache_attn",
           "prefix_attn_two_calls"]

SDPA_IMPLS = ("default", "cudnn", "flash", "efficient", "math")


def _sdpa_backend(impl: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[impl]


def sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, impl: str = "default",
              scale: Optional[float] = None) -> torch.Tensor:
    """Dense attention ``softmax(q k^T * scale) v`` through PyTorch SDPA.

    Args:
        q (Tensor): ``[batch, seq_q, heads, head_dim]``; k, v (Tensor): ``[batch, seq_k, heads or kv_heads,
            head_dim]`` (GQA/MQA: ``kv_heads`` divides ``heads``; repeated).
        impl (str): ``"default"`` (PyTorch's choice), ``"cudnn"``, ``"flash"``, ``"efficient"`` or
            ``"math"``; a named one that cannot run raises (no silent fallback).
        scale (float | None): default ``head_dim ** -0.5``.

    Returns:
        Tensor ``[batch, seq_q, heads, head_dim]`` (a transposed view of SDPA's BHSD output).
    """
    if impl not in SDPA_IMPLS:
        raise ValueError(f"impl: expected one of {SDPA_IMPLS}, got {impl!r}")
    from .oracle import kv_heads_like_q  # noqa: PLC0415

    # GQA/MQA: kv heads repeated (SDPA's enable_gqa needs torch >= 2.5 and not every SDPA backend takes it)
    k, v = kv_heads_like_q(k, q.shape[2], "k"), kv_heads_like_q(v, q.shape[2], "v")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if impl == "default":
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backend(impl)):
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)


def rope_eager_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE (SPEC 5) in fp32 eager ops: ``x [B,S,H,D]``, ``cos, sin [S,D]`` fp32."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (-x1, x0) per pair
    return (xf * cos[:, None, :] + rot * sin[:, None, :]).to(x.dtype)


def _check_whole_frames(Sc: int, Sn: int, hw: int) -> None:
    # a cache of a partial frame put the fresh tokens at the wrong frame (Sc // hw), silently
    if Sc % hw or Sn % hw:
        raise ValueError(f"k_cache, q: expected whole frames of {hw} tokens (rope.tokens_per_frame), got "
                         f"{Sc} cache and {Sn} fresh tokens")


def prebuilt_kv_inputs(q, k, v, k_cache, v_cache, *, rope):
    """``(q', K, V)`` for timing SDPA alone: rotated q, ``[cache; k']`` and ``[v_cache; v]``
    repeated to the batch and contiguous. ``k_cache`` is already rotated (our cache format)."""
    B, Sn = q.shape[:2]
    Sc = k_cache.shape[1]
    _check_whole_frames(Sc, Sn, rope.tokens_per_frame)
    c = Sc // rope.tokens_per_frame
    cos, sin = (t.to(q.device) for t in rope.tables(c, Sn // rope.tokens_per_frame))
    K = torch.cat([k_cache.expand(B, -1, -1, -1), rope_eager_fp32(k, cos, sin)], dim=1).contiguous()
    V = torch.cat([v_cache.expand(B, -1, -1, -1), v], dim=1).contiguous()
    return rope_eager_fp32(q, cos, sin).contiguous(), K, V


def unfused_kv_cache_attn(q, k, v, k_cache_raw, v_cache, *, rope, impl: str = "cudnn", scale=None):
    """One unfused cached-attention step (see the module doc); ``k_cache_raw`` is NOT rotated.

    Args:
        q, k, v (Tensor): ``[B, Sn, H, D]`` fresh tokens (normalised, not rotated).
        k_cache_raw, v_cache (Tensor): ``[1 or B, Sc, H, D]`` cache before RoPE.
        rope (Rope3D): grid covering cache + fresh frames.
        impl (str): SDPA backend (``"cudnn"`` as measured in TARGETS.md; ``"default"`` on CPU).
    """
    B, Sn = q.shape[:2]
    Sc = k_cache_raw.shape[1]
    hw = rope.tokens_per_frame
    _check_whole_frames(Sc, Sn, hw)
    for name, c in (("k_cache_raw", k_cache_raw), ("v_cache", v_cache)):
        if c.shape[0] not in (1, B):  # B // Bc tiled another batch's cache (or none, for Bc > B)
            raise ValueError(f"{name}: expected batch 1 or {B} (q's batch {B}), got {c.shape[0]} (shape {tuple(c.shape)})")
    reps = B // k_cache_raw.shape[0]
    K = torch.cat([k_cache_raw.repeat(reps, 1, 1, 1), k], dim=1)
    V = torch.cat([v_cache.repeat(reps, 1, 1, 1), v], dim=1)
    cos_all, sin_all = (t.to(q.device) for t in rope.tables(0, (Sc + Sn) // hw))
    qr = rope_eager_fp32(q, cos_all[Sc:], sin_all[Sc:])
    kr = rope_eager_fp32(K, cos_all, sin_all)
    return sdpa_bshd(qr, kr, V, impl=impl, scale=scale)


def prefix_attn_two_calls(q, k, v, prefix_len: int, *, impl: str = "cudnn", scale=None):
    """Cache-off rule (SPEC 4) as upstream computes it: prefix queries over prefix keys, the rest
    over all keys, two SDPA calls concatenated. ``q, k, v [B, S, H, D]``."""
    from .._validate import check_prefix_len  # noqa: PLC0415

    check_prefix_len(prefix_len, q.shape[1])  # int() truncated 2.5 to 2; a prefix outside sliced wrong tokens
    P = prefix_len
    if P == 0:
        return sdpa_bshd(q, k, v, impl=impl, scale=scale)
    head = sdpa_bshd(q[:, :P], k[:, :P], v[:, :P], impl=impl, scale=scale)
    tail = sdpa_bshd(q[:, P:], k, v, impl=impl, scale=scale)
    return torch.cat([head, tail], dim=1)
