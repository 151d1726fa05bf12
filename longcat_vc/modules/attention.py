"""Self- and cross-attention of the LongCat block (SPEC 4-6), through ``longcat_kernels``.

Self-attention of one block, by mode of the forward (``AttnPlan.mode``):

* ``"full"``: no cond latents: dense attention (``attn_with_kv_cache`` without cache) or
  block-sparse (``block_sparse_attn``) over the whole grid.
* ``"prefix"``: cache off with ``c`` cond latents: cond queries see cond keys only, noisy queries
  see all keys (``prefix_attn``); with BSA, cond part by ``block_sparse_attn`` over the cond grid
  and noisy part by ``attn_with_kv_cache`` over [cond; noisy] keys with ``block_sparse=``.
* ``"cache"``: ``x`` holds only the noisy tokens; keys/values = [cache; fresh]
  (``attn_with_kv_cache``, cache batch 1 broadcast over the CFG batch).
* ``"build"``: the cache pass over the cond latents alone: plain attention, K (rotated) and V
  recorded per block.

q/k: fused RMSNorm + 3D RoPE (``qk_norm_rope``), positions on the full grid (cond frames first).
With ``enable_bsa``, each attention call whose query grid has more than one frame is block-sparse
(upstream skips BSA for single-frame grids; applying the rule per call, cond part and noisy part
separately, keeps cache on == cache off). Chunk shapes are clamped to the grids (a chunk longer
than the grid is one partial block, which is what the clamped chunk computes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_kernels._validate import needs_grad

from ..lora import LoRALinear
from .norms import RMSNorm

__all__ = ["Attention", "CrossAttention", "AttnPlan"]


def _kernels():
    import longcat_kernels

    return longcat_kernels


@dataclass
class AttnPlan:
    """What the self-attention of every block does in one forward (built once by the DiT).

    Attributes:
        mode: "full", "prefix", "cache" or "build" (module docstring).
        grid: ``(T, H, W)`` token grid of the tokens in ``x`` (query tokens).
        rope: ``longcat_kernels.Rope3D`` over the full position grid.
        frame_offset: rope frame of the first token of ``x`` (``c`` in cache mode, else 0).
        prefix_tokens: cond tokens at the start of ``x`` (``"prefix"`` mode), else 0.
        use_bsa: block-sparse self-attention.
        bsa: settings from ``DiTConfig.bsa_settings()``.
        backend: ``attn_backend`` of the config.
        cache: per-forward reader of the ``KVCache`` (``"cache"`` mode).
        record: callback ``(layer, k, v)`` (``"build"`` mode).
        skip_cross: skip cross-attention (``"build"`` mode).
        parallel: context-parallel hook (``longcat_vc.parallel``) when ``x`` is a token shard of
            a multi-rank forward: ``tokens_to_heads`` / ``heads_to_tokens`` (the two all-to-alls
            around self-attention) and ``plan``, the plan of the whole sequence that attention
            then runs with; None (single process) leaves everything as is.
    """

    mode: str
    grid: Tuple[int, int, int]
    rope: Any
    frame_offset: int = 0
    prefix_tokens: int = 0
    use_bsa: bool = False
    bsa: Dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    cache: Any = None
    record: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None
    skip_cross: bool = False
    parallel: Any = None

    @property
    def prologue_backend(self) -> str:
        # The compiled extension may implement attention only; the q/k prologue then uses the
        # best available backend. "torch"/"triton" are honoured for every op.
        return self.backend if self.backend in ("torch", "triton") else "auto"

    def bsa_kwargs(self, grid_q, grid_k):
        """``chunk_q``, ``chunk_k``, ``sparsity``, ``cdf_threshold`` with chunks clamped to the grids."""
        s = self.bsa
        return dict(
            chunk_q=tuple(min(c, g) for c, g in zip(s["chunk_q"], grid_q)),
            chunk_k=tuple(min(c, g) for c, g in zip(s["chunk_k"], grid_k)),
            sparsity=s["sparsity"],
            cdf_threshold=s["cdf_threshold"],
        )

    def block_sparse_params(self, q_frames: int, k_frames: int):
        """``BlockSparseParams`` for ``q_frames`` fresh frames against ``k_frames`` key frames."""
        _, H, W = self.grid
        kw = self.bsa_kwargs((q_frames, H, W), (k_frames, H, W))
        return _kernels().BlockSparseParams(frame_hw=(H, W), **kw)


def _refuse_grad(q, k, v, message: str) -> None:
    """ValueError(message) when this attention call needs gradients (metadata only): a forward-only op
    below raised its own "call it under torch.no_grad()", naming an op the DiT's caller never called."""
    if needs_grad(q, k, v):
        raise ValueError(message)


