"""Cached-KV attention for video continuation and the cond/noisy prefix rule (SPEC 4).

Which implementation runs is decided by ``longcat_kernels.dispatch.choose`` (one place for all ops;
GQA/MQA calls, k/v with fewer heads than q, are a fact it uses); the implementations (registered
there) take arguments already validated and normalised (scale a float):
- prefix_attn: ``(q, k, v, prefix_len, scale, return_lse=False) -> out`` (``(out, lse)`` with return_lse)
- attn_with_kv_cache: ``(q, k, v, k_cache, v_cache, rope, scale, block_sparse, return_lse=False) -> out``
  (``block_sparse`` is a ``BlockSparseParams`` with ``frame_hw`` filled in, or None; ``rope`` has
  interleaved pairs: rotate-half is applied by this module first)
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ...dispatch import choose, impl_fn
from ..._validate import (
    check_backend_name,
    check_bool,
    check_chunk,
    check_no_grad,
    check_prefix_len,
    check_qkv,
    check_same_device,
    check_same_dtype,
    check_scale,
    default_scale,
    check_sparsity,
    check_tensor,
    compiling,
    plain_float,
    plain_int,
)
from ...grid import Triple, as_triple, cache_split_aligned
from ..block_sparse_attn.api import check_no_rule_beside_selection, check_selection, select_blocks
from ..block_sparse_attn.reference import block_sparse_attn_reference
from ..block_sparse_attn.selection import BlockSelection
from ..rope.api import Rope3D, apply_rope_3d, check_rope_device
from .reference import cat_cache, kv_cache_attn_reference, prefix_attn_reference

__all__ = ["BlockSparseParams", "attn_with_kv_cache", "prefix_attn", "flash_attn_with_kvcache"]


@dataclass(frozen=True, eq=False)
class BlockSparseParams:
    """Block-sparse attention over [cache; fresh] keys inside ``attn_with_kv_cache``.

    Attributes:
        sparsity, cdf_threshold: selection rules (see ``select_blocks``).
        chunk_q, chunk_k: block shapes (chunk_k defaults to chunk_q).
        frame_hw: ``(H, W)`` tokens per frame; taken from ``rope.grid`` when None, else from
            ``selection.grid_q``.
        selection: a precomputed ``BlockSelection`` of q's grid ``(Tn, H, W)`` against the key grid
            ``(c + Tn, H, W)`` (reuse it across steps); the rules must then stay at their defaults
            (a sparsity other than 0.9375 or None, or a cdf_threshold, raises: it would be ignored).
    """

    sparsity: Optional[float] = 0.9375
    cdf_threshold: Optional[float] = None
    chunk_q: Triple = (4, 4, 4)
    chunk_k: Optional[Triple] = None
    frame_hw: Optional[Tuple[int, int]] = None
    selection: Optional[BlockSelection] = None


def prefix_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: int,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Attention with LongCat's cond/noisy rule over one sequence, in one call.

    ::

                    keys [:p]   keys [p:]
        q [:p]     |  attend  |  masked  |     cond tokens see only cond tokens
        q [p:]     |  attend  |  attend  |     noisy tokens see everything

    Args:
        q, k, v (Tensor): ``[batch, seq, heads, head_dim]``, any strides; k and v may have fewer heads
            than q, dividing them (GQA/MQA: kv head ``h // group``), else the same shape as q.
        prefix_len (int): p, ``0 <= p <= seq`` (0 or seq: plain dense attention).
        scale (float | None): default ``head_dim ** -0.5``.
        backend (str): ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        return_lse (bool): also return ``lse [batch, heads, seq]`` fp32, natural log (SPEC 12).

    Returns:
        Tensor: ``[batch, seq, heads, head_dim]`` in q's dtype, contiguous; ``(out, lse)`` with
        ``return_lse``.
    """
    prefix_len = plain_int(prefix_len)  # a numpy int, as frame_offset takes it (it was a TypeError)
    if not compiling():
        check_backend_name(backend)
        check_bool(return_lse, "return_lse")
        check_qkv(q, k, v, gqa=True)
        check_scale(scale)
        if k.shape[1] != q.shape[1]:
            raise ValueError(f"k: expected seq {q.shape[1]} (same as q), got {k.shape[1]}")
        check_prefix_len(prefix_len, q.shape[1])
    scale = default_scale(q, scale)
    c = choose("prefix_attn", q, k, v, requested=backend)
    if c.impl != "torch_reference":
        fn = impl_fn("prefix_attn", c.impl)
        return fn(q, k, v, prefix_len, scale, return_lse=True) if return_lse else fn(q, k, v, prefix_len, scale)
    return prefix_attn_reference(q, k, v, prefix_len, scale, return_lse)


