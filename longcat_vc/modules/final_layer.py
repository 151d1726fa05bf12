"""Final layer of the DiT (SPEC 6 step 5)."""

from __future__ import annotations

import torch
import torch.nn as nn

from longcat_kernels._validate import autocast_off

from ..lora import LoRALinear
from .norms import modulate

__all__ = ["FinalLayer"]


class FinalLayer(nn.Module):
    """Per-frame ``shift, scale = Linear(SiLU(t))`` (shift first), non-affine fp32 LayerNorm
    modulation cast to the weight dtype, then ``linear`` to ``pt*ph*pw*out`` channels in fp32.

    State dict: ``adaLN_modulation.1.weight/bias [2C, D_t]/[2C]``, ``linear.weight/bias [P*out, C]``.
    """

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, adaln_tembed_dim: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.linear = LoRALinear(hidden_size, num_patch * out_channels, bias=True, device=device, dtype=dtype)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), LoRALinear(adaln_tembed_dim, 2 * hidden_size, bias=True, device=device, dtype=dtype)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x ``[B, N, C]`` (weight dtype), t ``[B, T, D_t]`` fp32 -> ``[B, N, P*out]`` fp32."""
        B, N, C = x.shape
        with autocast_off(x.device):  # fp32 also under torch.autocast
            shift, scale = self.adaLN_modulation(t).unsqueeze(2).chunk(2, dim=-1)
            xm = modulate(x.view(B, num_frames, -1, C), shift, scale).view(B, N, C)
            # Upstream runs this Linear under fp32 autocast: bf16-rounded input, fp32 matmul.
            return self.linear(xm.float())
