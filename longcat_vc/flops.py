"""FLOP count of one DiT forward, written once (benchmarks and MFU figures use this).

Matmul FLOPs only (2 per multiply-add); elementwise work, norms, RoPE, softmax and the per-frame
adaLN projections (``2 * D_t * 6C`` per frame per block, < 0.01% at 480p) are not counted.

Per block, per query token: ``qkv 6C^2 + proj 2C^2 + FFN 6CF`` and self-attention ``4 C Sk``
(QK^T and PV over ``Sk`` keys, all heads); per query token that takes cross-attention:
``q 2C^2 + out 2C^2 + 4 C L``; per text token: ``kv 4C^2``. Outside the blocks: patch embedding
``2 (in * patch) C`` and final linear ``2 C (patch * out)`` per token, caption embedder
``2 (Cc C + C^2)`` per text token.
"""

from __future__ import annotations

import numbers

from .config import DiTConfig

__all__ = ["dit_forward_flops"]


def dit_forward_flops(config: DiTConfig, tokens_q: int, tokens_kv: int, text_len: int, batch: int, *,
                      prefix_tokens: int = 0, cross_attn: bool = True, self_attn_density: float = 1.0) -> float:
    """FLOPs of one DiT forward.

    Args:
        config: model config (hidden size, depth, FFN width, channels).
        tokens_q: tokens processed per sample (all latent tokens with the cache off; noisy tokens
            with the cache on; cond tokens for the cache build).
        tokens_kv: keys seen by a (noisy) query token: all tokens (cond + noisy).
        text_len: text tokens per sample (L).
        batch: samples (2 with CFG).
        prefix_tokens: cache off with cond latents: the first ``prefix_tokens`` of ``tokens_q``
            are cond tokens that attend only to the ``prefix_tokens`` cond keys and take no
            cross-attention (SPEC 4).
        cross_attn: False for the cache build (no cross-attention, no caption embedding).
        self_attn_density: fraction of the key blocks visited (block-sparse attention).

    Examples:
        480p, 4 cond latents of 24, B2: cache off
        ``dit_forward_flops(cfg, 37440, 37440, 512, 2, prefix_tokens=6240)``, cache on
        ``dit_forward_flops(cfg, 31200, 37440, 512, 2)``.
    """
    C = config.hidden_size
    F = config.ffn_hidden_size
    pv = config.patch_volume
    for name, n in (("tokens_q", tokens_q), ("tokens_kv", tokens_kv), ("text_len", text_len), ("batch", batch),
                    ("prefix_tokens", prefix_tokens)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {n!r}")
    if isinstance(self_attn_density, bool) or not isinstance(self_attn_density, numbers.Real) \
            or not 0.0 <= self_attn_density <= 1.0:
        raise ValueError(f"self_attn_density: expected a fraction in [0, 1], got {self_attn_density!r}")
    if not 0 <= prefix_tokens <= tokens_q:
        raise ValueError(f"prefix_tokens: expected 0 <= prefix_tokens <= tokens_q={tokens_q}, got {prefix_tokens}")
    noisy = tokens_q - prefix_tokens
    cross_tokens = noisy if cross_attn else 0
    L = text_len if cross_attn else 0
    per_block = (
        tokens_q * (6 * C * C + 2 * C * C + 6 * C * F)
        + self_attn_density * 4 * C * (prefix_tokens * prefix_tokens + noisy * tokens_kv)
        + cross_tokens * (4 * C * C + 4 * C * L)
        + L * 4 * C * C
    )
    outside = tokens_q * 2 * C * pv * (config.in_channels + config.out_channels)
    outside += L * 2 * (config.caption_channels * C + C * C)
    return float(batch * (config.depth * per_block + outside))
