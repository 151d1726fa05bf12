"""CUDA backend (compiled ``csrc/`` extension) of block-sparse attention: op wrappers + fakes.

The kernel (``csrc/attn_fwd_sm80.cu``) runs one CTA per (query block, batch*head), walks the
selected key blocks of ``BlockSelection`` and gathers each block's tokens from the 3D geometry
(partial edge blocks masked); online softmax in fp32; returns ``(out, lse)``. Forward only:
``block_sparse_attn`` on inputs that require grad is refused (``unsupported_reason``), so
``"auto"`` moves on to a differentiable backend and ``backend="cuda"`` raises.

Registered op: ``torch.ops.longcat_kernels.bsa_fwd_cuda(q, k, v, k_fresh, v_fresh, indices, counts,
grid_q, grid_k, chunk_q, chunk_k, scale) -> (out, lse)``; keys are ``[k; k_fresh]`` along seq
(``k_fresh=None`` for plain BSA, a batch-1 ``k`` is broadcast when ``k_fresh`` is given).
"""

from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from ..._ext import extension

__all__ = [
    "bsa_forward_cuda",
    "block_sparse_attn_fwd_cuda",
    "block_sparse_attn_cuda",
    "bsa_forward_segments_cuda",
    "unsupported_reason",
    "ops",
]

_LOCK = threading.Lock()
_FAKES = {"done": False}


def _register_fakes() -> None:
    def lse_like(q, return_lse):
        B, Sq, H, _ = q.shape
        return q.new_empty((B, H, Sq) if return_lse else (0,), dtype=torch.float32)

    @torch.library.register_fake("longcat_kernels::bsa_fwd_cuda")
    def _(q, k, v, k_fresh, v_fresh, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale, return_lse=True):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::kv_cache_attn_fwd_cuda")
    def _(q, k, v, k_cache, v_cache, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w, scale,
          return_lse=True):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::prefix_attn_fwd_cuda")
    def _(q, k, v, prefix_len, scale, return_lse=True):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::rope3d_cuda")
    def _(x, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w, frame_offset):
        return x.new_empty(x.shape)


def ops():
    """``torch.ops.longcat_kernels`` with the compiled ops loaded and their fakes registered.

    Raises ImportError with the reason when the extension is unavailable (never falls back).
    Under ``torch.compile`` (after an eager call loaded it) this is a plain attribute lookup.
    """
    if torch.compiler.is_compiling():
        return torch.ops.longcat_kernels
    if not _FAKES["done"]:
        with _LOCK:
            if not _FAKES["done"]:
                extension()
                _register_fakes()
                _FAKES["done"] = True
    return torch.ops.longcat_kernels


def unsupported_reason(impl: str, *tensors) -> Optional[str]:
    """Why the cuda backend refuses these inputs (None if it accepts them)."""
    q = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if q is None:
        return None
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} not supported (bf16/fp16 only; use 'triton' or 'torch' for fp32)"
    if q.dim() == 4 and q.shape[-1] not in (64, 128):
        return f"head_dim {q.shape[-1]} not supported (64 or 128)"
    heads = {t.shape[2] for t in tensors if isinstance(t, torch.Tensor) and t.dim() == 4}
    if len(heads) > 1:
        return f"GQA/MQA (head counts {sorted(heads)}) not supported by the csrc kernels; use 'triton' or 'torch'"
    if impl in ("block_sparse_attn", "attn_with_kv_cache", "prefix_attn") and torch.is_grad_enabled():
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            return "forward only (no backward kernel); use backend='triton' or 'torch' for gradients"
    return None


def _sel_args(selection):
    indices, counts = selection.indices, selection.counts
    if indices.dtype != torch.int32 or indices.stride(-1) != 1:
        indices = indices.to(torch.int32).contiguous()
    if counts.dtype != torch.int32:
        counts = counts.to(torch.int32)
    return (
        indices,
        counts,
        [int(x) for x in selection.grid_q],
        [int(x) for x in selection.grid_k],
        [int(x) for x in selection.chunk_q],
        [int(x) for x in selection.chunk_k],
    )


def bsa_forward_cuda(q, k, v, selection, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward: ``(out [B,Sq,H,D], lse [B,H,Sq] fp32)``; no autograd.

    Args:
        q (Tensor): ``[B, Sq, H, D]`` bf16/fp16 CUDA, any strides with a contiguous last dim.
        k, v (Tensor): ``[B, Sk, H, D]``.
        selection (BlockSelection): from ``select_blocks`` (batch 1 broadcasts over B).
        scale (float): softmax scale.
    """
    return ops().bsa_fwd_cuda(q, k, v, None, None, *_sel_args(selection), float(scale))


def bsa_forward_segments_cuda(q, k_cache, v_cache, k, v, selection, scale):
    """Block-sparse forward over keys ``[k_cache; k]`` (cache batch 1 or B), no concatenation."""
    return ops().bsa_fwd_cuda(q, k_cache, v_cache, k, v, *_sel_args(selection), float(scale))


# names of the _backend convention (<impl>_cuda)
block_sparse_attn_fwd_cuda = bsa_forward_cuda


def block_sparse_attn_cuda(q, k, v, selection, scale, return_lse=False):
    """Block-sparse attention output ``[B,Sq,H,D]`` (forward only; refuses inputs needing grad);
    with ``return_lse`` ``(out, lse [B,H,Sq] fp32)``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        from ..._backend import BackendUnavailableError  # noqa: PLC0415

        raise BackendUnavailableError(
            "block_sparse_attn: backend 'cuda' unavailable: forward only (no backward kernel); "
            "use backend='triton' or 'torch' for gradients"
        )
    out, lse = ops().bsa_fwd_cuda(q, k, v, None, None, *_sel_args(selection), float(scale), bool(return_lse))
    return (out, lse) if return_lse else out
