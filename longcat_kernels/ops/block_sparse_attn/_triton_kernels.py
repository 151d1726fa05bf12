"""Triton kernels for block-sparse 3D attention (forward, backward, gating pooling/scores).

Tokens are addressed in-kernel from the 3D block geometry (DESIGN.md, Geometry): a program that
handles block ``blk`` computes, for each slot ``r`` of the block, the token's sequence index and
whether the slot is a real token (partial edge blocks). q/k/v are never permuted into block
order, so any strides work (BSHD views of a fused QKV output included) and ``Tq != Tk`` is free.

Naming (fla style): ``b_*`` tiles, ``p_*`` pointers, ``o_*`` offsets, ``m_*`` masks.
Sequence-dependent integers are excluded from specialisation so a new length does not recompile.
"""

import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _block_rows(blk, r, T, HH, WW, nH, nW, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr):
    """Sequence index and validity of slot ``r`` of block ``blk`` (both int32 tensors/scalars)."""
    bw = blk % nW
    bh = (blk // nW) % nH
    bt = blk // (nW * nH)
    dt = r // (CH * CW)
    dh = (r // CW) % CH
    dw = r % CW
    t = bt * CT + dt
    hh = bh * CH + dh
    ww = bw * CW + dw
    valid = (t < T) & (hh < HH) & (ww < WW) & (r < CT * CH * CW)
    seq = (t * HH + hh) * WW + ww
    return seq, valid


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _selected_key_rows(p_idx, j, n_sel, o_slot, o_rk, Tk, HH, WW, nHk, nWk,
                       CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr, BPI: tl.constexpr):
    """Sequence rows (int64) and mask of the BPI selected key blocks from selection entry j on.

    o_slot / o_rk: [BLOCK_N] block slot and row inside the block of each tile row; slots past
    n_sel are masked. Shared by the forward and the dq kernels (same walk over the selection)."""
    if BPI == 1:
        kb = tl.load(p_idx + j)
        seq_k, m_k = _block_rows(kb, o_rk, Tk, HH, WW, nHk, nWk, CKT, CKH, CKW)
    else:
        m_sel = (j + o_slot) < n_sel
        kb = tl.load(p_idx + j + o_slot, mask=m_sel, other=0)
        seq_k, m_k = _block_rows(kb, o_rk, Tk, HH, WW, nHk, nWk, CKT, CKH, CKW)
        m_k = m_k & m_sel
    return seq_k.to(tl.int64), m_k


@triton.jit(do_not_specialize=["Tq", "Tk", "HH", "WW", "nHq", "nWq", "nHk", "nWk", "NQ", "MAX_SEL"])
def bsa_fwd_kernel(
    q, k, v, o, lse, idx, cnt,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    Tq, Tk, HH, WW, nHq, nWq, nHk, nWk, NQ, MAX_SEL,
    NH, scale_log2,
    CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
    CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
    BLOCK_M: tl.constexpr, KBLK: tl.constexpr, BPI: tl.constexpr, D: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    BLOCK_N: tl.constexpr = KBLK * BPI
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // NH
    i_h = i_bh % NH
    o_d = tl.arange(0, D)
    o_r = tl.arange(0, BLOCK_M)
    seq_q, m_q = _block_rows(i_m, o_r, Tq, HH, WW, nHq, nWq, CQT, CQH, CQW)
    seq_q = seq_q.to(tl.int64)
    p_q = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh + seq_q[:, None] * s_qs + o_d[None, :]
    if EVEN_Q:
        b_q = tl.load(p_q)
    else:
        b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)
    # [BLOCK_M, D]

    row = i_bh.to(tl.int64) * NQ + i_m
    n_sel = tl.load(cnt + row)
    p_idx = idx + row * MAX_SEL
    o_c = tl.arange(0, BLOCK_N)
    o_slot = o_c // KBLK
    o_rk = o_c % KBLK
    k_base = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for j in range(0, n_sel, BPI):
        seq_k, m_k = _selected_key_rows(p_idx, j, n_sel, o_slot, o_rk, Tk, HH, WW, nHk, nWk,
                                        CKT, CKH, CKW, BPI)
        p_k = k_base + seq_k[:, None] * s_ks + o_d[None, :]
        p_v = v_base + seq_k[:, None] * s_vs + o_d[None, :]
        if EVEN_K and BPI == 1:
            b_k = tl.load(p_k)
        else:
            b_k = tl.load(p_k, mask=m_k[:, None], other=0.0)
        # [BLOCK_N, D]
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        # [BLOCK_M, BLOCK_N] in log2 units
        b_s = b_s * scale_log2
        if not (EVEN_K and BPI == 1):
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
        if EVEN_K and BPI == 1:
            b_v = tl.load(p_v)
        else:
            b_v = tl.load(p_v, mask=m_k[:, None], other=0.0)
        if IEEE:
            b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision="ieee")
        else:
            b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc)
        b_m = b_mn

    # a query block with no selected key block: out = 0, lse = -inf (never NaN)
    m_empty = b_l == 0.0
    b_lse = tl.where(m_empty, float("-inf"), (b_m + tl.log2(tl.where(m_empty, 1.0, b_l))) * 0.6931471805599453)
    b_o = b_acc / tl.where(m_empty, 1.0, b_l)[:, None]
    p_o = o + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh + seq_q[:, None] * s_os + o_d[None, :]
    p_lse = lse + i_bh.to(tl.int64) * (Tq * HH * WW) + seq_q
    if EVEN_Q:
        tl.store(p_o, b_o.to(o.dtype.element_ty))
        tl.store(p_lse, b_lse)
    else:
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_q[:, None])
        tl.store(p_lse, b_lse, mask=m_q)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["S"])
