"""CUDA backend (compiled ``csrc/`` extension) of block-sparse attention: op wrappers + fakes.

The kernels run one CTA per (query block, batch*head), walk the selected key blocks of
``BlockSelection`` and gather each block's tokens from the 3D geometry (partial edge blocks
masked); online softmax in fp32; return ``(out, lse)``. Forward only. ``kernel`` names the csrc
kernel family (``"sm90_ws"``, ``"sm90"``, ``"sm80"``): ``longcat_kernels.dispatch`` decides it and
the C++ side raises if it cannot run that kernel (no silent switch). ``kernel=None`` asks the
dispatcher for the cuda backend's choice for these inputs.

Registered op: ``torch.ops.longcat_kernels.bsa_fwd_cuda(q, k, v, k_fresh, v_fresh, indices, counts,
grid_q, grid_k, chunk_q, chunk_k, scale, kernel, return_lse=True, common=None) -> (out, lse)``
(lse empty when ``return_lse`` is False: the kernels skip its store); keys are ``[k; k_fresh]``
along seq (``k_fresh=None`` for plain BSA, a batch-1 ``k`` is broadcast when ``k_fresh`` is
given). ``common`` (kernel ``"sm90_ws"`` only) are the pair-common counts of
``pair_common_first``, which also reorders the lists: the kernel loads the key blocks that two
neighbouring query blocks share once for both.
"""

from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from ..._ext import extension
from ...grid import cache_split_aligned

__all__ = [
    "bsa_forward_cuda",
    "block_sparse_attn_fwd_cuda",
    "block_sparse_attn_cuda",
    "bsa_forward_segments_cuda",
    "selection_args",
    "kernel_selection_args",
    "pair_common_first",
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
          return_lse=True, common=None):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::bsa_pair_common_cuda")
    def _(indices, counts, num_k_blocks):
        return indices.new_empty(indices.shape, dtype=torch.int32), counts.new_empty(counts.shape, dtype=torch.int32)

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


def pair_common_first(indices: torch.Tensor, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of the csrc pair reorder (``csrc/bsa_pair_reorder.cu``) for the sm90_ws forward's
    shared ring: ``(indices, common)``, both int32. For each pair of neighbouring query blocks
    (2i, 2i+1) both lists become [the key blocks the two share, ascending; the block's own key
    blocks, ascending; -1 ...]; ``common [.., Nq]`` holds the shared count for both blocks of a
    pair (the last block of an odd count: its blocks ascending, common 0).

    The forward then loads each pair's shared head once. For a validated selection (distinct ids
    in ``[0, Nk)`` in the first ``counts`` entries; the csrc reorder drops other ids) each query
    block attends the same key blocks as before, in another order (fp32 rounding of the online
    softmax).
    """
    *_, Nq, K = indices.shape
    idx = indices.to(torch.int32)
    common = torch.zeros(counts.shape, dtype=torch.int32, device=counts.device)
    # int32 throughout, no constant beyond int32 (inductor fuses these ops into int32 code)
    top = torch.iinfo(torch.int32).max
    slot = torch.arange(K, device=idx.device, dtype=torch.int32)
    srt = torch.where(slot < counts[..., None], idx, top).sort(dim=-1).values  # ascending, past count last
    out = torch.where(srt == top, -1, srt)
    P = Nq // 2
    if P == 0 or K == 0:
        return out, common
    a, b = srt[..., 0:2 * P:2, :].contiguous(), srt[..., 1:2 * P:2, :].contiguous()

    def member(x, other):
        pos = torch.searchsorted(other, x).clamp_(max=K - 1)
        return (x != top) & (other.gather(-1, pos) == x)

    for par, x, shared in ((0, a, member(a, b)), (1, b, member(b, a))):
        # stable sort of the ascending list by group: shared 0, own 1, past count 2
        group = torch.where(shared, 0, torch.where(x != top, 1, 2)).to(torch.int32)
        y = x.gather(-1, group.sort(dim=-1, stable=True).indices)
        out[..., par:2 * P:2, :] = torch.where(y == top, -1, y)
        if par == 0:
            nc = shared.sum(dim=-1, dtype=torch.int32)
    common[..., 0:2 * P:2] = nc
    common[..., 1:2 * P:2] = nc
    return out, common


def kernel_selection_args(selection, kernel: str):
    """``(selection_args, common)`` for csrc kernel ``kernel``: for ``"sm90_ws"`` the lists come
    reordered for its shared ring by the csrc pair reorder (``pair_common_first`` is its
    reference) with the pair-common counts, else as they are and ``None``."""
    args = selection_args(selection)
    if kernel != "sm90_ws":
        return args, None
    idx, common = ops().bsa_pair_common_cuda(args[0], args[1], int(selection.num_k_blocks))
    return (idx,) + args[1:], common


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
    args, common = kernel_selection_args(selection, kernel)
    return ops().bsa_fwd_cuda(q, k, v, None, None, *args, float(scale), kernel, True, common)


def bsa_forward_segments_cuda(q, k_cache, v_cache, k, v, selection, scale, *, kernel: Optional[str] = None,
                              return_lse: bool = True):
    """Block-sparse forward over keys ``[k_cache; k]`` (cache batch 1 or B), no concatenation;
    ``(out, lse)`` with an empty lse when not ``return_lse``."""
    gk = selection.grid_k
    aligned = cache_split_aligned(k_cache.shape[1], int(gk[1]) * int(gk[2]), selection.chunk_k[0])
    kernel = csrc_kernel("block_sparse_attn_fwd", kernel, q, k, v, block_sparse=True,
                         block_tokens=_block_tokens(selection), key_segments=2,
                         key_split_aligned=aligned, needs_grad=False)
    args, common = kernel_selection_args(selection, kernel)
    return ops().bsa_fwd_cuda(q, k_cache, v_cache, k, v, *args, float(scale), kernel, bool(return_lse), common)


block_sparse_attn_fwd_cuda = bsa_forward_cuda


def block_sparse_attn_cuda(q, k, v, selection, scale, return_lse: bool = False, *, kernel: Optional[str] = None):
    """Block-sparse attention output ``[B,Sq,H,D]`` (forward only; refuses inputs needing grad);
    with ``return_lse`` ``(out, lse [B,H,Sq] fp32)``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        from ...dispatch import BackendUnavailableError  # noqa: PLC0415

        raise BackendUnavailableError(
            "block_sparse_attn: backend 'cuda' unavailable: forward only (no backward kernel); "
            "use backend='triton' or 'torch' for gradients"
        )
    kernel = csrc_kernel("block_sparse_attn", kernel, q, k, v, block_sparse=True,
                         block_tokens=_block_tokens(selection), needs_grad=False)
    args, common = kernel_selection_args(selection, kernel)
    out, lse = ops().bsa_fwd_cuda(q, k, v, None, None, *args, float(scale), kernel, bool(return_lse), common)
    return (out, lse) if return_lse else out
