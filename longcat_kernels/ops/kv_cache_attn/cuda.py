"""CUDA backend (compiled ``csrc/`` extension) of cached-KV and prefix attention.

``attn_with_kv_cache_cuda``: one registered op, ``longcat_kernels::kv_cache_attn_fwd_cuda``, which
runs the csrc RoPE prologue (``csrc/rope3d.cu``: fresh q and k rotated in fp32 into temporaries;
the cached K is never touched) and then the two-segment attention kernel of family ``kernel``
(``"sm90_ws"``, ``"sm90"``, ``"sm80"``, decided by ``longcat_kernels.dispatch``; None: the
dispatcher's cuda choice for these inputs), keys ``[k_cache; k]`` read from their own tensors, a batch-1 cache
broadcast with batch stride 0 (no concat, no repeat). With ``block_sparse`` the same kernel family
walks 3D blocks of the ``(c + Tn, H, W)`` key grid (``bsa_fwd_cuda`` with two key segments).
Forward only. Fakes are registered in ``ops/block_sparse_attn/cuda.py`` (one place for all ops).
"""

from __future__ import annotations

from typing import Optional

from ..._validate import default_scale
from ..block_sparse_attn.cuda import bsa_forward_segments_cuda, csrc_kernel, ops, selection_args
from .api import _split_aligned
from .reference import cat_cache

__all__ = ["attn_with_kv_cache_cuda", "prefix_attn_cuda"]


def _rope_args(rope):
    if rope is None:
        return [None] * 6, 0, 0
    tabs = [rope.cos_t, rope.sin_t, rope.cos_h, rope.sin_h, rope.cos_w, rope.sin_w]
    return tabs, int(rope.grid[1]), int(rope.grid[2])


def _expanded_batch(t) -> bool:
    return t is not None and t.shape[0] > 1 and t.stride(0) == 0


def _tma_batches(kernel, q, seg0, seg1=None):
    """Inputs for the warp-specialised dense kernel (``sm90_ws``) without an expanded batch it cannot read.

    Its TMA maps (csrc/attn_fwd_sm90_ws.cu ``make_map``) take a batch stride of 0 only for key segment 0 as
    a pair (k and v both broadcast: one batch-1 map); q, the fresh segment beside a cache, or one of a
    segment-0 pair with batch stride 0 (``x.expand(B, ...)``) would read other rows or past the tensor (the
    op refuses them). Those are copied here; the other families read stride 0 by pointer arithmetic."""
    if kernel != "sm90_ws":
        return q, seg0, seg1
    def fix(t):
        return t.contiguous() if _expanded_batch(t) else t

    k0, v0 = seg0
    if not (_expanded_batch(k0) and _expanded_batch(v0)):
        k0, v0 = fix(k0), fix(v0)
    return fix(q), (k0, v0), None if seg1 is None else (fix(seg1[0]), fix(seg1[1]))


def attn_with_kv_cache_cuda(q, k, v, k_cache=None, v_cache=None, rope=None, scale=None, block_sparse=None,
                            return_lse: bool = False, *, kernel: Optional[str] = None):
    """``softmax(q' [k_cache; k']^T * scale) [v_cache; v]`` (SPEC 4), ``[B, Sn, H, D]``.

    Args:
        q, k, v (Tensor): ``[B, Sn, H, D]`` bf16/fp16 CUDA, last dim contiguous (any other strides).
        k_cache, v_cache (Tensor | None): ``[Bc, Sc, H, D]``, Bc in {1, B}, K already rotated.
        rope (Rope3D | None): fresh q/k rotated at frames ``Sc/(H*W) ..`` by the csrc prologue.
        scale (float | None): default ``head_dim ** -0.5``.
        block_sparse (BlockSparseParams | None): with ``frame_hw`` filled in (api.py does it).
        return_lse (bool): also return ``lse [B, H, Sn]`` fp32 (not asked: the kernels skip its store).
        kernel (str | None): csrc kernel family; None: the dispatcher's choice.
    """
    scale = default_scale(q, scale)
    tabs, gh, gw = _rope_args(rope)
    if block_sparse is None:
        kernel = csrc_kernel("attn_with_kv_cache", kernel, q, k, v, k_cache, v_cache, needs_grad=False)
        if k_cache is None:
            q, (k, v), _ = _tma_batches(kernel, q, (k, v))
        else:
            q, (k_cache, v_cache), (k, v) = _tma_batches(kernel, q, (k_cache, v_cache), (k, v))
        res = ops().kv_cache_attn_fwd_cuda(q, k, v, k_cache, v_cache, *tabs, gh, gw, scale, kernel, bool(return_lse))
    else:
        if kernel is None:
            cq, ck = block_sparse.chunk_q, block_sparse.chunk_k or block_sparse.chunk_q
            kernel = csrc_kernel("attn_with_kv_cache", None, q, k, v, k_cache, v_cache, needs_grad=False,
                                 block_sparse=True, block_tokens=(cq[0] * cq[1] * cq[2], ck[0] * ck[1] * ck[2]),
                                 key_segments=1 if k_cache is None else 2,
                                 key_split_aligned=_split_aligned(k_cache, block_sparse))
        res = _block_sparse(q, k, v, k_cache, v_cache, rope, scale, block_sparse, tabs, gh, gw, kernel,
                            bool(return_lse))
    return (res[0], res[1]) if return_lse else res[0]


def _block_sparse(q, k, v, k_cache, v_cache, rope, scale, bs, tabs, gh, gw, kernel, return_lse):
    Sc = 0 if k_cache is None else k_cache.shape[1]
    if rope is not None:
        f0 = Sc // (gh * gw)
        q = ops().rope3d_cuda(q, *tabs, gh, gw, f0)
        k = ops().rope3d_cuda(k, *tabs, gh, gw, f0)
    sel = bs.selection
    if sel is None:
        # gating needs the pooled keys of [cache; fresh]: one concatenation, for the gating only
        from ..block_sparse_attn.api import select_blocks  # noqa: PLC0415

        Hf, Wf = bs.frame_hw
        n = Hf * Wf
        k_all = cat_cache(k_cache, k)
        sel = select_blocks(
            q, k_all, grid_q=(q.shape[1] // n, Hf, Wf), grid_k=(k_all.shape[1] // n, Hf, Wf),
            chunk_q=bs.chunk_q, chunk_k=bs.chunk_k, sparsity=bs.sparsity, cdf_threshold=bs.cdf_threshold,
        )
    if k_cache is None:
        return ops().bsa_fwd_cuda(q, k, v, None, None, *selection_args(sel), scale, kernel, return_lse)
    return bsa_forward_segments_cuda(q, k_cache, v_cache, k, v, sel, scale, kernel=kernel, return_lse=return_lse)


def prefix_attn_cuda(q, k, v, prefix_len, scale=None, return_lse: bool = False, *, kernel: Optional[str] = None):
    """Queries ``[:P]`` attend keys ``[:P]``, the rest attend all keys; ``[B, S, H, D]``
    (with ``return_lse``: ``(out, lse [B, H, S] fp32)``)."""
    scale = default_scale(q, scale)
    kernel = csrc_kernel("prefix_attn", kernel, q, k, v, needs_grad=False)
    q, (k, v), _ = _tma_batches(kernel, q, (k, v))
    out, lse = ops().prefix_attn_fwd_cuda(q, k, v, int(prefix_len), scale, kernel, bool(return_lse))
    return (out, lse) if return_lse else out
