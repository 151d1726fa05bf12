"""Patch, timestep and caption embedders (SPEC 6 steps 1-2). State-dict names as upstream."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lora import LoRALinear

__all__ = ["PatchEmbed3D", "TimestepEmbedder", "CaptionEmbedder", "timestep_embedding"]


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch, flattened to tokens in (t, h, w) order.

    State dict: ``proj.weight [C, in, pt, ph, pw]``, ``proj.bias [C]``. Computed as one matmul over
    the non-overlapping patches (the same sum as the convolution).
    """

    def __init__(self, patch_size: Tuple[int, int, int], in_channels: int, hidden_size: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size,
                              device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, Cin, T, H, W]`` (weight dtype) -> tokens ``[B, T/pt * H/ph * W/pw, C]``."""
        B, Cin, T, H, W = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(B, Cin, T // pt, pt, H // ph, ph, W // pw, pw)
        # [B, T', H', W', Cin, pt, ph, pw]: the flattening order of the Conv3d weight.
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, -1, Cin * pt * ph * pw)
        w = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(x, w.to(x.dtype), self.proj.bias.to(x.dtype))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[N, dim]`` fp32: ``[cos(t f), sin(t f)]``, ``f_i = exp(-ln(P) i / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Timestep -> ``[N, adaln_tembed_dim]`` fp32: sinusoid, Linear, SiLU, Linear, all in fp32.

    State dict: ``mlp.0.weight/bias``, ``mlp.2.weight/bias``.
    """

    def __init__(self, t_embed_dim: int, frequency_embedding_size: int = 256, device=None, dtype=None) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            LoRALinear(frequency_embedding_size, t_embed_dim, bias=True, device=device, dtype=dtype),
            nn.SiLU(),
            LoRALinear(t_embed_dim, t_embed_dim, bias=True, device=device, dtype=dtype),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t ``[N]`` (already rounded to the weight dtype by the caller) -> ``[N, D_t]`` fp32."""
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class CaptionEmbedder(nn.Module):
    """Text states -> model width: Linear, GELU(tanh), Linear (weight dtype).

    State dict: ``y_proj.0.weight/bias``, ``y_proj.2.weight/bias``.
    """

    def __init__(self, in_channels: int, hidden_size: int, device=None, dtype=None) -> None:
        super().__init__()
        self.y_proj = nn.Sequential(
            LoRALinear(in_channels, hidden_size, bias=True, device=device, dtype=dtype),
            nn.GELU(approximate="tanh"),
            LoRALinear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)