class Attention(nn.Module):
    """Self-attention: ``qkv`` (rows q, k, v; head h = rows h*D..), q/k RMSNorm, 3D RoPE, ``proj``.

    State dict: ``qkv.weight [3C, C]``, ``qkv.bias [3C]``, ``q_norm.weight [D]``,
    ``k_norm.weight [D]``, ``proj.weight [C, C]``, ``proj.bias [C]``.
    """

    def __init__(self, dim: int, num_heads: int, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = LoRALinear(dim, 3 * dim, bias=True, device=device, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6, device=device, dtype=dtype)
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6, device=device, dtype=dtype)
        self.proj = LoRALinear(dim, dim, bias=True, device=device, dtype=dtype)

    def qkv_heads(self, x: torch.Tensor, plan: AttnPlan) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, N, C]`` -> normalised, rotated q, k and raw v, ``[B, N, H, D]`` each (v a view).

        With ``plan.parallel`` (``x`` a token shard): ``[B, S, H/P, D]`` over the whole sequence
        of ``S`` tokens, rotated at their global positions."""
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        if plan.parallel is not None:
            qkv, plan = plan.parallel.tokens_to_heads(qkv), plan.parallel.plan
        q, k, v = qkv.unbind(2)
        # RMSNorm weights are shared by the heads: the same for any subset of them.
        q, k = _kernels().qk_norm_rope(
            q, k, self.q_norm.weight, self.k_norm.weight, rope=plan.rope, frame_offset=plan.frame_offset,
            eps=self.q_norm.eps, backend=plan.prologue_backend,
        )
        return q, k, v

    def forward(self, x: torch.Tensor, plan: AttnPlan, layer: int) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x, plan)
        if plan.record is not None:
            plan.record(layer, k, v)
        cp = plan.parallel
        if cp is None:
            out = self._attend(q, k, v, plan, layer)
        else:
            # Whole sequence, heads/P: the plan of the whole grid, then back to token shards.
            out = cp.heads_to_tokens(self._attend(q, k, v, cp.plan, layer))
        return self.proj(out.reshape(B, N, C))

    @staticmethod
    def _attend(q, k, v, plan: AttnPlan, layer: int) -> torch.Tensor:
        lk = _kernels()
        be = plan.backend
        T, H, W = plan.grid
        if plan.mode == "cache":
            _refuse_grad(q, k, v, "kv_cache: a forward with a KV cache is inference only (attn_with_kv_cache has no "
                                  "backward); train without kv_cache, or run this forward under torch.no_grad()")
            kc, vc = plan.cache.get(layer)
            c = kc.shape[1] // (H * W)
            bs = plan.block_sparse_params(T, c + T) if plan.use_bsa and T > 1 else None
            out = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend=be)
            plan.cache.release(layer)
            return out
        P = plan.prefix_tokens
        if P == 0:
            if plan.use_bsa and T > 1:
                return lk.block_sparse_attn(q, k, v, grid_q=plan.grid, backend=be,
                                            **plan.bsa_kwargs(plan.grid, plan.grid))
            if needs_grad(q, k, v):
                # Training (longcat_vc.training): attn_with_kv_cache is forward only; SDPA has a
                # backward (flash / memory-efficient kernels on GPU) and the same math. An explicit
                # "triton"/"cuda" raises there (forward-only kernels) instead of being replaced.
                lk.dispatch.choose_dense_grad(q, k, v, be)
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                return o.transpose(1, 2)
            return lk.attn_with_kv_cache(q, k, v, backend=be)
        c = P // (H * W)
        if not plan.use_bsa or (c <= 1 and T - c <= 1):
            return lk.prefix_attn(q, k, v, P, backend=be)
        # Block-sparse cache-off path: the cond part over the cond grid, the noisy part over
        # [cond; noisy] keys, exactly as the cache build and the cached steps compute them.
        if P != q.shape[1]:  # all cond frames: block_sparse_attn alone, which has a backward
            _refuse_grad(q, k, v, f"num_cond_latents={c} with block-sparse attention (enable_bsa) is inference only (the "
                                  "cond/noisy parts run attn_with_kv_cache, which has no backward); train with "
                                  "num_cond_latents=0 (flow_matching_loss), enable_bsa=False, or run this forward "
                                  "under torch.no_grad()")
        if c > 1:
            grid_c = (c, H, W)
            out_c = lk.block_sparse_attn(q[:, :P], k[:, :P], v[:, :P], grid_q=grid_c, backend=be,
                                         **plan.bsa_kwargs(grid_c, grid_c))
        else:
            out_c = lk.attn_with_kv_cache(q[:, :P], k[:, :P], v[:, :P], backend=be)
        if P == q.shape[1]:
            return out_c
        bs = plan.block_sparse_params(T - c, T) if T - c > 1 else None
        out_n = lk.attn_with_kv_cache(q[:, P:], k[:, P:], v[:, P:], k[:, :P], v[:, :P], block_sparse=bs, backend=be)
        return torch.cat([out_c, out_n], dim=1)


class CrossAttention(nn.Module):
    """Cross-attention to the text tokens: ``q_linear``, ``kv_linear`` (rows k then v), q/k RMSNorm,
    no RoPE, SDPA per sample over its (valid) text tokens, ``proj``.

    State dict: ``q_linear.weight/bias [C,C]/[C]``, ``kv_linear.weight/bias [2C,C]/[2C]``,
    ``proj.weight/bias``, ``q_norm.weight [D]``, ``k_norm.weight [D]``.
    """

    def __init__(self, dim: int, num_heads: int, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = LoRALinear(dim, dim, bias=True, device=device, dtype=dtype)
        self.kv_linear = LoRALinear(dim, 2 * dim, bias=True, device=device, dtype=dtype)
        self.proj = LoRALinear(dim, dim, bias=True, device=device, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6, device=device, dtype=dtype)
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x ``[B, N, C]``, y ``[B, L, C]`` text states, y_mask ``[B, L]`` bool (True = attend) or None."""
        B, N, C = x.shape
        L = y.shape[1]
        q = self.q_norm(self.q_linear(x).view(B, N, self.num_heads, self.head_dim))
        k, v = self.kv_linear(y).view(B, L, 2, self.num_heads, self.head_dim).unbind(2)
        k = self.k_norm(k)
        mask = None if y_mask is None else y_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))
