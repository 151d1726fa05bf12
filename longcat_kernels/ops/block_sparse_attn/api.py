"""Block-sparse 3D attention (SPEC 3): public surface, validation, dispatch.

Which implementation runs is decided by ``longcat_kernels.dispatch.choose`` (one place for all ops);
the implementations (registered there) take arguments already validated and normalised:
- select_blocks: ``(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold) -> BlockSelection``
- block_sparse_attn: ``(q, k, v, selection, scale, return_lse=False) -> out`` or ``(out, lse)``
  (differentiable on torch and triton, through out and lse alike)
- block_sparse_attn_fwd: ``(q, k, v, selection, scale) -> (out, lse)`` (forward only)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ...dispatch import BackendUnavailableError, choose, impl_fn
from ..._validate import (
    check_backend_name,
    check_dense,
    check_chunk,
    check_grid,
    check_qkv,
    check_bool,
    check_scale,
    default_scale,
    check_sparsity,
    compiling,
    has_values,
    plain_float,
)
from ...grid import Triple, as_triple, total_blocks
from .reference import block_sparse_attn_reference
from .selection import BlockSelection, select_blocks_reference

__all__ = ["BlockSelection", "select_blocks", "block_sparse_attn"]

DEFAULT_CHUNK: Triple = (4, 4, 4)
DEFAULT_SPARSITY = 0.9375


def _resolve_grids(q, k, grid_q, grid_k, chunk_q, chunk_k) -> Tuple[Triple, Triple, Triple, Triple]:
    """Validated (grid_q, grid_k, chunk_q, chunk_k); grid_k defaults to grid_q's H, W with
    Tk = Sk / (H*W); chunk_k defaults to chunk_q."""
    if grid_q is None:
        raise ValueError("grid_q: expected a tuple (t, h, w) with t*h*w == q's seq length, got None")
    gq = check_grid(grid_q, q.shape[1], "grid_q", "q's seq")
    Sk = k.shape[1]
    if grid_k is None:
        hw = gq[1] * gq[2]
        if Sk % hw:
            raise ValueError(
                f"grid_k: k's seq length {Sk} is not a multiple of grid_q's H*W = {hw}; pass grid_k explicitly"
            )
        gk = (Sk // hw, gq[1], gq[2])
    else:
        gk = check_grid(grid_k, Sk, "grid_k", "k's seq")
        if gk[1:] != gq[1:]:
            raise ValueError(f"grid_k: expected the same (h, w) as grid_q {gq[1:]}, got {gk[1:]}")
    cq = check_chunk(chunk_q, gq, "chunk_q", "grid_q")
    ck = check_chunk(chunk_q if chunk_k is None else chunk_k, gk, "chunk_k", "grid_k")
    return gq, gk, cq, ck


def check_selection(selection, q, k, grid_q, grid_k, chunk_q=None, chunk_k=None, prefix: str = "") -> None:
    """Raises if ``selection`` does not fit q ``[B, Sq, H, D]`` and keys of k's seq, or the grids and
    chunks passed alongside it (None: not passed; a given chunk that differs would be ignored)."""
    if not isinstance(selection, BlockSelection):
        raise TypeError(f"{prefix}selection: expected a BlockSelection, got {type(selection).__name__}")
    B, Sq, H, _ = q.shape
    gq, gk = selection.grid_q, selection.grid_k
    if prefix:  # attn_with_kv_cache: the grids are the call's (q's frames, the [cache; fresh] keys), not arguments
        for name, grid, own, what in (("grid_q", grid_q, gq, "q's grid (fresh frames, H, W)"),
                                      ("grid_k", grid_k, gk, "the key grid ([cache; fresh] frames, H, W)")):
            if own != as_triple(grid, name):
                raise ValueError(f"{prefix}selection.{name}: expected {what} {as_triple(grid, name)}, got {own}")
    for name, given, own in (("grid_q", grid_q, gq), ("grid_k", grid_k, gk),
                             (prefix + "chunk_q", chunk_q, selection.chunk_q),
                             (prefix + "chunk_k", chunk_k, selection.chunk_k)):
        if given is not None and as_triple(given, name) != own:
            raise ValueError(f"{name}: expected {own} (selection.{name.split('.')[-1]}) or nothing with selection=, "
                             f"got {as_triple(given, name)}")
    if gq[0] * gq[1] * gq[2] != Sq:
        raise ValueError(f"selection.grid_q: expected t*h*w == q's seq length {Sq}, got {gq}")
    if gk[0] * gk[1] * gk[2] != k.shape[1]:
        raise ValueError(f"selection.grid_k: expected t*h*w == k's seq length {k.shape[1]}, got {gk}")
    if tuple(gk[1:]) != tuple(gq[1:]):  # the kernels place key tokens with the query grid's (h, w)
        raise ValueError(f"selection.grid_k: expected the same (h, w) as selection.grid_q {tuple(gq[1:])}, "
                         f"got {tuple(gk[1:])}")
    Nq = total_blocks(gq, selection.chunk_q)
    if tuple(selection.counts.shape) != (B, H, Nq):
        raise ValueError(f"selection.counts: expected shape {(B, H, Nq)}, got {tuple(selection.counts.shape)}")
    if selection.indices.dim() != 4 or tuple(selection.indices.shape[:3]) != (B, H, Nq):
        raise ValueError(
            f"selection.indices: expected shape {(B, H, Nq)} + (max_sel,), got {tuple(selection.indices.shape)}"
        )
    for name, t in (("selection.indices", selection.indices), ("selection.counts", selection.counts)):
        check_dense(t, name)
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {t.device}")
    _check_selection_values(selection)


def _check_selection_values(sel: BlockSelection) -> None:
    """Counts in ``[0, min(max_sel, Nk)]``; the first ``counts`` indices of a row distinct ids in
    ``[0, Nk)``. A hand-built selection that breaks this would read out of bounds in a kernel or
    attend a block twice (a silently different softmax). One device sync, once per selection: the
    result is remembered on the object together with its tensors' versions (an in-place edit of
    ``indices``/``counts`` is checked again)."""
    if compiling():  # traced calls: checked by the eager call that built or first used the selection
        return
    if not (has_values(sel.indices) and has_values(sel.counts)):  # meta / fake tensors: no values to check
        return
    # inference tensors (made under torch.inference_mode) have no version counter: checked every call
    inference = sel.indices.is_inference() or sel.counts.is_inference()
    stamp = None if inference else (id(sel.indices), sel.indices._version, id(sel.counts), sel.counts._version)
    if stamp is not None and getattr(sel, "_values_checked", None) == stamp:
        return
    idx, cnt = sel.indices, sel.counts
    Nk, w = sel.num_k_blocks, idx.shape[-1]
    if idx.numel() and cnt.numel():
        valid = torch.arange(w, device=idx.device) < cnt[..., None]
        bad_cnt = (cnt < 0) | (cnt > min(w, Nk))
        bad_idx = valid & ((idx < 0) | (idx >= Nk))
        # duplicates among the valid entries: invalid slots get distinct out-of-range keys
        keyed = torch.where(valid, idx.long(), Nk + torch.arange(w, device=idx.device))
        srt = keyed.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]).any(dim=-1) if w > 1 else torch.zeros_like(bad_cnt)
        flags = torch.stack([bad_cnt.any(), bad_idx.any(), dup.any()]).tolist()
        if flags[0]:
            pos = tuple(torch.nonzero(bad_cnt)[0].tolist())
            raise ValueError(
                f"selection.counts: expected values in [0, {min(w, Nk)}] (min of max_sel={w} and Nk={Nk}), got "
                f"{int(cnt[pos])} at [b, h, q_block] = {list(pos)}"
            )
        if flags[1]:
            pos = tuple(torch.nonzero(bad_idx)[0].tolist())
            raise ValueError(
                f"selection.indices: expected key-block ids in [0, {Nk}) in the first counts entries of each row, "
                f"got {int(idx[pos])} at [b, h, q_block, slot] = {list(pos)}"
            )
        if flags[2]:
            pos = tuple(torch.nonzero(dup)[0].tolist())
            raise ValueError(
                f"selection.indices: expected distinct key-block ids in each row, row [b, h, q_block] = {list(pos)} "
                f"repeats one: {idx[pos][: int(cnt[pos])].tolist()}"
            )
    if stamp is not None:
        object.__setattr__(sel, "_values_checked", stamp)


def check_no_rule_beside_selection(sparsity, cdf_threshold, name: str) -> None:
    """A precomputed selection replaces the rules: a sparsity other than the default (or None), or a
    cdf_threshold, passed beside it would be ignored, so it raises (``name``: the argument named)."""
    if cdf_threshold is not None or sparsity not in (None, DEFAULT_SPARSITY):
        raise ValueError(
            f"{name}: expected either selection= or a selection rule (sparsity / cdf_threshold), got "
            f"both (sparsity={sparsity}, cdf_threshold={cdf_threshold})"
        )


def gating_backend(backend: str, q: torch.Tensor) -> str:
    """Gating follows an explicit attention backend when that backend can run select_blocks on q
    (torch, triton), else ``"auto"`` (the cuda backend has no gating kernel; ``"auto"`` for
    select_blocks keeps auto's choice under ``LONGCAT_KERNELS_BACKEND=cuda`` too: dispatch)."""
    if backend in ("auto", "torch"):
        return backend
    try:
        # a question only: the select_blocks call that runs records its own choice
        choose("select_blocks", q.detach(), requested=backend, needs_grad=False, record=False)
    except BackendUnavailableError:
        return "auto"
    return backend


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    grid_q: Sequence[int],
    grid_k: Optional[Sequence[int]] = None,
    chunk_q: Sequence[int] = DEFAULT_CHUNK,
    chunk_k: Optional[Sequence[int]] = None,
    sparsity: Optional[float] = DEFAULT_SPARSITY,
    cdf_threshold: Optional[float] = None,
    backend: str = "auto",
) -> BlockSelection:
    """Gating of block-sparse attention: which key blocks each query block attends to.

    Tokens are grouped in 3D blocks of ``chunk`` (partial blocks at the grid's edges hold only the
    real tokens). q and k are mean-pooled per block (fp32 sums, rounded to the input dtype); the
    block score is ``q_blk @ k_blk^T`` in fp32, unscaled. Rules (per batch, head and query block):

    - top-k (``sparsity``): keep ``int((1 - sparsity) * Nk)`` highest-scoring key blocks;
    - cdf (``cdf_threshold``): ``p = softmax(score / sqrt(D))`` sorted descending; keep the blocks
      whose cumulative sum is ``<= cdf_threshold`` (may be none: those queries output zeros;
      ``1.0`` keeps every block);
    - both given: keep the max of the two counts (highest scores first).

    Args:
        q (Tensor): ``[batch, seq_q, heads, head_dim]``, any strides.
        k (Tensor): ``[batch, seq_k, heads, head_dim]``.
        grid_q (tuple): ``(Tq, H, W)`` with ``Tq*H*W == seq_q``.
        grid_k (tuple | None): ``(Tk, H, W)``; default ``(seq_k // (H*W), H, W)``.
        chunk_q (tuple): block shape of queries, each entry <= the grid's.
        chunk_k (tuple | None): block shape of keys; default chunk_q.
        sparsity (float | None): fraction of key blocks dropped by top-k, in [0, 1).
        cdf_threshold (float | None): cumulative probability kept by the cdf rule, in [0, 1].
        backend (str): ``"auto"``, ``"torch"`` or ``"triton"`` (``"cuda"`` raises
            ``BackendUnavailableError``: no csrc gating kernel; ``block_sparse_attn(backend="cuda")``
            gates on ``"auto"``).

    Returns:
        BlockSelection: ``indices [B, H, Nq, max_sel]`` int32 (-1 past ``counts``), ``counts [B, H, Nq]``.
    """
    # a numpy float32 rule as the Python float of its value (its 1 - sparsity would be float32 math)
    sparsity, cdf_threshold = plain_float(sparsity), plain_float(cdf_threshold)
    if not compiling():
        check_backend_name(backend)
        check_qkv(q, k, k, names=("q", "k", "k"))
        check_sparsity(sparsity, cdf_threshold)
    gq, gk, cq, ck = _resolve_grids(q, k, grid_q, grid_k, chunk_q, chunk_k)
    # detached before dispatch too: no gradient flows through a selection, so a torch.func transform or
    # forward-mode AD over q (e.g. the gating of block_sparse_attn inside torch.func.grad) is no reason to
    # refuse the Triton gating (explicit "triton" raised; "auto" on CUDA fell back to the torch gating)
    q, k = q.detach(), k.detach()
    c = choose("select_blocks", q, k, requested=backend, needs_grad=False)
    if c.impl != "torch_reference":
        return impl_fn("select_blocks", c.impl)(q, k, gq, gk, cq, ck, sparsity, cdf_threshold)
    return select_blocks_reference(q, k, gq, gk, cq, ck, sparsity, cdf_threshold)


