"""CUDA backend (compiled ``csrc/`` extension) of block-sparse attention: op wrappers + fakes.

The kernels run one CTA per (query block, batch*head), walk the selected key blocks of
``BlockSelection`` and gather each block's tokens from the 3D geometry (partial edge blocks
masked); online softmax in fp32; return ``(out, lse)``. Forward only, except
``block_sparse_attn_ws_train``: the sm90_ws forward whose backward is the Triton one (what
``"auto"`` runs for inputs that need grad on Hopper). ``kernel`` names the csrc
kernel family (``"sm90_ws"``, ``"sm90"``, ``"sm80"``): ``longcat_kernels.dispatch`` decides it and
the C++ side raises if it cannot run that kernel (no silent switch). ``kernel=None`` asks the
dispatcher for the cuda backend's choice for these inputs.

Registered op: ``torch.ops.longcat_kernels.bsa_fwd_cuda(q, k, v, k_fresh, v_fresh, indices, counts,
grid_q, grid_k, chunk_q, chunk_k, scale, kernel, return_lse=True) -> (out, lse)`` (lse empty
when ``return_lse`` is False: the kernels skip its store); keys are ``[k; k_fresh]`` along
seq (``k_fresh=None`` for plain BSA, a batch-1 ``k`` is broadcast when ``k_fresh`` is given).
"""

from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from ..._ext import extension
from ..._validate import needs_grad
from ...grid import cache_split_aligned

__all__ = [
    "bsa_forward_cuda",
    "block_sparse_attn_cuda",
    "block_sparse_attn_ws_train",
    "bsa_forward_segments_cuda",
    "selection_args",
    "csrc_kernel",
    "ops",
]

_LOCK = threading.Lock()
_FAKES = {"done": False}


def _register_fakes() -> None:
    def lse_like(q, return_lse):
        B, Sq, H, _ = q.shape
        return q.new_empty((B, H, Sq) if return_lse else (0,), dtype=torch.float32)

    @torch.library.register_fake("longcat_kernels::bsa_fwd_cuda")
    def _(q, k, v, k_fresh, v_fresh, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale, kernel,
          return_lse=True):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::kv_cache_attn_fwd_cuda")
    def _(q, k, v, k_cache, v_cache, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w, scale,
          kernel, return_lse=True):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::prefix_attn_fwd_cuda")
    def _(q, k, v, prefix_len, scale, kernel, return_lse=True):
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


def csrc_kernel(op: str, kernel, q, *tensors, **facts) -> str:
    """``kernel`` if given, else the family ``dispatch`` picks for backend ``"cuda"`` on these inputs
    (raises ``BackendUnavailableError`` with the reason for inputs the csrc kernels refuse, e.g. GQA)."""
    if kernel is not None:
        return kernel
    from ...dispatch import choose  # noqa: PLC0415

    return choose(op, q, *tensors, requested="cuda", **facts).impl[len("csrc_"):]


def selection_args(selection):
    """(indices, counts, grid_q, grid_k, chunk_q, chunk_k) as the csrc ops take them."""
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


def _block_tokens(selection) -> Tuple[int, int]:
    cq, ck = selection.chunk_q, selection.chunk_k
    return (int(cq[0] * cq[1] * cq[2]), int(ck[0] * ck[1] * ck[2]))