def _type_name(x) -> str:
    """``x``'s type for "both or neither" errors (a list passed for a tensor was called a Tensor)."""
    return "None" if x is None else type(x).__name__


def _check_cache(q, k_cache, v_cache, kv_heads: int, kv_name: str = "k") -> None:
    """``kv_name``: the tensor whose head count ``kv_heads`` is (``k``; ``k_cache`` when it is the only keys)."""
    if (k_cache is None) != (v_cache is None):
        raise ValueError(
            f"k_cache/v_cache: expected both or neither, got k_cache={_type_name(k_cache)}, "
            f"v_cache={_type_name(v_cache)}"
        )
    if k_cache is None:
        return
    check_tensor(k_cache, "k_cache")
    check_tensor(v_cache, "v_cache")
    check_same_device([("q", q), ("k_cache", k_cache), ("v_cache", v_cache)])
    check_same_dtype([("q", q), ("k_cache", k_cache), ("v_cache", v_cache)])
    B, _, H, D = q.shape
    for n, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[0] not in (1, B):
            want = "1" if B == 1 else f"1 or {B}"
            raise ValueError(f"{n}: expected batch {want} (q's batch {B}), got {t.shape[0]} (shape {tuple(t.shape)})")
        if t.shape[2] != kv_heads:
            raise ValueError(f"{n}: expected {kv_heads} heads (same as {kv_name}), got {t.shape[2]}")
        if t.shape[3] != D:
            raise ValueError(f"{n}: expected head_dim {D} (same as q), got {t.shape[3]}")
    if v_cache.shape[:2] != k_cache.shape[:2]:
        raise ValueError(
            f"v_cache: expected batch and seq {tuple(k_cache.shape[:2])} (same as k_cache), got {tuple(v_cache.shape[:2])}"
        )


def _split_aligned(k_cache, bs) -> bool:
    """``[cache; fresh]`` keys: the cache ends on a key-block boundary along t (``Facts``)."""
    if k_cache is None:
        return True
    Hf, Wf = bs.frame_hw
    ck = bs.chunk_q if bs.chunk_k is None else bs.chunk_k
    return cache_split_aligned(k_cache.shape[1], Hf * Wf, ck[0])


def _frame_hw(hw) -> Tuple[int, int]:
    """``block_sparse.frame_hw`` as two positive ints (a 0 would divide by zero, a float make a fractional grid)."""
    # a SymInt first: dynamo cannot trace hasattr on one (a compiled DiT's grid after a new shape)
    bad = (not isinstance(hw, (tuple, list)) or len(hw) != 2
           or any(isinstance(x, (bool, float)) or not (isinstance(x, (int, torch.SymInt)) or hasattr(x, "__index__"))
                  for x in hw))
    if bad:
        raise TypeError(f"block_sparse.frame_hw: expected a tuple of 2 ints (H, W), got {hw!r}")
    if not all(int(x) > 0 for x in hw):
        raise ValueError(f"block_sparse.frame_hw: expected 2 positive ints (H, W), got {tuple(hw)!r}")
    return int(hw[0]), int(hw[1])


def _check_params_selection(bs: BlockSparseParams, q, k, grid_q, grid_k) -> None:
    """``bs.selection`` against q, the key grid and ``bs``'s chunks (chunk_q left at its default, the very
    object, counts as not given; one given, even (4, 4, 4), must be the selection's), with errors named
    ``block_sparse.*``."""
    default_chunk_q = bs.chunk_q is BlockSparseParams.chunk_q
    check_selection(bs.selection, q, k, grid_q, grid_k, None if default_chunk_q else bs.chunk_q, bs.chunk_k,
                    prefix="block_sparse.")


def _selection_frame_hw(bs) -> Optional[Tuple[int, int]]:
    """``(H, W)`` of ``bs.selection``'s query grid (the default ``frame_hw`` without rope), None without one."""
    if not isinstance(bs.selection, BlockSelection):
        return None
    return as_triple(bs.selection.grid_q, "block_sparse.selection.grid_q")[1:]