def _prepare(q, k, v, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold, selection, scale, backend):
    if not compiling():
        check_backend_name(backend)
        check_qkv(q, k, v)
        check_scale(scale)
        if selection is not None:
            check_no_rule_beside_selection(sparsity, cdf_threshold, "selection")
            # chunk_q left at its default (the very object) counts as not passed; one passed, even (4, 4, 4), must
            # be the selection's (an explicit chunk_q=(4, 4, 4) beside a 2x2x2 selection was ignored without a word)
            check_selection(selection, q, k, grid_q, grid_k, None if chunk_q is None or chunk_q is DEFAULT_CHUNK
                            else chunk_q, chunk_k)
        else:
            check_sparsity(sparsity, cdf_threshold)
    if selection is None:
        gq, gk, cq, ck = _resolve_grids(q, k, grid_q, grid_k, chunk_q, chunk_k)
        gb = gating_backend(backend, q)
        selection = select_blocks(
            q, k, grid_q=gq, grid_k=gk, chunk_q=cq, chunk_k=ck, sparsity=sparsity, cdf_threshold=cdf_threshold,
            backend=gb,
        )
    return selection, default_scale(q, scale)


def block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid_q: Optional[Sequence[int]] = None,
    grid_k: Optional[Sequence[int]] = None,
    chunk_q: Sequence[int] = DEFAULT_CHUNK,
    chunk_k: Optional[Sequence[int]] = None,
    sparsity: Optional[float] = DEFAULT_SPARSITY,
    cdf_threshold: Optional[float] = None,
    selection: Optional[BlockSelection] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Block-sparse 3D attention over video token grids (LongCat BSA semantics).

    ::

        q blocks (3D chunks of grid_q)      key blocks of grid_k
        qb0 ─ attends ─▶ [kb3, kb0, kb7]    (selected by select_blocks, or `selection`)
        qb1 ─ attends ─▶ []                 -> output 0 for its tokens, no NaN

    Every query token attends with one softmax to exactly the tokens of its block's selected key
    blocks: ``out = softmax(q k_sel^T * scale) v_sel``.

    Args:
        q (Tensor): ``[batch, seq_q, heads, head_dim]``, bf16/fp16 on GPU, fp32 anywhere; any strides.
        k, v (Tensor): ``[batch, seq_k, heads, head_dim]``, same dtype/device.
        grid_q (tuple): ``(Tq, H, W)``; required unless ``selection`` is given.
        grid_k, chunk_q, chunk_k, sparsity, cdf_threshold: gating, see ``select_blocks``.
        selection (BlockSelection | None): precomputed gating (it carries grids and chunks; leave
            sparsity/cdf_threshold at their defaults). Reuse it across heads' calls or steps.
        scale (float | None): default ``head_dim ** -0.5``.
        backend (str): ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``. Selects the attention kernel;
            gating runs on the same backend when it implements ``select_blocks``, else on ``"auto"``.
        return_lse (bool): also return the log-sum-exp (SPEC 12).

    Returns:
        Tensor: ``[batch, seq_q, heads, head_dim]`` in q's dtype, contiguous.
        Differentiable w.r.t. q, k, v on the torch and triton backends (the selection has no gradient).
        With ``return_lse``: ``(out, lse)``, ``lse [batch, heads, seq_q]`` fp32, natural log of
        ``sum(exp(q k^T * scale))`` over the selected keys, ``-inf`` for a query block with no selected
        key block; lse is differentiable too (a loss that merges partial results backpropagates through
        it; its gradient is 0 where it is ``-inf``). Two results over disjoint key sets merge exactly:
        ``lse = logaddexp(l1, l2)``, ``out = o1 * exp(l1 - lse) + o2 * exp(l2 - lse)``.
    """
    check_bool(return_lse, "return_lse")
    selection, scale = _prepare(
        q, k, v, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold, selection, scale, backend
    )
    c = choose("block_sparse_attn", q, k, v, requested=backend, block_sparse=True,
               block_tokens=block_tokens(selection))
    if c.impl != "torch_reference":
        fn = impl_fn("block_sparse_attn", c.impl)
        return fn(q, k, v, selection, scale, return_lse=True) if return_lse else fn(q, k, v, selection, scale)
    out, lse = block_sparse_attn_reference(q, k, v, selection, scale)
    return (out, lse) if return_lse else out


def block_tokens(sel: BlockSelection) -> Tuple[int, int]:
    """(tokens of a full query block, tokens of a full key block) of a selection."""
    cq, ck = sel.chunk_q, sel.chunk_k
    return (int(cq[0] * cq[1] * cq[2]), int(ck[0] * ck[1] * ck[2]))


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: Optional[float],
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Internal: block-sparse forward returning ``(out [B,Sq,H,D], lse [B,H,Sq] fp32)``.

    A query token whose block has no selected key block gives out = 0 and lse = -inf.
    """
    selection, scale = _prepare(q, k, v, None, None, None, None, None, None, selection, scale, backend)
    c = choose("block_sparse_attn_fwd", q, k, v, requested=backend, block_sparse=True,
               block_tokens=block_tokens(selection), needs_grad=False)
    if c.impl != "torch_reference":
        return impl_fn("block_sparse_attn_fwd", c.impl)(q, k, v, selection, scale)
    return block_sparse_attn_reference(q, k, v, selection, scale)