def bsa_forward_cuda(q, k, v, selection, scale, *, kernel: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward: ``(out [B,Sq,H,D], lse [B,H,Sq] fp32)``; no autograd.

    Args:
        q (Tensor): ``[B, Sq, H, D]`` bf16/fp16 CUDA, any strides with a contiguous last dim.
        k, v (Tensor): ``[B, Sk, H, D]``.
        selection (BlockSelection): from ``select_blocks`` (batch 1 broadcasts over B).
        scale (float): softmax scale.
        kernel (str | None): csrc kernel family; None: the dispatcher's choice.
    """
    kernel = csrc_kernel("block_sparse_attn_fwd", kernel, q, k, v, block_sparse=True,
                         block_tokens=_block_tokens(selection), needs_grad=False)
    return ops().bsa_fwd_cuda(q, k, v, None, None, *selection_args(selection), float(scale), kernel)


def bsa_forward_segments_cuda(q, k_cache, v_cache, k, v, selection, scale, *, kernel: Optional[str] = None,
                              return_lse: bool = True):
    """Block-sparse forward over keys ``[k_cache; k]`` (cache batch 1 or B), no concatenation;
    ``(out, lse)`` with an empty lse when not ``return_lse``."""
    gk = selection.grid_k
    aligned = cache_split_aligned(k_cache.shape[1], int(gk[1]) * int(gk[2]), selection.chunk_k[0])
    kernel = csrc_kernel("block_sparse_attn_fwd", kernel, q, k, v, block_sparse=True,
                         block_tokens=_block_tokens(selection), key_segments=2,
                         key_split_aligned=aligned, needs_grad=False)
    return ops().bsa_fwd_cuda(q, k_cache, v_cache, k, v, *selection_args(selection), float(scale), kernel,
                              bool(return_lse))


def block_sparse_attn_cuda(q, k, v, selection, scale, return_lse: bool = False, *, kernel: Optional[str] = None):
    """Block-sparse attention output ``[B,Sq,H,D]`` (forward only; refuses inputs needing grad);
    with ``return_lse`` ``(out, lse [B,H,Sq] fp32)``."""
    if needs_grad(q, k, v):
        from ...dispatch import BackendUnavailableError  # noqa: PLC0415

        raise BackendUnavailableError(
            "block_sparse_attn: backend 'cuda' unavailable: forward only (no backward kernel); "
            "use backend='triton' or 'torch' for gradients"
        )
    kernel = csrc_kernel("block_sparse_attn", kernel, q, k, v, block_sparse=True,
                         block_tokens=_block_tokens(selection), needs_grad=False)
    out, lse = ops().bsa_fwd_cuda(q, k, v, None, None, *selection_args(selection), float(scale), kernel,
                                  bool(return_lse))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# training: the csrc sm90_ws forward, the Triton backward
# ----------------------------------------------------------------------------------------------
# The backward needs (q, k, v, out, lse) and the selection; the csrc forward returns the same
# out and lse (natural log, -inf for a query block without selected key blocks) as the Triton
# forward, so the Triton backward (`longcat_kernels::bsa_bwd`) takes them unchanged.


@torch.library.custom_op("longcat_kernels::bsa_fwd_ws_train", mutates_args=())
def bsa_fwd_ws_train(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
    grid_q: list[int], grid_k: list[int], chunk_q: list[int], chunk_k: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The csrc sm90_ws block-sparse forward as an op with a backward: same arguments and results
    as ``longcat_kernels::bsa_fwd`` (Triton)."""
    out, lse = ops().bsa_fwd_cuda(q, k, v, None, None, indices, counts, grid_q, grid_k, chunk_q, chunk_k,
                                  float(scale), "sm90_ws", True)
    return out, lse


@bsa_fwd_ws_train.register_fake
def _bsa_fwd_ws_train_fake(q, k, v, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale):
    B, Sq, NH, D = q.shape
    return q.new_empty((B, Sq, NH, D)), q.new_empty((B, NH, Sq), dtype=torch.float32)


def _train_setup_context(ctx, inputs, output):
    from . import triton as _tr  # noqa: PLC0415 - needs triton; the op is chosen only where it imports

    _tr._setup_context(ctx, inputs, output)


def _train_backward(ctx, grad_out, grad_lse):
    from . import triton as _tr  # noqa: PLC0415

    return _tr._backward(ctx, grad_out, grad_lse)


torch.library.register_autograd("longcat_kernels::bsa_fwd_ws_train", _train_backward,
                                setup_context=_train_setup_context)


def block_sparse_attn_ws_train(q, k, v, selection, scale, return_lse: bool = False):
    """Block-sparse attention for inputs that need grad: the csrc sm90_ws forward (one key segment,
    64-token blocks, head_dim 128, bf16/fp16 on Hopper; ``dispatch`` checks) and the Triton backward
    (dq, dk/dv over the transposed selection; ``LONGCAT_KERNELS_DETERMINISTIC`` as for Triton).
    Output as ``block_sparse_attn_triton`` (out and lse differentiable)."""
    from .triton import _prep  # noqa: PLC0415

    out, lse = torch.ops.longcat_kernels.bsa_fwd_ws_train(*_prep(q, k, v, selection), float(scale))
    return (out, lse) if return_lse else out
