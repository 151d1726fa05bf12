"""Triton backend of block-sparse 3D attention: gating, forward, backward, torch.library ops.

Entry points used by ``api.py``:

- ``select_blocks_triton(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold)``
  -> ``BlockSelection`` (pooling, scores and top-k in Triton; cdf rules in torch).
- ``block_sparse_attn_fwd_triton(q, k, v, selection, scale)`` -> ``(out, lse)`` (no autograd).
- ``block_sparse_attn_triton(q, k, v, selection, scale)`` -> ``out`` (autograd-aware).

Registered ops (one boundary per call): ``longcat_kernels::bsa_fwd`` (with autograd) and
``longcat_kernels::bsa_bwd``. The backward is deterministic: dk/dv from one kernel over the transposed
selection, dq from its own kernel, no atomics (dq accumulated with fp32 atomics inside the dk/dv
kernel lost: 91.7 ms vs 57.8, ``bench/dev/bsa_bwd_sweep_gpu.py``; removed).
"""

from __future__ import annotations

from typing import Optional

import torch

from longcat_kernels._validate import check_op_block_geometry, check_op_grad_inputs, check_op_kv, needs_grad
from longcat_kernels.dispatch import launcher, triton_interpret, triton_tile_size
from longcat_kernels.grid import num_blocks

from . import _triton_kernels as K

_LOG2E = 1.4426950408889634

# Launch configuration, keyed by padded key-block size. Tuned on H100 (bench/dev/bench_bsa_gpu_dev.py).
# fwd / dq: (key blocks per iteration, num_warps, num_stages); dkdv: (num_warps, num_stages, query
# rows per slice, transposed formulation). The backward entries were re-swept on the H200 with
# Triton 3.6 (bench/dev/bsa_bwd_sweep_gpu.py, bench/results/h200/bsa-bwd-sweep_20261204_5043ac0.json;
# 24x44x80, H32, 0.9375, video-like inputs): 64-token blocks kept (57.8 ms; best of 36 configs 57.5,
# within noise; atomic dq 91.7, since removed); 128-token dkdv (8, 2, 32, True) -> (8, 3, 64, True): 53.3 -> 51.0 ms.
_CONFIG = {
    "fwd": {64: (1, 4, 2), 128: (1, 8, 3)},
    "dq": {64: (1, 4, 3), 128: (1, 8, 3)},
    "dkdv": {64: (4, 3, 64, False), 128: (8, 3, 64, True)},
}
_INTERPRET_CONFIG = {"fwd": (2, 4, 1), "dq": (2, 4, 1), "dkdv": (4, 1, 16, True)}


_STAGES_OK: dict = {}


def _launch(kernel, grid, *args, num_warps, num_stages, **meta):
    """Launch; on a shared-memory OutOfResources retry with fewer pipeline stages (remembered)."""
    from triton.runtime.errors import OutOfResources

    key = (id(kernel), num_warps, num_stages, args[0].dtype, *meta.values())
    stages = _STAGES_OK.get(key, num_stages)
    while True:
        try:
            launcher(kernel, grid)(*args, num_warps=num_warps, num_stages=stages, **meta)
            _STAGES_OK[key] = stages
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1


def _interpreting() -> bool:
    return triton_interpret()


def _geom(grid, chunk):
    """(nT, nH, nW, padded block size, divisible-and-unpadded flag)."""
    t, h, w = (int(x) for x in grid)
    ct, ch, cw = (int(x) for x in chunk)
    n = num_blocks((t, h, w), (ct, ch, cw))
    blk = ct * ch * cw
    pb = triton_tile_size(blk)
    even = t % ct == 0 and h % ch == 0 and w % cw == 0 and pb == blk
    return n, pb, even


def _check_tile_head_dim(op: str, q: torch.Tensor) -> None:
    """The kernels index head_dim with ``tl.arange(0, D)``: a power of two (and >= 16 for ``tl.dot`` on a GPU).
    The public functions zero-pad other sizes (``_pad_head_dim``); a direct ``torch.ops`` call failed inside
    Triton ("arange's range must be a power of 2")."""
    D = q.shape[-1]
    if D < 1 or D & (D - 1):
        raise ValueError(f"{op}: q: expected head_dim a power of two (pad it with zeros to "
                         f"{triton_tile_size(max(D, 1))}, as block_sparse_attn does), got shape {tuple(q.shape)}")