def _normalize_block_sparse(bs, q, k, Sc: int, rope) -> BlockSparseParams:
    """Validated BlockSparseParams with frame_hw filled in."""
    if not isinstance(bs, BlockSparseParams):
        raise TypeError(f"block_sparse: expected a BlockSparseParams or None, got {type(bs).__name__}")
    hw = bs.frame_hw
    if hw is None:
        hw = rope.frame_hw if rope is not None else _selection_frame_hw(bs)
        if hw is None:
            raise ValueError("block_sparse.frame_hw: expected (H, W) (or pass rope= or selection=), got None")
    Hf, Wf = _frame_hw(hw)
    if rope is not None and (Hf, Wf) != rope.frame_hw:
        raise ValueError(f"block_sparse.frame_hw: expected {rope.frame_hw} (rope grid's H, W), got {(Hf, Wf)}")
    n = Hf * Wf
    Sn = q.shape[1]
    if Sn % n or Sc % n:
        raise ValueError(
            f"block_sparse.frame_hw: expected fresh seq {Sn} and cache seq {Sc} to be multiples of H*W = {n}, "
            f"got frame_hw={(Hf, Wf)}"
        )
    grid_q = (Sn // n, Hf, Wf)
    grid_k = ((Sc + Sn) // n, Hf, Wf)
    if bs.selection is None:
        check_sparsity(bs.sparsity, bs.cdf_threshold)
        cq = check_chunk(bs.chunk_q, grid_q, "block_sparse.chunk_q", "the fresh grid")
        ck = check_chunk(bs.chunk_q if bs.chunk_k is None else bs.chunk_k, grid_k, "block_sparse.chunk_k", "the key grid")
    else:
        if not compiling():  # skipped while traced, as the other checks (dynamo cannot build a SimpleNamespace)
            check_no_rule_beside_selection(bs.sparsity, bs.cdf_threshold, "block_sparse")
            k_all = SimpleNamespace(shape=(q.shape[0], Sc + Sn) + tuple(q.shape[2:]))
            _check_params_selection(bs, q, k_all, grid_q, grid_k)  # first: it checks selection's type
        cq, ck = bs.selection.chunk_q, bs.selection.chunk_k
    # a numpy float32 rule as the Python float of its value (the Triton gating computes 1 - sparsity with it)
    return dataclasses.replace(bs, frame_hw=(Hf, Wf), chunk_q=cq, chunk_k=ck, sparsity=plain_float(bs.sparsity),
                               cdf_threshold=plain_float(bs.cdf_threshold))


def attn_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    *,
    rope: Optional[Rope3D] = None,
    scale: Optional[float] = None,
    block_sparse: Optional[BlockSparseParams] = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Attention of fresh (noisy) tokens over ``[cache; fresh]`` keys, the VC hot path.

    ``out = softmax(q' [k_cache; k']^T * scale) [v_cache; v]`` where ``'`` is 3D RoPE at the fresh
    tokens' grid frames ``c .. c+Tn-1`` (``c = Sc / (H*W)``) when ``rope`` is given. The cached K is
    stored already rotated and is never touched. A batch-1 cache serves every batch entry (the CFG
    batch) without being copied.

    ::

        keys:    [ k_cache (Bc, Sc): frames 0..c-1 | k (B, Sn): frames c..c+Tn-1 ]
        queries: q (B, Sn) at frames c..c+Tn-1, attend to all keys (optionally block-sparse)

    Args:
        q, k, v (Tensor): ``[batch, seq_new, heads, head_dim]``, any strides; k and v (and the cache) may
            have fewer heads than q, dividing them (GQA/MQA: kv head ``h // group``; dense attention only).
        k_cache, v_cache (Tensor | None): ``[Bc, seq_cache, heads_kv, head_dim]``, Bc in {1, batch};
            both or neither; ``seq_cache`` 0 is the same as no cache.
        rope (Rope3D | None): tables for a grid covering cache + fresh frames (fused into the
            kernels for ``pairs="interleaved"``; ``pairs="half"`` rotates q/k in torch first).
        scale (float | None): default ``head_dim ** -0.5``.
        block_sparse (BlockSparseParams | None): block-sparse attention over the ``(c + Tn, H, W)``
            key grid instead of dense.
        backend (str): ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        return_lse (bool): also return ``lse [batch, heads, seq_new]`` fp32: natural log of the
            softmax denominator over all keys attended (``-inf`` for a query that attends to nothing,
            possible only with ``block_sparse``), for merging with attention over other keys (SPEC 12).

    Returns:
        Tensor: ``[batch, seq_new, heads, head_dim]`` in q's dtype, contiguous; ``(out, lse)`` with
        ``return_lse``. Forward only: inputs requiring grad raise ``ValueError``.
    """
    # a non-tensor cache is named by _check_cache below (reading its .shape first was an AttributeError)
    Sc = k_cache.shape[1] if isinstance(k_cache, torch.Tensor) else 0
    if not compiling():
        check_backend_name(backend)
        check_bool(return_lse, "return_lse")
        check_qkv(q, k, v, gqa=True)
        if k.shape[2] != q.shape[2] and block_sparse is not None:
            raise ValueError(
                f"k: expected {q.shape[2]} heads (same as q) with block_sparse (GQA is dense only), got {k.shape[2]}"
            )
        # fresh keys are q's own tokens when they need q's grid positions (rope, block_sparse)
        if k.shape[1] != q.shape[1] and (rope is not None or block_sparse is not None):
            raise ValueError(
                f"k: expected seq {q.shape[1]} (same as q, needed with rope/block_sparse), got {k.shape[1]}"
            )
        check_scale(scale)
        _check_cache(q, k_cache, v_cache, k.shape[2])
        if rope is not None:
            if not isinstance(rope, Rope3D):
                raise TypeError(f"rope: expected a Rope3D or None, got {type(rope).__name__}")
            check_rope_device(rope, q, "q")
            hw = rope.tokens_per_frame
            if Sc % hw:
                raise ValueError(f"k_cache: expected seq to be a multiple of H*W = {hw} (rope grid {rope.grid}), got {Sc}")
            if q.shape[1] % hw:
                raise ValueError(f"q: expected seq to be a multiple of H*W = {hw} (rope grid {rope.grid}), got {q.shape[1]}")
            if q.shape[3] != rope.head_dim:
                raise ValueError(f"q: expected head_dim {rope.head_dim} (rope.head_dim), got {q.shape[3]}")
            frames = (Sc + q.shape[1]) // hw
            if frames > rope.grid[0]:
                raise ValueError(
                    f"rope: expected a grid of at least {frames} frames (cache {Sc // hw} + fresh {q.shape[1] // hw}), "
                    f"got {rope.grid}"
                )
    # metadata only, so also while torch.compile traces: skipped there, the torch path (run under no_grad)
    # returned an output without a gradient, silently
    check_no_grad([("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)], "attn_with_kv_cache")
    if Sc == 0:
        # an empty cache (Sc = 0, SPEC 4 allows it) is no cache: no kernel sees an empty segment
        k_cache = v_cache = None
    if block_sparse is not None:
        block_sparse = _normalize_block_sparse(block_sparse, q, k, Sc, rope)
    if rope is not None and rope.pairs != "interleaved":
        # the kernels' fused RoPE rotates interleaved pairs: rotate-half is applied here, in torch
        with torch.no_grad():
            c = Sc // rope.tokens_per_frame
            q, k = apply_rope_3d(q, rope, frame_offset=c), apply_rope_3d(k, rope, frame_offset=c)
        rope = None
    scale = default_scale(q, scale)
    if block_sparse is None:
        c = choose("attn_with_kv_cache", q, k, v, k_cache, v_cache, requested=backend)
    else:
        cq, ck = block_sparse.chunk_q, block_sparse.chunk_k
        c = choose(
            "attn_with_kv_cache", q, k, v, k_cache, v_cache, requested=backend, block_sparse=True,
            block_tokens=(int(cq[0] * cq[1] * cq[2]), int(ck[0] * ck[1] * ck[2])),
            key_segments=1 if k_cache is None else 2,
            key_split_aligned=_split_aligned(k_cache, block_sparse),
        )
    if c.impl != "torch_reference":
        fn = impl_fn("attn_with_kv_cache", c.impl)
        if return_lse:
            return fn(q, k, v, k_cache, v_cache, rope, scale, block_sparse, return_lse=True)
        return fn(q, k, v, k_cache, v_cache, rope, scale, block_sparse)
    with torch.no_grad():
        if rope is not None:
            c = Sc // rope.tokens_per_frame
            q = apply_rope_3d(q, rope, frame_offset=c)
            k = apply_rope_3d(k, rope, frame_offset=c)
        if block_sparse is None:
            return kv_cache_attn_reference(q, k, v, k_cache, v_cache, scale, return_lse)
        # reference BSA over the explicit concatenation (a batch-1 cache is expanded into it)
        k_all, v_all = cat_cache(k_cache, k), cat_cache(v_cache, v)
        sel = block_sparse.selection
        if sel is None:
            Hf, Wf = block_sparse.frame_hw
            n = Hf * Wf
            sel = select_blocks(
                q, k_all, grid_q=(q.shape[1] // n, Hf, Wf), grid_k=(k_all.shape[1] // n, Hf, Wf),
                chunk_q=block_sparse.chunk_q, chunk_k=block_sparse.chunk_k, sparsity=block_sparse.sparsity,
                cdf_threshold=block_sparse.cdf_threshold, backend="torch",
            )
        out, lse = block_sparse_attn_reference(q, k_all, v_all, sel, scale)
        return (out, lse) if return_lse else out


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    *,
    softmax_scale: Optional[float] = None,
    return_softmax_lse: bool = False,
    rope: Optional[Rope3D] = None,
    block_sparse: Optional[BlockSparseParams] = None,
    backend: str = "auto",
):
    """flash-attn's ``flash_attn_with_kvcache`` argument order and names, over ``attn_with_kv_cache``.

    ``out = softmax(q [k_cache; k]^T * softmax_scale) [v_cache; v]``. Unlike flash-attn the cache is
    never written in place (no ``cache_seqlens``): the fresh ``k``/``v`` are read from their own
    tensors as a second key segment, and the whole cache is attended. ``k=None``: attention over the
    cache alone. With pre-rotated q/k (any RoPE convention applied by the caller) leave ``rope=None``.

    ::

        keys:    [ k_cache (Bc, Sc) | k (B, Sk) ]      Bc in {1, B}; a batch-1 cache is never copied
        queries: q (B, Sq) attend to all keys (block-sparse over the 3D grid with block_sparse=)

    Args:
        q (Tensor): ``[batch, seq_q, heads, head_dim]``, any strides.
        k_cache, v_cache (Tensor): ``[Bc, seq_cache, heads_kv, head_dim]``; heads_kv divides heads
            (GQA/MQA: kv heads indexed in the kernel, no copy; dense attention only); ``seq_cache``
            0 is no cache (k/v then needed).
        k, v (Tensor | None): ``[batch, seq_k, heads_kv, head_dim]`` fresh keys/values, both or
            neither; ``seq_k`` must equal ``seq_q`` when rope or block_sparse is given.
        softmax_scale (float | None): default ``head_dim ** -0.5``.
        return_softmax_lse (bool): also return ``lse [batch, heads, seq_q]`` fp32, natural log.
        rope (Rope3D | None): LongCat 3D RoPE of fresh q/k at frames ``Sc/(H*W)..`` (k required).
        block_sparse (BlockSparseParams | None): block-sparse over the ``[cache; fresh]`` key grid.
        backend (str): ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        Tensor ``[batch, seq_q, heads, head_dim]`` (q's dtype), or ``(out, lse)`` with
        ``return_softmax_lse``. Forward only.
    """
    if (k is None) != (v is None):
        raise ValueError(f"k/v: expected both or neither, got k={_type_name(k)}, v={_type_name(v)}")
    if not compiling():
        # checked here under this function's own names (attn_with_kv_cache calls them scale / return_lse)
        check_tensor(q, "q")
        check_scale(softmax_scale, "softmax_scale")
        check_bool(return_softmax_lse, "return_softmax_lse")
        if block_sparse is not None and not isinstance(block_sparse, BlockSparseParams):
            raise TypeError(f"block_sparse: expected a BlockSparseParams or None, got {type(block_sparse).__name__}")
    if k is None:
        if rope is not None:
            raise ValueError(f"rope: expected None when k is None (rope rotates the fresh q/k), got {_type_name(rope)}")
        if not compiling():
            check_tensor(k_cache, "k_cache")
            check_tensor(v_cache, "v_cache")
            _check_cache(q, k_cache, v_cache, k_cache.shape[2], "k_cache")
            if block_sparse is not None and k_cache.shape[2] != q.shape[2]:
                # as with fresh k/v, and with the cache's own shape (check_qkv below sees it expanded)
                raise ValueError(
                    f"k_cache: expected {q.shape[2]} heads (same as q) with block_sparse (GQA is dense only), "
                    f"got {k_cache.shape[2]} (shape {tuple(k_cache.shape)})"
                )
            B = q.shape[0]
            check_qkv(q, k_cache.expand(B, -1, -1, -1), v_cache.expand(B, -1, -1, -1),
                      names=("q", "k_cache", "v_cache"), gqa=block_sparse is None)
        B = q.shape[0]
        if not compiling():
            # forward only, like the fresh-key path (block_sparse_attn below would pass gradients on);
            # named here: below the cache is passed on as k / v
            check_no_grad([("q", q), ("k_cache", k_cache), ("v_cache", v_cache)], "flash_attn_with_kvcache")
        if block_sparse is not None:
            # the cache is the whole key grid: fresh queries against (Sc / (H*W)) cached frames
            if k_cache.shape[0] != B:
                k_cache, v_cache = k_cache.expand(B, -1, -1, -1), v_cache.expand(B, -1, -1, -1)
            k, v, k_cache, v_cache = k_cache, v_cache, None, None
            return _cache_only_block_sparse(q, k, v, softmax_scale, block_sparse, backend, return_softmax_lse)
        # the cache becomes the (only) key segment; a batch-1 cache is a stride-0 view, not a copy
        k, v = k_cache.expand(B, -1, -1, -1), v_cache.expand(B, -1, -1, -1)
        k_cache = v_cache = None
    return attn_with_kv_cache(
        q, k, v, k_cache, v_cache, rope=rope, scale=softmax_scale, block_sparse=block_sparse, backend=backend,
        return_lse=return_softmax_lse,
    )


def _cache_only_block_sparse(q, k, v, scale, bs, backend, return_lse):
    """Block-sparse attention of q against the cache alone (key grid = the cache's frames)."""
    from ..block_sparse_attn.api import block_sparse_attn  # noqa: PLC0415

    # bs: a BlockSparseParams (flash_attn_with_kvcache, the only caller, checked it)
    hw = bs.frame_hw if bs.frame_hw is not None else _selection_frame_hw(bs)
    if hw is None:
        raise ValueError("block_sparse.frame_hw: expected (H, W) (or selection=) when k is None, got None")
    Hf, Wf = _frame_hw(hw)
    n = Hf * Wf
    if q.shape[1] % n or k.shape[1] % n:
        raise ValueError(f"block_sparse.frame_hw: expected q seq {q.shape[1]} and cache seq {k.shape[1]} to be "
                         f"multiples of H*W = {n}")
    grid_q, grid_k = (q.shape[1] // n, Hf, Wf), (k.shape[1] // n, Hf, Wf)
    if bs.selection is None and not compiling():
        # the same names as with fresh k/v (_normalize_block_sparse), not block_sparse_attn's own
        check_sparsity(bs.sparsity, bs.cdf_threshold)
        check_chunk(bs.chunk_q, grid_q, "block_sparse.chunk_q", "the fresh grid")
        check_chunk(bs.chunk_q if bs.chunk_k is None else bs.chunk_k, grid_k, "block_sparse.chunk_k", "the key grid")
    kw = dict(grid_q=grid_q, grid_k=grid_k, scale=scale, backend=backend, return_lse=return_lse)
    if bs.selection is not None:
        if not compiling():
            # as with fresh k/v (_normalize_block_sparse): a rule beside the selection would be dropped
            check_no_rule_beside_selection(bs.sparsity, bs.cdf_threshold, "block_sparse")
            _check_params_selection(bs, q, k, grid_q, grid_k)
        return block_sparse_attn(q, k, v, selection=bs.selection, **kw)
    return block_sparse_attn(q, k, v, chunk_q=bs.chunk_q, chunk_k=bs.chunk_k, sparsity=bs.sparsity,
                             cdf_threshold=bs.cdf_threshold, **kw)
