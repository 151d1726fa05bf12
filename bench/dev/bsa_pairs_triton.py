"""Experimental Triton BSA forward over pairs of neighbouring query blocks (lost; not in the product).

Measured on the H200 (2026-12-03, bench/dev/bsa_pairs_gpu_dev.py, bench/results/h200/
bsa-pairs_20261203_5004d75.json), 24x44x80, 4x4x4, B1 H32 D128 bf16: the best pair kernel
(``split``) takes 25.0 ms on video-like inputs at 0.9375 (pair_load_ratio 0.67) and 30.1 ms on
random ones, vs 20.6 / 21.0 ms for the dispatched Triton forward (and 19.2 for csrc sm90_ws); at
0.875 50.0 / 58.4 vs 41.1 / 41.5. Fewer loads did not pay for the larger, branchier program. It
moved from ``longcat_kernels/ops/block_sparse_attn/triton_pairs.py`` to here (its CPU parity test
went with it: run this file's kernel through the dev script).

Why: at sparsity 0.9375 the forward is bound by gathering the selected K/V blocks (issue 18: about
14 ms of K/V gathers out of 20 at 24x44x80). On video, neighbouring query blocks select mostly the
same key blocks (``testing.inputs.selection_overlap``), so one program that serves two query
blocks and loads each key block of the *union* of their selections once moves fewer bytes:
``|S_a | S_b|`` key-block loads instead of ``|S_a| + |S_b|``. Two variants:

- ``split`` (default): the two query blocks keep their own tiles and softmax states; each union
  key block is loaded once and multiplied only against the block(s) that selected it (uniform
  branches on a 2-bit mask). Matmul work equals the per-block kernel's; only loads shrink.
- ``masked``: one ``2 BM``-row tile against every union block, scores masked per half: fewer,
  larger matmuls, and more work (``2 |S_a | S_b|`` block products instead of ``|S_a| + |S_b|``).

Random inputs (independent selections) have little overlap: expect no gain there.

Pairing: query blocks ``(bt, bh, 2i)`` and ``(bt, bh, 2i + 1)`` (neighbours along w in the same
row; an odd row length leaves the last block of a row alone). ``pair_union`` builds, on the
device and without host synchronisation, each pair's sorted union of key blocks with a 2-bit
mask (bit 0: the first block selected it, bit 1: the second). ``bsa_forward_pairs`` then runs
one program per (pair, batch*head) with an online softmax over the union. Output and lse are
those of the per-block forward (same math; key blocks visited in ascending id order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from longcat_kernels.ops.block_sparse_attn._triton_kernels import _block_rows
from longcat_kernels.ops.block_sparse_attn.triton import _geom, _interpreting, _last_dim_contig, _launch, _LOG2E

__all__ = ["PairUnion", "pair_union", "bsa_forward_pairs", "PAIRS_CONFIG"]

# (num_warps, num_stages) keyed by padded key-block size; untuned first guesses (bench script
# bench/dev/bsa_pairs_gpu_dev.py sweeps them).
PAIRS_CONFIG = {64: (8, 2), 128: (8, 2)}


@dataclass
class PairUnion:
    """Per (batch, head, pair): sorted union of key blocks of the pair's two query blocks.

    Attributes:
        indices (Tensor): ``[B, H, P, U]`` int32 key-block ids, ascending; past ``counts`` unused.
        bits (Tensor): ``[B, H, P, U]`` int32, bit 0 = selected by the first query block, bit 1 =
            by the second.
        counts (Tensor): ``[B, H, P]`` int32 union sizes.
        pairs_per_row (int): ``ceil(nW / 2)`` (pair p: row ``p // pairs_per_row``).
    """

    indices: torch.Tensor
    bits: torch.Tensor
    counts: torch.Tensor
    pairs_per_row: int


def pair_blocks(nblocks: Tuple[int, int, int], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and second query block of each pair (``[P]`` int64; second = -1 when alone)."""
    nT, nH, nW = nblocks
    npw = (nW + 1) // 2
    p = torch.arange(nT * nH * npw, device=device)
    row, pw = p // npw, p % npw
    a = row * nW + 2 * pw
    b = torch.where(2 * pw + 1 < nW, a + 1, torch.full_like(a, -1))
    return a, b


def pair_union(selection) -> PairUnion:
    """``PairUnion`` of a ``BlockSelection`` (torch ops on the selection's device; no host sync)."""
    idx, cnt = selection.indices, selection.counts
    B, H, Nq, M = idx.shape
    (nT, nH, nW), _, _ = _geom(selection.grid_q, selection.chunk_q)
    (nTk, nHk, nWk), _, _ = _geom(selection.grid_k, selection.chunk_k)
    Nk = nTk * nHk * nWk
    dev = idx.device
    a, b = pair_blocks((nT, nH, nW), dev)
    valid = torch.arange(M, device=dev) < cnt[..., None].long()
    ids = torch.where(valid, idx.long(), torch.full_like(idx, Nk, dtype=torch.long))  # sentinel Nk
    ia = ids[:, :, a]
    ib = torch.where((b >= 0)[:, None], ids[:, :, b.clamp(min=0)], torch.full_like(ia, Nk))
    # key = 2*block + source; sorted, equal blocks become adjacent (first from a, then from b)
    key, _ = torch.cat([ia * 2, ib * 2 + 1], dim=-1).sort(dim=-1)
    val, bit = key >> 1, 1 << (key & 1)
    same_next = val[..., 1:] == val[..., :-1]
    pad = torch.zeros_like(val[..., :1], dtype=torch.bool)
    first = ~torch.cat([pad, same_next], -1) & (val < Nk)
    next_bit = torch.cat([bit[..., 1:], torch.zeros_like(bit[..., :1])], -1)
    comb = bit + torch.where(torch.cat([same_next, pad], -1), next_bit, 0)  # 3 when both selected it
    packed, _ = torch.where(first, val * 4 + comb, torch.full_like(val, Nk * 4)).sort(dim=-1)
    return PairUnion(
        indices=(packed >> 2).to(torch.int32).contiguous(),
        bits=(packed & 3).to(torch.int32).contiguous(),
        counts=first.sum(-1).to(torch.int32).contiguous(),
        pairs_per_row=(nW + 1) // 2,
    )


@triton.jit(do_not_specialize=["Tq", "Tk", "HH", "WW", "nHq", "nWq", "nHk", "nWk", "NP", "NPW", "U"])
def bsa_fwd_pairs_kernel(
    q, k, v, o, lse, uidx, ubits, ucnt,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    Tq, Tk, HH, WW, nHq, nWq, nHk, nWk, NP, NPW, U,
    NH, scale_log2,
    CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
    CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
    BM: tl.constexpr, KBLK: tl.constexpr, D: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // NH
    i_h = i_bh % NH
    # the pair's two query blocks: rows [0, BM) of block a, rows [BM, 2 BM) of block b
    row = i_p // NPW
    pw = i_p % NPW
    blk_a = row * nWq + 2 * pw
    has_b = 2 * pw + 1 < nWq
    o_r = tl.arange(0, 2 * BM)
    second = o_r >= BM
    o_rr = tl.where(second, o_r - BM, o_r)
    blk = tl.where(second, blk_a + 1, blk_a)
    seq_q, m_q = _block_rows(blk, o_rr, Tq, HH, WW, nHq, nWq, CQT, CQH, CQW)
    m_q = m_q & (o_r < tl.where(has_b, 2 * BM, BM))  # a lone last block of a row: no second half
    seq_q = tl.where(m_q, seq_q, 0).to(tl.int64)
    o_d = tl.arange(0, D)
    p_q = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh + seq_q[:, None] * s_qs + o_d[None, :]
    b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)
    # [2 BM, D]

    prow = i_bh.to(tl.int64) * NP + i_p
    n_u = tl.load(ucnt + prow)
    p_idx = uidx + prow * U
    p_bits = ubits + prow * U
    o_c = tl.arange(0, KBLK)
    k_base = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh

    b_m = tl.full([2 * BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([2 * BM], dtype=tl.float32)
    b_acc = tl.zeros([2 * BM, D], dtype=tl.float32)
    for j in range(0, n_u):
        kb = tl.load(p_idx + j)
        bits = tl.load(p_bits + j)
        seq_k, m_k = _block_rows(kb, o_c, Tk, HH, WW, nHk, nWk, CKT, CKH, CKW)
        seq_k = seq_k.to(tl.int64)
        p_k = k_base + seq_k[:, None] * s_ks + o_d[None, :]
        p_v = v_base + seq_k[:, None] * s_vs + o_d[None, :]
        if EVEN_K:
            b_k = tl.load(p_k)
        else:
            b_k = tl.load(p_k, mask=m_k[:, None], other=0.0)
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        # [2 BM, KBLK]: each half sees only the key blocks its own query block selected
        allow = tl.where(second, (bits & 2) != 0, (bits & 1) != 0)
        b_s = tl.where(allow[:, None] & m_k[None, :], b_s * scale_log2, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        # rows that have seen nothing yet keep max -inf: subtract 0 there (no inf - inf)
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_p = tl.exp2(b_s - b_ms[:, None])
        b_alpha = tl.exp2(b_m - b_ms)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
        if EVEN_K:
            b_v = tl.load(p_v)
        else:
            b_v = tl.load(p_v, mask=m_k[:, None], other=0.0)
        if IEEE:
            b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision="ieee")
        else:
            b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc)
        b_m = b_mn

    m_empty = b_l == 0.0
    b_lse = tl.where(m_empty, float("-inf"), (b_m + tl.log2(tl.where(m_empty, 1.0, b_l))) * 0.6931471805599453)
    b_o = b_acc / tl.where(m_empty, 1.0, b_l)[:, None]
    p_o = o + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh + seq_q[:, None] * s_os + o_d[None, :]
    p_lse = lse + i_bh.to(tl.int64) * (Tq * HH * WW) + seq_q
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_q[:, None])
    tl.store(p_lse, b_lse, mask=m_q)


@triton.jit
def _attend_block(b_q, b_k, b_v, m_k, b_m, b_l, b_acc, scale_log2, IEEE: tl.constexpr):
    """Online-softmax update of one query tile by one key block (masked key rows -> -inf)."""
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    b_s = tl.where(m_k[None, :], b_s * scale_log2, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_p = tl.exp2(b_s - b_ms[:, None])
    b_alpha = tl.exp2(b_m - b_ms)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None]
    if IEEE:
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision="ieee")
    else:
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc)
    return b_mn, b_l, b_acc