def _last_dim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd_cfg(kblk: int):
    if _interpreting():
        bpi, nw, ns = _INTERPRET_CONFIG["fwd"]
    else:
        bpi, nw, ns = _CONFIG["fwd"].get(kblk, (1, 4, 2))
    # never exceed a 128-row key tile
    while bpi > 1 and kblk * bpi > 128:
        bpi //= 2
    return bpi, nw, ns


@torch.library.custom_op("longcat_kernels::bsa_fwd", mutates_args=())
def bsa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
    grid_q: list[int], grid_k: list[int], chunk_q: list[int], chunk_k: list[int], scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward. q [B,Sq,H,D], k/v [B,Sk,H,D] (any strides, last dim unit)
    -> out [B,Sq,H,D] (q dtype, contiguous), lse [B,H,Sq] fp32 (natural log)."""
    check_op_kv("bsa_fwd", q, [("k", k, "v", v, False)])
    check_op_block_geometry("bsa_fwd", q, k.shape[1], grid_q, grid_k, chunk_q, chunk_k, indices, counts)
    _check_tile_head_dim("bsa_fwd", q)
    # the kernels index head_dim, indices and counts with unit strides (the public functions pass them
    # so; a direct torch.ops call may not): a copy only where a stride differs
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    indices, counts = indices.contiguous(), counts.contiguous()
    B, Sq, NH, D = q.shape
    (nTq, nHq, nWq), bm, even_q = _geom(grid_q, chunk_q)
    (nTk, nHk, nWk), bn, even_k = _geom(grid_k, chunk_k)
    NQ = nTq * nHq * nWq
    out = torch.empty((B, Sq, NH, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, NH, Sq), dtype=torch.float32, device=q.device)
    bpi, nw, ns = _fwd_cfg(bn)
    max_sel = indices.shape[-1]
    _launch(K.bsa_fwd_kernel, (NQ, B * NH),
        q, k, v, out, lse, indices, counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        grid_q[0], grid_k[0], grid_q[1], grid_q[2], nHq, nWq, nHk, nWk, NQ, max_sel,
        NH, scale * _LOG2E,
        CQT=chunk_q[0], CQH=chunk_q[1], CQW=chunk_q[2], CKT=chunk_k[0], CKH=chunk_k[1], CKW=chunk_k[2],
        BLOCK_M=bm, KBLK=bn, BPI=bpi, D=D, EVEN_Q=even_q, EVEN_K=even_k,
        IEEE=q.dtype == torch.float32, num_warps=nw, num_stages=ns,
    )
    return out, lse


@bsa_fwd.register_fake
def _bsa_fwd_fake(q, k, v, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale):
    B, Sq, NH, D = q.shape
    return q.new_empty((B, Sq, NH, D)), q.new_empty((B, NH, Sq), dtype=torch.float32)


def transpose_selection(indices: torch.Tensor, counts: torch.Tensor, num_k_blocks: int):
    """Key block -> query blocks that selected it, as CSR on the device (no host sync).

    Returns ``offsets [B*H*Nk + 1] int32`` and ``q_blocks [B*H*Nq*max_sel] int32``: the query
    blocks of key block ``kb`` of head ``bh`` are ``q_blocks[offsets[bh*Nk+kb] : offsets[...+1]]``,
    ascending (stable sort, deterministic).
    """
    B, NH, NQ, S = indices.shape
    dev = indices.device
    nbh = B * NH
    slot = torch.arange(S, device=dev, dtype=torch.int32)
    valid = slot.view(1, 1, 1, S) < counts.unsqueeze(-1)
    bh = torch.arange(nbh, device=dev, dtype=torch.int64).view(B, NH, 1, 1) * num_k_blocks
    key = torch.where(valid, bh + indices.long(), nbh * num_k_blocks)
    key_sorted, perm = torch.sort(key.flatten(), stable=True)
    q_blocks = (perm // S) % NQ
    offsets = torch.searchsorted(
        key_sorted, torch.arange(nbh * num_k_blocks + 1, device=dev, dtype=torch.int64)
    )
    return offsets.to(torch.int32), q_blocks.to(torch.int32)


@torch.library.custom_op("longcat_kernels::bsa_bwd", mutates_args=())
def bsa_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
    grid_q: list[int], grid_k: list[int], chunk_q: list[int], chunk_k: list[int], scale: float,
    deterministic: bool, dlse: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of bsa_fwd through the same selection (BSHD contiguous); ``dlse``
    ``[B,H,Sq]``: the gradient reaching lse too, if any. ``deterministic``: the caller's request
    (``_deterministic``); every launch here is deterministic, so it changes nothing."""
    check_op_kv("bsa_bwd", q, [("k", k, "v", v, False)])
    check_op_grad_inputs("bsa_bwd", q, do, out, lse, dlse)
    check_op_block_geometry("bsa_bwd", q, k.shape[1], grid_q, grid_k, chunk_q, chunk_k, indices, counts)
    _check_tile_head_dim("bsa_bwd", q)
    do, q, k, v, out = (_last_dim_contig(x) for x in (do, q, k, v, out))  # unit strides, as in bsa_fwd
    lse, indices, counts = lse.contiguous(), indices.contiguous(), counts.contiguous()
    B, Sq, NH, D = q.shape
    Sk = k.shape[1]
    (nTq, nHq, nWq), bm, even_q = _geom(grid_q, chunk_q)
    (nTk, nHk, nWk), bn, even_k = _geom(grid_k, chunk_k)
    NQ = nTq * nHq * nWq
    NK = nTk * nHk * nWk
    ieee = q.dtype == torch.float32
    delta = torch.empty((B, NH, Sq), dtype=torch.float32, device=q.device)
    pre_block = 64
    launcher(K.bsa_bwd_preprocess_kernel, (triton_cdiv(Sq, pre_block), B * NH))(
        out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Sq, NH, BLOCK=pre_block, D=D, num_warps=4,
    )
    if dlse is not None:
        # d lse_i / d s_ij = P_ij, so dS = P * (dP - delta) + dlse * P = P * (dP - (delta - dlse))
        delta = delta - dlse.to(torch.float32)
    t_off, t_q = transpose_selection(indices, counts, NK)
    dk = torch.empty((B, Sk, NH, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Sk, NH, D), dtype=v.dtype, device=v.device)
    dq = torch.empty((B, Sq, NH, D), dtype=q.dtype, device=q.device)
    if _interpreting():
        nw_kv, ns_kv, msub, transposed = _INTERPRET_CONFIG["dkdv"]
        bpi, nw_q, ns_q = _INTERPRET_CONFIG["dq"]
    else:
        nw_kv, ns_kv, msub, transposed = _CONFIG["dkdv"].get(bn, (4, 2, 32, True))
        bpi, nw_q, ns_q = _CONFIG["dq"].get(bn, (1, 4, 2))
    while bpi > 1 and bn * bpi > 128:
        bpi //= 2
    msub = max(16, min(msub, bm))
    _launch(K.bsa_bwd_dkdv_kernel, (NK, B * NH),
        q, k, v, do, lse, delta, dk, dv, t_off, t_q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        grid_q[0], grid_k[0], grid_q[1], grid_q[2], nHq, nWq, nHk, nWk, NK,
        NH, scale, scale * _LOG2E,
        CQT=chunk_q[0], CQH=chunk_q[1], CQW=chunk_q[2], CKT=chunk_k[0], CKH=chunk_k[1], CKW=chunk_k[2],
        BLOCK_M=bm, MSUB=msub, BLOCK_N=bn, D=D, EVEN_Q=even_q, EVEN_K=even_k, IEEE=ieee,
        TRANSPOSED=transposed, num_warps=nw_kv, num_stages=ns_kv,
    )
    max_sel = indices.shape[-1]
    _launch(K.bsa_bwd_dq_kernel, (NQ, B * NH),
        q, k, v, do, lse, delta, dq, indices, counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        grid_q[0], grid_k[0], grid_q[1], grid_q[2], nHq, nWq, nHk, nWk, NQ, max_sel,
        NH, scale, scale * _LOG2E,
        CQT=chunk_q[0], CQH=chunk_q[1], CQW=chunk_q[2], CKT=chunk_k[0], CKH=chunk_k[1], CKW=chunk_k[2],
        BLOCK_M=bm, KBLK=bn, BPI=bpi, D=D, EVEN_Q=even_q, EVEN_K=even_k, IEEE=ieee,
        num_warps=nw_q, num_stages=ns_q,
    )
    return dq, dk, dv


