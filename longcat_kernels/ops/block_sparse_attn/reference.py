"""Block-sparse attention, torch reference (SPEC 3 step 3, with autograd).

Each query token attends, with an ordinary softmax, to exactly the tokens of its block's selected
key blocks. Instead of a dense ``[Sq, Sk]`` mask this gathers, per group of query blocks, the key
and value tokens of the selected blocks (``[B, H, G, max_sel*block, D]``) and masks padding slots
and unselected entries, so memory stays bounded at 84k tokens. Matmuls run in bf16 for bf16 inputs on
CUDA, else in fp32 (fp16 scores would overflow past 65504), softmax statistics in fp32.
Differentiable w.r.t. q, k and v through plain torch ops, out and lse alike (the selection has no
gradient). Imports no triton.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.utils.checkpoint

from ..._validate import compiling, has_values, needs_grad
from ...grid import block_token_index, token_to_slot
from .selection import BlockSelection, exact_matmul

__all__ = ["block_sparse_attn_reference"]

# bytes of temporaries per query-block group on CPU (tests lower it to exercise grouping)
CPU_BUDGET_BYTES = 1 << 27


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Matmul dtype of the reference: bf16 on CUDA for bf16 inputs, else at least fp32.

    fp16 computes in fp32 on CUDA too: fp16 scores overflow to inf past 65504 (|q.k| before the scale,
    e.g. entries ~30 at head_dim 128), which made every such row NaN on the reference while the kernels,
    accumulating and keeping scores in fp32, gave the right answer."""
    if x.dtype in (torch.float32, torch.float64):
        return x.dtype
    return x.dtype if x.is_cuda and x.dtype == torch.bfloat16 else torch.float32


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def block_sparse_attn_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: BlockSelection, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention over ``selection``; inputs already validated.

    Args:
        q (Tensor): ``[B, Sq, H, D]``; k, v (Tensor): ``[B, Sk, H, D]``; any strides.
        selection (BlockSelection): over ``(grid_q, chunk_q)`` x ``(grid_k, chunk_k)``.
        scale (float): softmax scale.

    Returns:
        (out ``[B, Sq, H, D]`` q.dtype contiguous, lse ``[B, H, Sq]`` fp32 natural log; a query
        token with no selected key block gives out = 0 and lse = -inf).
    """
    B, Sq, H, D = q.shape
    dev = q.device
    cd, sd = compute_dtype(q), stats_dtype(q)
    tq = block_token_index(selection.grid_q, selection.chunk_q, dev)  # [Nq, bq]
    tk = block_token_index(selection.grid_k, selection.chunk_k, dev)  # [Nk, bk]
    Nq, bq = tq.shape
    bk = tk.shape[1]
    counts = selection.counts.to(device=dev, dtype=torch.long)  # [B, H, Nq]
    # the widest row bounds the gathered keys; a meta/fake selection (shapes only) takes the full width,
    # and so does a traced call (a width read from the counts is data-dependent: torch.compile with
    # dynamic shapes cannot size the query-block groups below from it)
    w = (0 if not counts.numel() else int(counts.max().item()) if has_values(counts) and not compiling()
         else selection.indices.shape[-1])
    # w >= 1 keeps one (fully masked) slot so empty selections flow through the same graph
    w = max(1, min(w, selection.indices.shape[-1]))
    idx = selection.indices[..., :w].to(device=dev, dtype=torch.long)  # [B, H, Nq, w]
    if idx.shape[-1] < w:  # a selection of width 0 (every count 0): the one masked slot
        idx = torch.zeros((B, H, Nq, w), dtype=torch.long, device=dev)
    sel_valid = torch.arange(w, device=dev) < counts[..., None]  # [B, H, Nq, w]
    L = w * bk

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D] views
    b_i = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h_i = torch.arange(H, device=dev).view(1, H, 1, 1)

    def group(qt, kt, vt, n0: int, n1: int):
        """Attention of query blocks [n0, n1) -> (out [B, H, g*bq, D], lse [B, H, g*bq])."""
        g = n1 - n0
        qtok = tq[n0:n1].reshape(-1).clamp(min=0)  # padding slots compute garbage, dropped below
        qb = qt[:, :, qtok].view(B, H, g, bq, D)
        # padding query slots gather token 0 too: zero them (through torch.where, whose backward
        # gives the masked branch a zero gradient), or their dS, NaN wherever the block attends a
        # NaN value (0 * NaN in dO @ v^T), would reach dq of token 0 through the gather
        q_ok = (tq[n0:n1] >= 0).view(1, 1, g, bq, 1)
        qb = torch.where(q_ok, qb, torch.zeros((), dtype=qb.dtype, device=dev))
        # slots past a row's count are ignored whatever they hold (BlockSelection promises -1 there,
        # a hand-built one may carry any id: the kernels never read them): gather block 0, masked
        sel = torch.where(sel_valid[:, :, n0:n1], idx[:, :, n0:n1], 0).clamp(min=0)  # [B, H, g, w]
        ktok = tk[sel]  # [B, H, g, w, bk]
        kvalid = (ktok >= 0) & sel_valid[:, :, n0:n1, :, None]
        ktok = ktok.clamp(min=0).reshape(B, H, g, L)  # any layout of selection.indices
        kb = kt[b_i, h_i, ktok]  # [B, H, g, L, D]
        vb = vt[b_i, h_i, ktok]
        # padding and unselected slots gather token 0 (clamped): zero them, or a NaN/Inf there would
        # leak into every query block through 0 * NaN (p @ v forward, ds @ k backward)
        kv_ok = kvalid.reshape(B, H, g, L, 1)
        kb = torch.where(kv_ok, kb, torch.zeros((), dtype=kb.dtype, device=dev))
        vb = torch.where(kv_ok, vb, torch.zeros((), dtype=vb.dtype, device=dev))
        # an fp32 reference stays fp32 (no TF32 on GPU, no bf16 under torch.autocast), in backward too
        s = exact_matmul(qb.to(cd), kb.to(cd).transpose(-1, -2)).to(sd) * scale  # [B, H, g, bq, L]
        s = s.masked_fill(~kvalid.reshape(B, H, g, 1, L), float("-inf"))
        m = s.amax(dim=-1, keepdim=True).detach()
        # a max of -inf: no selected key (out 0, lse -inf), unless the row has selected keys whose
        # scores are all -inf (non-finite inputs): 0/0 there, NaN as in the kernels, never hidden; a max of
        # +inf (an Inf input) is NaN too: taken as 0 it gave lse = log(inf) = +inf where the kernels give NaN
        attends = kvalid.reshape(B, H, g, 1, L).any(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m,
                        torch.where(~attends & (m == float("-inf")), 0.0, float("nan")).to(m.dtype))
        p = torch.exp(s - m)
        den = p.sum(dim=-1, keepdim=True)
        safe = torch.where(den == 0, torch.ones_like(den), den)  # a NaN den stays NaN (no 1 in its place)
        p = p / safe
        o = exact_matmul(p.to(cd), vb.to(cd))  # [B, H, g, bq, D]
        # differentiable (d lse / d s = p, m being detached): a loss that uses lse (merging partial
        # results, SPEC 12) gets its gradient; log(1) where nothing is selected keeps that branch finite
        lse = torch.where(den == 0, float("-inf"), m + torch.log(safe))
        lse = lse.squeeze(-1)  # -inf where nothing is selected
        return o.reshape(B, H, g * bq, D), lse.reshape(B, H, g * bq)

    # query blocks per step: scores + softmax temporaries [B,H,G,bq,L] and gathered K/V [B,H,G,L,D]
    if q.is_cuda:
        free, _ = torch.cuda.mem_get_info(dev)
        budget = min(max(free // 8, 1 << 28), 1 << 32)
    else:
        budget = CPU_BUDGET_BYTES
    per_block = B * H * L * (bq * 4 * 4 + 2 * D * torch.finfo(cd).bits // 8 + 16) + 1
    G = max(1, min(Nq, budget // per_block))
    # under autograd, recompute each group in backward instead of keeping every group's scores
    ckpt = needs_grad(q, k, v) and G < Nq

    outs, lses = [], []
    for n0 in range(0, Nq, G):
        n1 = min(Nq, n0 + G)
        if ckpt:
            o, lse = torch.utils.checkpoint.checkpoint(group, qt, kt, vt, n0, n1, use_reentrant=False)
        else:
            o, lse = group(qt, kt, vt, n0, n1)
        outs.append(o)
        lses.append(lse)
    slot = token_to_slot(selection.grid_q, selection.chunk_q, dev)  # [Sq]
    out = torch.cat(outs, dim=2)[:, :, slot]  # [B, H, Sq, D]
    lse = torch.cat(lses, dim=2)[:, :, slot]
    out = out.transpose(1, 2).to(q.dtype).contiguous()
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    return out, lse
