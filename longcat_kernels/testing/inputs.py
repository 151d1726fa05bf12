"""Input factories shared by tests and benchmarks. Fresh random values unless a generator is given."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = [
    "LATENT_GRIDS",
    "TEST_GRIDS",
    "make_qkv",
    "make_tensor",
    "make_cache",
    "poison_",
    "empty_poisoned",
]

# real latent grids (T, H, W) after the 1x2x2 patch (SPEC 10)
LATENT_GRIDS: Dict[str, Tuple[int, int, int]] = {
    "480p_93f": (24, 30, 52),  # 37,440 tokens, not divisible by 4x4x4 (H=30)
    "720p_93f": (24, 44, 80),  # 84,480 tokens, divisible
    "704x1280_93f": (24, 44, 80),
}

# scaled-down grids for CPU tests: divisible and non-divisible by (4,4,4) / (2,2,4) chunks
TEST_GRIDS: Dict[str, Tuple[int, int, int]] = {
    "div_4x8x8": (4, 8, 8),
    "480p_like_6x6x13": (6, 6, 13),  # H, W not multiples of 4 (like 30 x 52 / 4)
    "odd_5x7x9": (5, 7, 9),
    "tiny_3x5x6": (3, 5, 6),
}


def make_tensor(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device="cpu",
    *,
    requires_grad: bool = False,
    permuted: bool = False,
    std: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random normal ``shape`` tensor. ``permuted=True`` returns a BSHD view of a BHSD buffer
    (non-contiguous strides, like ``x.transpose(1, 2)``)."""
    shape = tuple(shape)
    if permuted and len(shape) == 4:
        B, S, H, D = shape
        x = torch.randn((B, H, S, D), dtype=torch.float32, device=device, generator=generator) * std
        x = x.to(dtype).transpose(1, 2)
    else:
        x = (torch.randn(shape, dtype=torch.float32, device=device, generator=generator) * std).to(dtype)
    if requires_grad:
        x.requires_grad_(True)
    return x


def make_qkv(
    batch: int,
    seq_q: int,
    heads: int,
    head_dim: int,
    seq_k: Optional[int] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    requires_grad: bool = False,
    permuted: bool = False,
    std: float = 1.0,
    generator: Optional[torch.Generator] = None,
):
    """``q [B, Sq, H, D]``, ``k, v [B, Sk, H, D]`` random normal (times ``std``)."""
    seq_k = seq_q if seq_k is None else seq_k
    kw = dict(dtype=dtype, device=device, requires_grad=requires_grad, permuted=permuted, std=std, generator=generator)
    q = make_tensor((batch, seq_q, heads, head_dim), **kw)
    k = make_tensor((batch, seq_k, heads, head_dim), **kw)
    v = make_tensor((batch, seq_k, heads, head_dim), **kw)
    return q, k, v


def make_cache(
    cache_batch: int,
    seq_cache: int,
    heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    generator: Optional[torch.Generator] = None,
):
    """``k_cache, v_cache [Bc, Sc, H, D]`` random normal."""
    kc = make_tensor((cache_batch, seq_cache, heads, head_dim), dtype, device, generator=generator)
    vc = make_tensor((cache_batch, seq_cache, heads, head_dim), dtype, device, generator=generator)
    return kc, vc


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a float tensor with NaN in place (an output that is not written then fails)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty_poisoned(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return poison_(torch.empty(*shape, dtype=dtype, device=device))