@bsa_bwd.register_fake
def _bsa_bwd_fake(do, q, k, v, out, lse, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale, deterministic,
                  dlse=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _deterministic() -> bool:
    """``LONGCAT_KERNELS_DETERMINISTIC=1``, or torch's own switch ``torch.use_deterministic_algorithms(True)``
    (a training script's one call for reproducible gradients), passed to ``bsa_bwd``; since dq's fp32
    atomics were removed the backward is deterministic either way."""
    from ..._envvars import env_flag  # noqa: PLC0415

    return env_flag("LONGCAT_KERNELS_DETERMINISTIC", False) or torch.are_deterministic_algorithms_enabled()


def _setup_context(ctx, inputs, output):
    q, k, v, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indices, counts)
    ctx.geom = (list(grid_q), list(grid_k), list(chunk_q), list(chunk_k), float(scale))


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, indices, counts = ctx.saved_tensors
    grid_q, grid_k, chunk_q, chunk_k, scale = ctx.geom
    if grad_out is None and grad_lse is None:
        return (None,) * 10
    if grad_out is None:  # a loss through lse alone
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.longcat_kernels.bsa_bwd(
        _last_dim_contig(grad_out), q, k, v, out, lse, indices, counts,
        grid_q, grid_k, chunk_q, chunk_k, scale, _deterministic(),
        None if grad_lse is None else grad_lse.contiguous(),
    )
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("longcat_kernels::bsa_fwd", _backward, setup_context=_setup_context)


