"""The LongCat single-stream block and the SwiGLU FFN (SPEC 6 step 4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from longcat_kernels._validate import autocast_off

from ..fp8 import fp8_input_kind, layer_norm_fp8, modulate_fp8, silu_mul_fp8, to_fp8_activation
from ..lora import LoRALinear
from .attention import Attention, AttnPlan, CrossAttention
from .norms import FP32LayerNorm, gated_residual, modulate, silu_mul

__all__ = ["FeedForwardSwiGLU", "LongCatBlock"]


class FeedForwardSwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, no biases. State dict: ``w1/w3.weight [F, C]``, ``w2.weight [C, F]``."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.w1 = LoRALinear(dim, hidden_dim, bias=False, device=device, dtype=dtype)
        self.w2 = LoRALinear(hidden_dim, dim, bias=False, device=device, dtype=dtype)
        self.w3 = LoRALinear(dim, hidden_dim, bias=False, device=device, dtype=dtype)

    def forward(self, x) -> torch.Tensor:
        """``x [..., C]`` in the model dtype, or (fp8 blocks) an ``Fp8Activation``."""
        want_x = fp8_input_kind(self.w1, self.w3, self.w2)
        if want_x is None:
            return self.w2(silu_mul(self.w1(x), self.w3(x)))
        x = to_fp8_activation(x, want_x)  # one quantisation for w1 and w3
        return self.w2(silu_mul_fp8(self.w1(x), self.w3(x), want_x))


class LongCatBlock(nn.Module):
    """adaLN-modulated self-attention, cross-attention and SwiGLU FFN.

    State dict (upstream names): ``adaLN_modulation.1.weight/bias [6C, D_t]/[6C]``,
    ``pre_crs_attn_norm.weight/bias [C]``, ``attn.*``, ``cross_attn.*``, ``ffn.w1/w2/w3.weight``.
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_hidden: int, adaln_tembed_dim: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), LoRALinear(adaln_tembed_dim, 6 * hidden_size, bias=True, device=device, dtype=dtype)
        )
        self.pre_crs_attn_norm = FP32LayerNorm(hidden_size, eps=1e-6, elementwise_affine=True, device=device,
                                               dtype=dtype)
        self.attn = Attention(hidden_size, num_heads, device=device, dtype=dtype)
        self.cross_attn = CrossAttention(hidden_size, num_heads, device=device, dtype=dtype)
        self.ffn = FeedForwardSwiGLU(hidden_size, ffn_hidden, device=device, dtype=dtype)

    def modulation(self, t: torch.Tensor):
        """t ``[B, T, D_t]`` fp32 -> six ``[B, T, 1, C]`` fp32 tensors (shift/scale/gate msa, mlp), fp32 also
        under ``torch.autocast``."""
        with autocast_off(t.device):
            return self.adaLN_modulation(t).unsqueeze(2).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor], y_mask: Optional[torch.Tensor],
                plan: AttnPlan, layer: int) -> torch.Tensor:
        """x ``[B, N, C]`` (weight dtype), t ``[B, T, D_t]`` fp32, y ``[B, L, C]`` text states."""
        B, N, C = x.shape
        T = plan.grid[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t)

        xv = x.view(B, T, -1, C)
        a = self.attn(self._modulated(xv, shift_msa, scale_msa, self.attn.qkv), plan, layer)
        x = gated_residual(xv, gate_msa, a.view(B, T, -1, C)).view(B, N, C)

        if not plan.skip_cross:
            P = plan.prefix_tokens
            if P:
                # Cond tokens get exactly zero cross-attention output.
                xn = x[:, P:]
                x = torch.cat([x[:, :P], xn + self.cross_attn(self._cross_normed(xn), y, y_mask)], dim=1)
            else:
                x = x + self.cross_attn(self._cross_normed(x), y, y_mask)

        xv = x.view(B, T, -1, C)
        f = self.ffn(self._modulated(xv, shift_mlp, scale_mlp, self.ffn.w1, self.ffn.w3))
        return gated_residual(xv, gate_mlp, f.view(B, T, -1, C)).view(B, N, C)

    @staticmethod
    def _modulated(xv: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *consumers):
        """``modulate(xv)`` as ``[B, N, C]``; for fp8 consumers fused with their input quantisation."""
        B, T, S, C = xv.shape
        want_x = fp8_input_kind(*consumers)
        if want_x is None:
            return modulate(xv, shift, scale).view(B, T * S, C)
        return modulate_fp8(xv, shift, scale, want_x)

    def _cross_normed(self, x: torch.Tensor):
        """The cross-attention pre-norm; for an fp8 ``q_linear`` fused with its input quantisation."""
        want_x = fp8_input_kind(self.cross_attn.q_linear)
        if want_x is None:
            return self.pre_crs_attn_norm(x)
        return layer_norm_fp8(x, self.pre_crs_attn_norm, want_x)

    def forward_kv_only(self, x: torch.Tensor, t: torch.Tensor, plan: AttnPlan, layer: int) -> None:
        """Cache build of the last block: only its K and V are needed (recorded by ``plan``)."""
        B, N, C = x.shape
        T = plan.grid[0]
        shift_msa, scale_msa = self.modulation(t)[:2]
        xm = modulate(x.view(B, T, -1, C), shift_msa, scale_msa).view(B, N, C)
        _, k, v = self.attn.qkv_heads(xm, plan)
        plan.record(layer, k, v)