@triton.jit
def _store_rows(o, lse, b_acc, b_m, b_l, seq_q, m_q, i_b, i_h, i_bh, s_ob, s_os, s_oh, S_Q, o_d):
    m_empty = b_l == 0.0
    b_lse = tl.where(m_empty, float("-inf"), (b_m + tl.log2(tl.where(m_empty, 1.0, b_l))) * 0.6931471805599453)
    b_o = b_acc / tl.where(m_empty, 1.0, b_l)[:, None]
    p_o = o + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh + seq_q[:, None] * s_os + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_q[:, None])
    tl.store(lse + i_bh.to(tl.int64) * S_Q + seq_q, b_lse, mask=m_q)


@triton.jit(do_not_specialize=["Tq", "Tk", "HH", "WW", "nHq", "nWq", "nHk", "nWk", "NP", "NPW", "U"])
def bsa_fwd_pairs_split_kernel(
    q, k, v, o, lse, uidx, ubits, ucnt,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    Tq, Tk, HH, WW, nHq, nWq, nHk, nWk, NP, NPW, U,
    NH, scale_log2,
    CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
    CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
    BM: tl.constexpr, KBLK: tl.constexpr, D: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    """Like ``bsa_fwd_pairs_kernel`` but the two query blocks keep separate ``BM``-row tiles and
    softmax states: each key block of the union is loaded once and multiplied only against the
    query block(s) that selected it (uniform branches on its 2-bit mask), so the matmul work is
    that of the per-block kernel and only the K/V loads shrink."""
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // NH
    i_h = i_bh % NH
    row = i_p // NPW
    pw = i_p % NPW
    blk_a = row * nWq + 2 * pw
    has_b = 2 * pw + 1 < nWq
    o_r = tl.arange(0, BM)
    o_d = tl.arange(0, D)
    seq_a, m_a = _block_rows(blk_a, o_r, Tq, HH, WW, nHq, nWq, CQT, CQH, CQW)
    seq_b, m_b = _block_rows(blk_a + 1, o_r, Tq, HH, WW, nHq, nWq, CQT, CQH, CQW)
    m_b = m_b & (o_r < tl.where(has_b, BM, 0))  # a lone last block of a row: no second block
    seq_a = tl.where(m_a, seq_a, 0).to(tl.int64)
    seq_b = tl.where(m_b, seq_b, 0).to(tl.int64)
    q_base = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    b_qa = tl.load(q_base + seq_a[:, None] * s_qs + o_d[None, :], mask=m_a[:, None], other=0.0)
    b_qb = tl.load(q_base + seq_b[:, None] * s_qs + o_d[None, :], mask=m_b[:, None], other=0.0)

    prow = i_bh.to(tl.int64) * NP + i_p
    n_u = tl.load(ucnt + prow)
    p_idx = uidx + prow * U
    p_bits = ubits + prow * U
    o_c = tl.arange(0, KBLK)
    k_base = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh

    b_ma = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_la = tl.zeros([BM], dtype=tl.float32)
    b_acca = tl.zeros([BM, D], dtype=tl.float32)
    b_mb = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_lb = tl.zeros([BM], dtype=tl.float32)
    b_accb = tl.zeros([BM, D], dtype=tl.float32)
    for j in range(0, n_u):
        kb = tl.load(p_idx + j)
        bits = tl.load(p_bits + j)
        seq_k, m_k = _block_rows(kb, o_c, Tk, HH, WW, nHk, nWk, CKT, CKH, CKW)
        seq_k = seq_k.to(tl.int64)
        if EVEN_K:
            b_k = tl.load(k_base + seq_k[:, None] * s_ks + o_d[None, :])
            b_v = tl.load(v_base + seq_k[:, None] * s_vs + o_d[None, :])
        else:
            b_k = tl.load(k_base + seq_k[:, None] * s_ks + o_d[None, :], mask=m_k[:, None], other=0.0)
            b_v = tl.load(v_base + seq_k[:, None] * s_vs + o_d[None, :], mask=m_k[:, None], other=0.0)
        if (bits & 1) != 0:
            b_ma, b_la, b_acca = _attend_block(b_qa, b_k, b_v, m_k, b_ma, b_la, b_acca, scale_log2, IEEE)
        if (bits & 2) != 0:
            b_mb, b_lb, b_accb = _attend_block(b_qb, b_k, b_v, m_k, b_mb, b_lb, b_accb, scale_log2, IEEE)

    S_Q = Tq * HH * WW
    _store_rows(o, lse, b_acca, b_ma, b_la, seq_a, m_a, i_b, i_h, i_bh, s_ob, s_os, s_oh, S_Q, o_d)
    _store_rows(o, lse, b_accb, b_mb, b_lb, seq_b, m_b, i_b, i_h, i_bh, s_ob, s_os, s_oh, S_Q, o_d)


def bsa_forward_pairs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection, scale: Optional[float] = None, *,
    union: Optional[PairUnion] = None, variant: str = "split", num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward, one program per pair of query blocks: ``(out [B,Sq,H,D], lse [B,H,Sq] fp32)``.

    Same contract as ``block_sparse_attn_fwd_triton`` (inputs validated by the caller: BSHD,
    same dtype and device, a ``BlockSelection`` of these grids). ``union``: a ``pair_union`` of
    ``selection`` computed ahead (reuse across calls with the same selection); default computed
    here. ``variant``: ``"split"`` (two query tiles, each multiplied only by the key blocks its
    block selected: per-block matmul work, union loads) or ``"masked"`` (one ``2 BM``-row tile,
    every union block against both, masked: fewer, larger matmuls). ``num_warps`` /
    ``num_stages``: launch overrides (default ``PAIRS_CONFIG``).
    """
    if variant not in ("split", "masked"):
        raise ValueError(f"variant: expected 'split' or 'masked', got {variant!r}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q, k, v: expected [B,Sq,H,D], [B,Sk,H,D] x2, got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    B, Sq, NH, D = q.shape
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"q: head_dim must be a power of two in [16, 256], got {D}")
    scale = D ** -0.5 if scale is None else float(scale)
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    gq, gk = [int(x) for x in selection.grid_q], [int(x) for x in selection.grid_k]
    cq, ck = [int(x) for x in selection.chunk_q], [int(x) for x in selection.chunk_k]
    (nTq, nHq, nWq), bm, _ = _geom(gq, cq)
    (nTk, nHk, nWk), bn, even_k = _geom(gk, ck)
    if union is None:
        union = pair_union(selection)
    NP = nTq * nHq * union.pairs_per_row
    if tuple(union.counts.shape) != (B, NH, NP):
        raise ValueError(f"union.counts: expected shape {(B, NH, NP)}, got {tuple(union.counts.shape)}")
    out = torch.empty((B, Sq, NH, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, NH, Sq), dtype=torch.float32, device=q.device)
    if _interpreting():
        nw, ns = 4, 1
    else:
        nw, ns = PAIRS_CONFIG.get(bn, (8, 2))
    nw = nw if num_warps is None else int(num_warps)
    ns = ns if num_stages is None else int(num_stages)
    kernel = bsa_fwd_pairs_split_kernel if variant == "split" else bsa_fwd_pairs_kernel
    _launch(kernel, (NP, B * NH),
        q, k, v, out, lse, union.indices, union.bits, union.counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        gq[0], gk[0], gq[1], gq[2], nHq, nWq, nHk, nWk, NP, union.pairs_per_row, union.indices.shape[-1],
        NH, scale * _LOG2E,
        CQT=cq[0], CQH=cq[1], CQW=cq[2], CKT=ck[0], CKH=ck[1], CKW=ck[2],
        BM=bm, KBLK=bn, D=D, EVEN_K=even_k, IEEE=q.dtype == torch.float32,
        num_warps=nw, num_stages=ns,
    )
    return out, lse
