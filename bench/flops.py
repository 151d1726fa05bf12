"""FLOP counts used by every benchmark (SPEC 10 of docs/SEMANTICS.md), written once.

- Attention: ``4 * B * H * Sq * Sk * D`` forward (QK^T and PV, 2 FLOPs per multiply-add); backward
  counts 2.5x the forward, so forward + backward is 3.5x.
- Block-sparse attention: the same count over the visited (query token, key token) pairs only
  ("effective" FLOPs), summed over the selected blocks with their real sizes (partial edge blocks).
- DiT forward: ``longcat_vc.flops.dit_forward_flops`` (the model's own count, re-exported here).
"""

from __future__ import annotations

import torch

BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs for attention


def attn_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, *, backward: bool = False) -> float:
    """Dense attention FLOPs ``4 B H Sq Sk D`` (times 3.5 with ``backward=True``: fwd + bwd)."""
    f = 4.0 * batch * heads * seq_q * seq_k * head_dim
    return f * (1.0 + BWD_FACTOR) if backward else f


def prefix_attn_flops(batch: int, heads: int, seq: int, prefix_len: int, head_dim: int) -> float:
    """FLOPs of the cond/noisy rule (SPEC 4): prefix queries see the prefix, the rest see all keys."""
    return attn_flops(batch, heads, prefix_len, prefix_len, head_dim) + attn_flops(
        batch, heads, seq - prefix_len, seq, head_dim
    )


def visited_pairs(selection, grid_q, chunk_q, grid_k, chunk_k) -> float:
    """Sum over (batch, head, query block) of ``q_block_size * sum(selected key block sizes)``.

    Args:
        selection: a ``longcat_kernels.BlockSelection`` (``indices [B,H,Nq,max_sel]`` int32, -1 past
            ``counts``).
    """
    from longcat_kernels.grid import block_sizes

    idx = selection.indices.long()
    dev = idx.device
    sq = block_sizes(tuple(grid_q), tuple(chunk_q)).to(dev, torch.float64)  # [Nq]
    sk = block_sizes(tuple(grid_k), tuple(chunk_k)).to(dev, torch.float64)  # [Nk]
    valid = idx >= 0
    k_tokens = torch.where(valid, sk[idx.clamp(min=0)], torch.zeros((), dtype=torch.float64, device=dev))
    per_q_block = k_tokens.sum(-1)  # [B,H,Nq] key tokens visited by one query token of the block
    return float((per_q_block * sq).sum())


def bsa_effective_flops(selection, head_dim: int, grid_q, chunk_q, grid_k=None, chunk_k=None, *,
                        backward: bool = False) -> float:
    """Attention FLOPs over the visited blocks of ``selection`` only."""
    grid_k = grid_q if grid_k is None else grid_k
    chunk_k = chunk_q if chunk_k is None else chunk_k
    f = 4.0 * head_dim * visited_pairs(selection, grid_q, chunk_q, grid_k, chunk_k)
    return f * (1.0 + BWD_FACTOR) if backward else f


def dit_forward_flops(*args, **kwargs) -> float:
    """FLOPs of one DiT forward: ``longcat_vc.flops.dit_forward_flops`` (the model's own count)."""
    from longcat_vc.flops import dit_forward_flops as _f

    return float(_f(*args, **kwargs))


def dit_step_flops(config, grid, *, batch: int, num_cond_latents: int, kv_cache: bool, text_len: int) -> float:
    """One VC denoising forward on ``grid = (T, H, W)`` tokens with ``c`` cond latents.

    Cache off: all ``T*H*W`` tokens, cond tokens attend to cond keys only and take no
    cross-attention. Cache on: only the ``(T - c)*H*W`` noisy tokens, attending to all keys.
    """
    T, H, W = grid
    hw = H * W
    S, Sc = T * hw, num_cond_latents * hw
    if kv_cache:
        return dit_forward_flops(config, S - Sc, S, text_len, batch)
    return dit_forward_flops(config, S, S, text_len, batch, prefix_tokens=Sc)


def kv_cache_build_flops(config, grid, *, num_cond_latents: int) -> float:
    """The cache build (``LongCatDiT.build_kv_cache``): one pass over the cond tokens, batch 1, no
    cross-attention, that stops after the last block's K and V.

    The last block runs only its ``qkv`` projection (``forward_kv_only``: no self-attention, ``proj``
    or FFN) and the final layer does not run: counting a whole forward overstated the build's FLOPs
    (and TFLOP/s, MFU) by ~1/depth, 11-12% at the benchmark's depth 8.
    """
    _, H, W = grid
    Sc = num_cond_latents * H * W
    C, F = config.hidden_size, config.ffn_hidden_size
    whole = dit_forward_flops(config, Sc, Sc, 0, 1, cross_attn=False)
    last_block_skipped = Sc * (2 * C * C + 6 * C * F) + 4 * C * Sc * Sc  # proj + FFN + self-attention
    final_layer = Sc * 2 * C * config.patch_volume * config.out_channels
    return whole - last_block_skipped - final_layer


def ideal_cache_speedup(config, grid, *, num_cond_latents: int, text_len: int = 512) -> float:
    """FLOP-ratio speedup of the cache per DiT forward (SPEC 10: 1.09 ... 5.17 at 480p)."""
    kw = dict(batch=1, num_cond_latents=num_cond_latents, text_len=text_len)
    return dit_step_flops(config, grid, kv_cache=False, **kw) / dit_step_flops(config, grid, kv_cache=True, **kw)


def tflops(flops: float, ms: float) -> float:
    """Rate in TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12