def _prep(q, k, v, selection):
    indices = selection.indices
    counts = selection.counts
    if indices.dtype != torch.int32 or not indices.is_contiguous():
        indices = indices.to(torch.int32).contiguous()
    if counts.dtype != torch.int32 or not counts.is_contiguous():
        counts = counts.to(torch.int32).contiguous()
    if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():  # dynamo cannot ask
        # a selection made under torch.inference_mode: autograd cannot save inference tensors for
        # backward (the torch reference takes them), normal copies of the small index tensors can be
        indices = indices.clone() if indices.is_inference() else indices
        counts = counts.clone() if counts.is_inference() else counts
        if needs_grad(q, k, v):
            # the same for q/k/v made there (e.g. keys of a frozen encoder) beside a q that trains: autograd
            # saves all three for the backward, the torch reference saves none of them as given
            q, k, v = (x.clone() if x.is_inference() else x for x in (q, k, v))
    return (_last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v), indices, counts,
            [int(x) for x in selection.grid_q], [int(x) for x in selection.grid_k],
            [int(x) for x in selection.chunk_q], [int(x) for x in selection.chunk_k])


def _pad_head_dim(*xs):
    """The kernels index head_dim with ``tl.arange(0, D)`` (a power of two, >= 16 for ``tl.dot``):
    other sizes are zero-padded, which leaves every dot product, block mean and softmax unchanged
    (the caller passes ``scale`` for the true head_dim and slices the output back). ``F.pad`` is
    differentiable, so gradients flow to the unpadded inputs."""
    D = xs[0].shape[-1]
    pd = triton_tile_size(D)
    if pd == D:
        return xs
    return tuple(torch.nn.functional.pad(x, (0, pd - D)) for x in xs)


def bsa_forward_triton(q, k, v, selection, scale):
    """(out, lse) without autograd. Shapes as in ``bsa_fwd``."""
    D = q.shape[-1]
    qp, kp, vp = _pad_head_dim(q, k, v)
    args = _prep(qp, kp, vp, selection)
    with torch.no_grad():
        out, lse = torch.ops.longcat_kernels.bsa_fwd(*args, float(scale))
    return (out if out.shape[-1] == D else out[..., :D].contiguous()), lse


block_sparse_attn_fwd_triton = bsa_forward_triton


def block_sparse_attn_triton(q, k, v, selection, scale, return_lse=False):
    """Autograd-aware block-sparse attention output [B,Sq,H,D]; with return_lse (out, lse [B,H,Sq]
    fp32), both differentiable. A head_dim the kernels cannot index is zero-padded (``_pad_head_dim``)."""
    D = q.shape[-1]
    qp, kp, vp = _pad_head_dim(q, k, v)
    args = _prep(qp, kp, vp, selection)
    out, lse = torch.ops.longcat_kernels.bsa_fwd(*args, float(scale))
    if out.shape[-1] != D:
        out = out[..., :D].contiguous()
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# gating
# --------------------------------------------------------------------------------------------
# scores tile (BM, BN, num_warps); bench/dev/bench_bsa_gating_gpu.py timed the variants (heads-first pooling
# within noise of blocks-first: bench/results/h100/bsa-gating_20261124_notes.md; removed)
_GATING_CONFIG = {"scores": (64, 64, 4)}