def bsa_bwd_preprocess_kernel(
    o, do, delta, s_ob, s_os, s_oh, s_db, s_ds, s_dh, S, NH,
    BLOCK: tl.constexpr, D: tl.constexpr,
):
    """delta[b, h, s] = sum_d o * do (fp32)."""
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // NH
    i_h = i_bh % NH
    o_s = i_s * BLOCK + tl.arange(0, BLOCK)
    m_s = o_s < S
    o_d = tl.arange(0, D)
    o_s64 = o_s.to(tl.int64)
    b_o = tl.load(o + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh + o_s64[:, None] * s_os + o_d[None, :],
                  mask=m_s[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(do + i_b.to(tl.int64) * s_db + i_h.to(tl.int64) * s_dh + o_s64[:, None] * s_ds + o_d[None, :],
                   mask=m_s[:, None], other=0.0).to(tl.float32)
    tl.store(delta + i_bh.to(tl.int64) * S + o_s64, tl.sum(b_o * b_do, 1), mask=m_s)


@triton.jit(do_not_specialize=["Tq", "Tk", "HH", "WW", "nHq", "nWq", "nHk", "nWk", "NK"])
def bsa_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dq, dk, dv, t_off, t_q,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
    s_dqb, s_dqs, s_dqh, s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh,
    Tq, Tk, HH, WW, nHq, nWq, nHk, nWk, NK,
    NH, scale, scale_log2,
    CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
    CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
    BLOCK_M: tl.constexpr, MSUB: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """One program per (key block, batch*head): walks the query blocks that selected it.

    Each query block is consumed in ``MSUB``-row slices (bounds registers). ``TRANSPOSED`` computes
    scores as [keys, queries] so no register tile is transposed (measured faster for 128-token key
    blocks); otherwise as [queries, keys] (measured faster for 64-token blocks).
    """
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // NH
    i_h = i_bh % NH
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, MSUB)
    seq_k, m_k = _block_rows(i_n, o_c, Tk, HH, WW, nHk, nWk, CKT, CKH, CKW)
    seq_k = seq_k.to(tl.int64)
    p_k = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh + seq_k[:, None] * s_ks + o_d[None, :]
    p_v = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh + seq_k[:, None] * s_vs + o_d[None, :]
    if EVEN_K:
        b_k = tl.load(p_k)
        b_v = tl.load(p_v)
    else:
        b_k = tl.load(p_k, mask=m_k[:, None], other=0.0)
        b_v = tl.load(p_v, mask=m_k[:, None], other=0.0)
    # [BLOCK_N, D]
    b_dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)

    Sq = Tq * HH * WW
    q_base = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    do_base = do + i_b.to(tl.int64) * s_db + i_h.to(tl.int64) * s_dh
    dq_base = dq + i_b.to(tl.int64) * s_dqb + i_h.to(tl.int64) * s_dqh
    row_base = i_bh.to(tl.int64) * Sq
    pos = i_bh.to(tl.int64) * NK + i_n
    start = tl.load(t_off + pos)
    end = tl.load(t_off + pos + 1)
    for j in range(start, end):
        qb = tl.load(t_q + j)
        for sub in tl.static_range(BLOCK_M // MSUB):
            seq_q, m_q = _block_rows(qb, sub * MSUB + o_r, Tq, HH, WW, nHq, nWq, CQT, CQH, CQW)
            seq_q = seq_q.to(tl.int64)
            p_q = q_base + seq_q[:, None] * s_qs + o_d[None, :]
            p_do = do_base + seq_q[:, None] * s_ds + o_d[None, :]
            if EVEN_Q:
                b_q = tl.load(p_q)
                b_do = tl.load(p_do)
                b_lse = tl.load(lse + row_base + seq_q)
                b_delta = tl.load(delta + row_base + seq_q)
            else:
                b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)
                b_do = tl.load(p_do, mask=m_q[:, None], other=0.0)
                b_lse = tl.load(lse + row_base + seq_q, mask=m_q, other=0.0)
                b_delta = tl.load(delta + row_base + seq_q, mask=m_q, other=0.0)
            # [MSUB, D], [MSUB]
            if TRANSPOSED:
                if IEEE:
                    b_st = tl.dot(b_k, tl.trans(b_q), input_precision="ieee")
                else:
                    b_st = tl.dot(b_k, tl.trans(b_q))
                # [BLOCK_N, MSUB]
                b_pt = tl.exp2(b_st * scale_log2 - (b_lse * 1.4426950408889634)[None, :])
                if not (EVEN_Q and EVEN_K):
                    b_pt = tl.where(m_k[:, None] & m_q[None, :], b_pt, 0.0)
                if IEEE:
                    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision="ieee")
                    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision="ieee")
                else:
                    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do)
                    b_dpt = tl.dot(b_v, tl.trans(b_do))
                b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(b_q.dtype)
                # [BLOCK_N, MSUB]
                if IEEE:
                    b_dk += tl.dot(b_dst, b_q, input_precision="ieee")
                else:
                    b_dk += tl.dot(b_dst, b_q)
                b_ds = tl.trans(b_dst)
            else:
                if IEEE:
                    b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
                else:
                    b_s = tl.dot(b_q, tl.trans(b_k))
                # [MSUB, BLOCK_N]
                b_p = tl.exp2(b_s * scale_log2 - (b_lse * 1.4426950408889634)[:, None])
                if not (EVEN_Q and EVEN_K):
                    b_p = tl.where(m_q[:, None] & m_k[None, :], b_p, 0.0)
                if IEEE:
                    b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision="ieee")
                    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
                else:
                    b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
                    b_dp = tl.dot(b_do, tl.trans(b_v))
                b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q.dtype)
                # [MSUB, BLOCK_N]
                if IEEE:
                    b_dk += tl.dot(tl.trans(b_ds), b_q, input_precision="ieee")
                else:
                    b_dk += tl.dot(tl.trans(b_ds), b_q)
            if ATOMIC_DQ:
                if IEEE:
                    b_dq = tl.dot(b_ds, b_k, input_precision="ieee") * scale
                else:
                    b_dq = tl.dot(b_ds, b_k) * scale
                p_dq = dq_base + seq_q[:, None] * s_dqs + o_d[None, :]
                if EVEN_Q:
                    tl.atomic_add(p_dq, b_dq, sem="relaxed")
                else:
                    tl.atomic_add(p_dq, b_dq, mask=m_q[:, None], sem="relaxed")

    p_dk = dk + i_b.to(tl.int64) * s_dkb + i_h.to(tl.int64) * s_dkh + seq_k[:, None] * s_dks + o_d[None, :]
    p_dv = dv + i_b.to(tl.int64) * s_dvb + i_h.to(tl.int64) * s_dvh + seq_k[:, None] * s_dvs + o_d[None, :]
    if EVEN_K:
        tl.store(p_dk, (b_dk * scale).to(dk.dtype.element_ty))
        tl.store(p_dv, b_dv.to(dv.dtype.element_ty))
    else:
        tl.store(p_dk, (b_dk * scale).to(dk.dtype.element_ty), mask=m_k[:, None])
        tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_k[:, None])


