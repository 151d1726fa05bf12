from .api import BlockSelection, block_sparse_attn, select_blocks

__all__ = ["BlockSelection", "block_sparse_attn", "select_blocks"]