@torch.library.custom_op("longcat_kernels::bsa_pool_scores", mutates_args=())
def bsa_pool_scores(
    q: torch.Tensor, k: torch.Tensor, grid_q: list[int], grid_k: list[int],
    chunk_q: list[int], chunk_k: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-pool q and k per block (fp32 accumulate, input dtype) and score them (fp32).

    Returns pooled_q [B,H,Nq,D], pooled_k [B,H,Nk,D] (input dtype), scores [B,H,Nq,Nk] fp32.
    """
    check_op_kv("bsa_pool_scores", q, [("k", k, "k", k, False)])
    check_op_block_geometry("bsa_pool_scores", q, k.shape[1], grid_q, grid_k, chunk_q, chunk_k)
    _check_tile_head_dim("bsa_pool_scores", q)
    q, k = _last_dim_contig(q), _last_dim_contig(k)  # the kernel indexes head_dim with unit stride
    B, Sq, NH, D = q.shape
    pooled = []
    for x, grid, chunk in ((q, grid_q, chunk_q), (k, grid_k, chunk_k)):
        (nT, nH, nW), pb, even = _geom(grid, chunk)
        N = nT * nH * nW
        p = torch.empty((B, NH, N, D), dtype=x.dtype, device=x.device)
        launcher(K.bsa_pool_kernel, (N, B * NH))(
            x, p, x.stride(0), x.stride(1), x.stride(2), grid[0], grid[1], grid[2], nH, nW, N, NH,
            CT=chunk[0], CH=chunk[1], CW=chunk[2], BLOCK=pb, D=D, EVEN=even, num_warps=4,
        )
        pooled.append(p)
    pq, pk = pooled
    NQ, NKb = pq.shape[2], pk.shape[2]
    scores = torch.empty((B, NH, NQ, NKb), dtype=torch.float32, device=q.device)
    bm, bn, nw = _GATING_CONFIG["scores"]
    launcher(K.bsa_scores_kernel, (triton_cdiv(NQ, bm), triton_cdiv(NKb, bn), B * NH))(
        pq, pk, scores, NQ, NKb, BM=bm, BN=bn, D=D, IEEE=q.dtype == torch.float32, num_warps=nw,
    )
    return pq, pk, scores


@bsa_pool_scores.register_fake
def _bsa_pool_scores_fake(q, k, grid_q, grid_k, chunk_q, chunk_k):
    B, _, NH, D = q.shape
    (nTq, nHq, nWq), _, _ = _geom(grid_q, chunk_q)
    (nTk, nHk, nWk), _, _ = _geom(grid_k, chunk_k)
    nq, nk = nTq * nHq * nWq, nTk * nHk * nWk
    return (q.new_empty((B, NH, nq, D)), k.new_empty((B, NH, nk, D)),
            q.new_empty((B, NH, nq, nk), dtype=torch.float32))


_TOPK_MAX_ROW = 16384
# top-k launch: warps per row of the candidate kernel (H100, 1,320-score rows, n = 82: 1 warp
# 0.248 ms, 2 warps 0.291 ms; bench/dev/bench_bsa_gating_gpu.py) and of the whole-row bisection
# kernel for rows of >= 2048 / fewer scores
_TOPK_WARPS = {"pruned": 1, "bisect": (8, 4)}


def _topk_plan(nk: int, n: int):
    """(G, CAP) of ``bsa_topk_kernel`` for rows of ``nk`` scores, or None for the whole-row
    bisection: G (chunk = number of groups) the power of two >= 3 n, below nk, so few scores pass
    the group-maximum bound; CAP >= 2 n candidate slots, at most half the row."""
    g = max(32, 1 << (3 * n - 1).bit_length())
    cap = max(32, 1 << (2 * n - 1).bit_length())
    if g >= nk or 2 * cap > nk:
        return None
    return g, cap


@torch.library.custom_op("longcat_kernels::bsa_topk", mutates_args=())
def bsa_topk(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [..., n] int32 (ascending) of the n highest of each row of fp32 ``scores [..., Nk]``;
    ties go to the lower index, as a stable descending sort would (-0.0 == +0.0)."""
    if scores.dtype != torch.float32:
        raise TypeError(f"bsa_topk: scores must be float32, got {scores.dtype}")
    if scores.dim() == 0:  # rows of scores, as the fake's shape[:-1] assumes (an IndexError otherwise)
        raise ValueError("bsa_topk: scores: expected [..., Nk] rows of scores, got a 0-dim tensor")
    nk = scores.shape[-1]
    if not 1 <= n <= nk or nk > _TOPK_MAX_ROW:
        raise ValueError(f"bsa_topk: need 1 <= n <= Nk <= {_TOPK_MAX_ROW}, got n={n}, Nk={nk}")
    scores = scores.contiguous()
    rows = scores.numel() // nk
    idx = torch.empty((*scores.shape[:-1], n), dtype=torch.int32, device=scores.device)
    if rows == 0:
        return idx
    plan = _topk_plan(nk, n)
    if plan is not None:
        g, cap = plan
        nw = _TOPK_WARPS["pruned"]
        scratch = torch.empty((rows, cap), dtype=torch.int16, device=scores.device)
        launcher(K.bsa_topk_kernel, (rows,))(scores, idx, scratch, nk, n, G=g, CAP=cap, VEC=4 if nk % 4 == 0 else 1,
                                   LANES=32 * nw, num_warps=nw)
    else:
        block = max(32, 1 << (nk - 1).bit_length())
        nw_big, nw_small = _TOPK_WARPS["bisect"]
        launcher(K.bsa_topk_bisect_kernel, (rows,))(scores, idx, nk, n, BLOCK=block,
                                          num_warps=nw_big if block >= 2048 else nw_small)
    return idx


@bsa_topk.register_fake
def _bsa_topk_fake(scores, n):
    return scores.new_empty((*scores.shape[:-1], n), dtype=torch.int32)


def selection_from_scores(scores: torch.Tensor, head_dim: int, sparsity, cdf_threshold):
    """(indices int32 [B,H,Nq,max_sel], counts int32 [B,H,Nq]) from fp32 block scores.

    top-k keeps ``int((1 - sparsity) * Nk)`` blocks; cdf keeps the blocks whose cumulative
    softmax(score / sqrt(D)) mass, in descending order, is <= threshold; both: the max count.
    No host synchronisation: with a cdf rule ``max_sel`` is Nk.
    """
    B, NH, NQ, NKb = scores.shape
    if cdf_threshold is None:
        n = int((1.0 - float(sparsity)) * NKb)
        if n <= 0:
            idx = torch.full((B, NH, NQ, 1), -1, dtype=torch.int32, device=scores.device)
            return idx, torch.zeros((B, NH, NQ), dtype=torch.int32, device=scores.device)
        if NKb <= _TOPK_MAX_ROW:
            idx = torch.ops.longcat_kernels.bsa_topk(scores, n)
        else:
            # a stable sort, not torch.topk: topk breaks ties in any order, the kernel (and the torch
            # gating) keep the lower block id
            idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n].to(torch.int32)
        return idx, torch.full((B, NH, NQ), n, dtype=torch.int32, device=scores.device)
    from .selection import select_rows

    idx, cnt = select_rows(scores.reshape(B * NH, NQ, NKb), head_dim, sparsity, cdf_threshold, NKb)
    return idx.reshape(B, NH, NQ, NKb), cnt.reshape(B, NH, NQ)


