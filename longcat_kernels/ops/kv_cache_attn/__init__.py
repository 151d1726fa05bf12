from .api import BlockSparseParams, attn_with_kv_cache, prefix_attn

__all__ = ["BlockSparseParams", "attn_with_kv_cache", "prefix_attn"]