@triton.jit(do_not_specialize=["Tq", "Tk", "HH", "WW", "nHq", "nWq", "nHk", "nWk", "NQ", "MAX_SEL"])
def bsa_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, idx, cnt,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh, s_dqb, s_dqs, s_dqh,
    Tq, Tk, HH, WW, nHq, nWq, nHk, nWk, NQ, MAX_SEL,
    NH, scale, scale_log2,
    CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
    CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
    BLOCK_M: tl.constexpr, KBLK: tl.constexpr, BPI: tl.constexpr, D: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    """One program per (query block, batch*head): dq over its selected key blocks (no atomics)."""
    BLOCK_N: tl.constexpr = KBLK * BPI
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // NH
    i_h = i_bh % NH
    o_d = tl.arange(0, D)
    o_r = tl.arange(0, BLOCK_M)
    seq_q, m_q = _block_rows(i_m, o_r, Tq, HH, WW, nHq, nWq, CQT, CQH, CQW)
    seq_q = seq_q.to(tl.int64)
    Sq = Tq * HH * WW
    p_q = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh + seq_q[:, None] * s_qs + o_d[None, :]
    p_do = do + i_b.to(tl.int64) * s_db + i_h.to(tl.int64) * s_dh + seq_q[:, None] * s_ds + o_d[None, :]
    row_base = i_bh.to(tl.int64) * Sq
    if EVEN_Q:
        b_q = tl.load(p_q)
        b_do = tl.load(p_do)
        b_lse = tl.load(lse + row_base + seq_q)
        b_delta = tl.load(delta + row_base + seq_q)
    else:
        b_q = tl.load(p_q, mask=m_q[:, None], other=0.0)
        b_do = tl.load(p_do, mask=m_q[:, None], other=0.0)
        b_lse = tl.load(lse + row_base + seq_q, mask=m_q, other=0.0)
        b_delta = tl.load(delta + row_base + seq_q, mask=m_q, other=0.0)
    b_lse2 = b_lse * 1.4426950408889634

    row = i_bh.to(tl.int64) * NQ + i_m
    n_sel = tl.load(cnt + row)
    p_idx = idx + row * MAX_SEL
    o_c = tl.arange(0, BLOCK_N)
    o_slot = o_c // KBLK
    o_rk = o_c % KBLK
    k_base = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    b_dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for j in range(0, n_sel, BPI):
        seq_k, m_k = _selected_key_rows(p_idx, j, n_sel, o_slot, o_rk, Tk, HH, WW, nHk, nWk,
                                        CKT, CKH, CKW, BPI)
        p_k = k_base + seq_k[:, None] * s_ks + o_d[None, :]
        p_v = v_base + seq_k[:, None] * s_vs + o_d[None, :]
        if EVEN_K and BPI == 1:
            b_k = tl.load(p_k)
            b_v = tl.load(p_v)
        else:
            b_k = tl.load(p_k, mask=m_k[:, None], other=0.0)
            b_v = tl.load(p_v, mask=m_k[:, None], other=0.0)
        if IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
            b_dp = tl.dot(b_do, tl.trans(b_v))
        # [BLOCK_M, BLOCK_N]
        b_p = tl.exp2(b_s * scale_log2 - b_lse2[:, None])
        if not (EVEN_Q and EVEN_K and BPI == 1):
            b_p = tl.where(m_q[:, None] & m_k[None, :], b_p, 0.0)
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_k.dtype)
        if IEEE:
            b_dq = tl.dot(b_ds, b_k, b_dq, input_precision="ieee")
        else:
            b_dq = tl.dot(b_ds, b_k, b_dq)
    p_dq = dq + i_b.to(tl.int64) * s_dqb + i_h.to(tl.int64) * s_dqh + seq_q[:, None] * s_dqs + o_d[None, :]
    if EVEN_Q:
        tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty))
    else:
        tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_q[:, None])