def select_blocks_triton(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold):
    """Gating in Triton (pooling, scores, top-k; cdf rules through torch) -> ``BlockSelection``."""
    from ...grid import total_blocks
    from .selection import BlockSelection, empty_selection, warn_if_keeps_nothing

    grid_q = tuple(int(x) for x in grid_q)
    grid_k = tuple(int(x) for x in grid_k)
    chunk_q = tuple(int(x) for x in chunk_q)
    chunk_k = tuple(int(x) for x in chunk_k)
    nk = total_blocks(grid_k, chunk_k)
    warn_if_keeps_nothing(sparsity, cdf_threshold, nk, grid_k, chunk_k)
    B, _, NH, D = q.shape
    if B * NH == 0:
        max_sel = nk if cdf_threshold is not None else int((1.0 - float(sparsity)) * nk)
        return empty_selection(B, NH, grid_q, grid_k, chunk_q, chunk_k, max_sel, q.device)
    qp, kp = _pad_head_dim(q, k)
    _, _, scores = torch.ops.longcat_kernels.bsa_pool_scores(
        _last_dim_contig(qp), _last_dim_contig(kp), list(grid_q), list(grid_k), list(chunk_q), list(chunk_k)
    )
    indices, counts = selection_from_scores(scores, q.shape[-1], sparsity, cdf_threshold)
    return BlockSelection(indices=indices, counts=counts, grid_q=grid_q, grid_k=grid_k,
                          chunk_q=chunk_q, chunk_k=chunk_k)
