from .api import Rope3D, apply_rope_3d, qk_norm_rope

__all__ = ["Rope3D", "apply_rope_3d", "qk_norm_rope"]
