"""Building blocks of the LongCat-Video DiT (state-dict names as upstream)."""

from .attention import Attention, AttnPlan, CrossAttention
from .block import FeedForwardSwiGLU, LongCatBlock
from .embedders import CaptionEmbedder, PatchEmbed3D, TimestepEmbedder, timestep_embedding
from .final_layer import FinalLayer
from .norms import FP32LayerNorm, RMSNorm, gated_residual, layer_norm_fp32, modulate, rms_norm, silu_mul

__all__ = [
    "Attention",
    "AttnPlan",
    "CrossAttention",
    "FeedForwardSwiGLU",
    "LongCatBlock",
    "CaptionEmbedder",
    "PatchEmbed3D",
    "TimestepEmbedder",
    "timestep_embedding",
    "FinalLayer",
    "FP32LayerNorm",
    "RMSNorm",
    "gated_residual",
    "modulate",
    "rms_norm",
    "layer_norm_fp32",
    "silu_mul",
]