# --------------------------------------------------------------------------------------------
# gating
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "HH", "WW", "nH", "nW", "N"])
def bsa_pool_kernel(
    x, out, s_xb, s_xs, s_xh,
    T, HH, WW, nH, nW, N, NH,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    EVEN: tl.constexpr,
):
    """out[b, h, blk, :] = mean over the block's real tokens (fp32 accumulate, stored in out's dtype)."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // NH
    i_h = i_bh % NH
    o_r = tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    seq, m = _block_rows(i_n, o_r, T, HH, WW, nH, nW, CT, CH, CW)
    p_x = x + i_b.to(tl.int64) * s_xb + i_h.to(tl.int64) * s_xh + seq.to(tl.int64)[:, None] * s_xs + o_d[None, :]
    if EVEN:
        b_x = tl.load(p_x).to(tl.float32)
        b_mean = tl.sum(b_x, 0) / (CT * CH * CW)
    else:
        b_x = tl.load(p_x, mask=m[:, None], other=0.0).to(tl.float32)
        b_mean = tl.sum(b_x, 0) / tl.sum(m.to(tl.float32), 0)
    tl.store(out + (i_bh.to(tl.int64) * N + i_n) * D + o_d, b_mean.to(out.dtype.element_ty))


@triton.jit(do_not_specialize=["NQ", "NK"])
def bsa_scores_kernel(
    pq, pk, s, NQ, NK,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
):
    """s[bh, i, j] = pq[bh, i] . pk[bh, j] accumulated in fp32 (pooled tensors contiguous)."""
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_m = o_m < NQ
    m_n = o_n < NK
    b_q = tl.load(pq + (i_bh * NQ + o_m[:, None]) * D + o_d[None, :], mask=m_m[:, None], other=0.0)
    b_k = tl.load(pk + (i_bh * NK + o_n[:, None]) * D + o_d[None, :], mask=m_n[:, None], other=0.0)
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    tl.store(s + (i_bh * NQ + o_m[:, None]) * NK + o_n[None, :], b_s, mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["NK", "N_SEL"])
def bsa_topk_kernel(s, idx, NK, N_SEL, BLOCK: tl.constexpr):
    """Top-``N_SEL`` of one row of fp32 scores, ties to the lower index (= stable descending sort).

    Radix-style bisection on order-preserving uint32 keys finds the N_SEL-th largest key ``t``;
    the row keeps every key > t and the first (in index order) keys == t. Output indices ascending.
    """
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    m = o < NK
    # + 0.0 turns -0.0 into +0.0 (equal scores must get equal keys)
    x = tl.load(s + row * NK + o, mask=m, other=0.0) + 0.0
    u = x.to(tl.uint32, bitcast=True)
    neg = (u >> 31) != 0
    key = tl.where(neg, ~u, u | 0x80000000)
    key = tl.where(m, key, 0)
    t = tl.zeros([], dtype=tl.uint32)
    for i in tl.static_range(32):
        cand = t | (tl.full([], 1, tl.uint32) << (31 - i))
        c = tl.sum((key >= cand).to(tl.int32), 0)
        t = tl.where(c >= N_SEL, cand, t)
    gt = (key > t) & m
    eq = (key == t) & m
    need = N_SEL - tl.sum(gt.to(tl.int32), 0)
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - 1
    sel = gt | (eq & (eq_rank < need))
    pos = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(idx + row * N_SEL + pos, o, mask=sel)
