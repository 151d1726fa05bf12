"""longcat-kernels: block-sparse 3D attention and cached-KV attention for LongCat-Video.

Public API (tensors are BSHD ``[batch, seq, heads, head_dim]``, any strides):
``block_sparse_attn``, ``select_blocks``, ``BlockSelection``, ``prefix_attn``,
``attn_with_kv_cache``, ``flash_attn_with_kvcache``, ``BlockSparseParams``, ``Rope3D``, ``apply_rope_3d``, ``qk_norm_rope``,
``fp8_quantize_rows`` / ``fp8_layer_norm_quantize`` / ``fp8_modulate_quantize`` / ``fp8_silu_mul_quantize``
(row-wise e4m3 activations for fp8 GEMMs, fused with their producer), ``VideoGrid`` (3D block geometry),
``available_backends``,
``BackendUnavailableError``. Backends: ``"torch"`` (reference, everywhere),
``"triton"``, ``"cuda"`` (compiled extension), ``"auto"``. Importing this package needs neither
triton nor CUDA; Triton kernels are imported at package import only where they can run (a CUDA
device or ``TRITON_INTERPRET=1``), the compiled extension at the first call on CUDA tensors (JIT-built
and cached when no prebuilt one exists). Which kernel runs a call: ``longcat_kernels.dispatch``.
"""

from ._backend import BackendUnavailableError, available_backends
from ._backend import preload_kernel_modules as _preload_kernel_modules
from .grid import VideoGrid
from .ops.fp8_quant.api import (
    fp8_layer_norm_quantize,
    fp8_modulate_quantize,
    fp8_quantize_rows,
    fp8_silu_mul_quantize,
)
from .ops.block_sparse_attn.api import BlockSelection, block_sparse_attn, select_blocks
from .ops.kv_cache_attn.api import BlockSparseParams, attn_with_kv_cache, flash_attn_with_kvcache, prefix_attn
from .ops.rope.api import Rope3D, apply_rope_3d, qk_norm_rope

__version__ = "0.1.0"

# Triton kernels are imported here only where they can run, so torch.compile never meets the lazy import.
_preload_kernel_modules()

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "available_backends",
    "VideoGrid",
    "BlockSelection",
    "block_sparse_attn",
    "select_blocks",
    "BlockSparseParams",
    "attn_with_kv_cache",
    "prefix_attn",
    "flash_attn_with_kvcache",
    "Rope3D",
    "apply_rope_3d",
    "qk_norm_rope",
    "fp8_quantize_rows",
    "fp8_layer_norm_quantize",
    "fp8_modulate_quantize",
    "fp8_silu_mul_quantize",
]
