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
    q, k, v, do, lse, delta, dk, dv, t_off, t_q,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
    s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh,
    Tq, Tk, HH, WW, nHq, nWq, nHk, nWk, NK,
    NH, scale, scale_log2,
    CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
    CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
    BLOCK_M: tl.constexpr, MSUB: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
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
    """out[b, h, blk, :] = mean over the block's real tokens (fp32 accumulate, stored in out's dtype).
    Grid (N, B*H)."""
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


@triton.jit
def _score_keys(x):
    """Order-preserving uint32 keys of fp32 scores (+ 0.0 turns -0.0 into +0.0: equal scores,
    equal keys). Every NaN, whatever its sign and payload, gets the top key 0xFFFFFFFF: first and
    tied, as in torch's descending sort (a sign-bit NaN, x86's inf - inf, keyed below -inf)."""
    u = (x + 0.0).to(tl.uint32, bitcast=True)
    key = tl.where((u >> 31) != 0, ~u, u | 0x80000000)
    # key | 0xFFFFFFFF: the same uint32-literal form as u | 0x80000000 above (compiled by triton 3.6 on the GPU)
    return tl.where(x != x, key | 0xFFFFFFFF, key)


@triton.jit
def _bisect_start(lo, hi):
    """Start of a bisection for a key known to lie in ``[lo, hi]``: ``(t, top)`` with ``t`` the
    common prefix of lo and hi (which the key shares), bits ``top`` and below zero, and ``top``
    the highest bit left to decide (-1: none)."""
    d = lo ^ hi
    # highest differing bit: the exponent of float(d) (rounding up only adds a step); d = 0: none
    top = (d.to(tl.float32).to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127
    top = tl.minimum(tl.maximum(top, -1), 31)
    ones = tl.full([], 0xFFFFFFFF, tl.uint32)
    t = lo & tl.where(top < 0, ones, (ones << tl.maximum(top, 0).to(tl.uint32)) << 1)
    return t, top


@triton.jit
def _nth_key(key, N_SEL, lo, hi, STEPS: tl.constexpr):
    """Largest ``t`` with ``count(key >= t) >= N_SEL`` among the keys that keep the common prefix
    of ``lo`` and ``hi`` and zeros below the first ``STEPS`` bits after it, given that the
    ``N_SEL``-th largest of ``key`` lies in ``[lo, hi]``.

    ``key`` is a uint32 tile of any rank whose padding is 0 (never counted: every candidate tested
    has a set bit). With ``STEPS = 32`` the result is the ``N_SEL``-th largest key; with fewer a
    lower bound of it, exact to 2^-STEPS of the key span hi - lo (so the bound's quality does
    not depend on an offset common to all scores). One whole-tile count per step."""
    t, top = _bisect_start(lo, hi)
    for i in range(0, tl.minimum(top + 1, STEPS)):
        cand = t | (tl.full([], 1, tl.uint32) << (top - i).to(tl.uint32))
        c = tl.sum((key >= cand).to(tl.int32))
        t = tl.where(c >= N_SEL, cand, t)
    return t


@triton.jit
def _store_top(key, o_idx, m, t, N_SEL, p_out):
    """Store, ascending, the indices ``o_idx`` (1D, ascending) of the keys > ``t`` and of the first
    ``N_SEL - count(key > t)`` keys == ``t`` (ties to the lower index)."""
    gt = (key > t) & m
    eq = (key == t) & m
    need = N_SEL - tl.sum(gt.to(tl.int32), 0)
    eq_rank = tl.cumsum(eq.to(tl.int32), 0) - 1
    sel = gt | (eq & (eq_rank < need))
    pos = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(p_out + pos, o_idx, mask=sel)


@triton.jit
def _chunk_keys(p_s, o, NK):
    """Keys of scores ``p_s[o]`` (0 past NK) and the mask of real ones."""
    m = o < NK
    return tl.where(m, _score_keys(tl.load(p_s + o, mask=m, other=0.0)), 0), m


@triton.jit(do_not_specialize=["NK", "N_SEL"])
def bsa_topk_bisect_kernel(s, idx, NK, N_SEL, BLOCK: tl.constexpr):
    """Top-``N_SEL`` of one row of fp32 scores, ties to the lower index (= stable descending sort).

    Bisection on order-preserving uint32 keys over the whole row finds the N_SEL-th largest key
    ``t``; the row keeps every key > t and the first (in index order) keys == t. Output indices
    ascending. Used when ``N_SEL`` is too large a share of the row for ``bsa_topk_kernel``.
    """
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    key, m = _chunk_keys(s + row * NK, o, NK)
    lo = tl.min(tl.where(m, key, tl.full([], 0xFFFFFFFF, tl.uint32)), 0)
    t = _nth_key(key, N_SEL, lo, tl.max(key, 0), 32)
    _store_top(key, o, m, t, N_SEL, idx + row * N_SEL)


@triton.jit(do_not_specialize=["NK", "N_SEL"])
def bsa_topk_kernel(
    s, idx, scratch, NK, N_SEL,
    G: tl.constexpr, CAP: tl.constexpr, VEC: tl.constexpr, LANES: tl.constexpr,
):
    """Top-``N_SEL`` of one row of fp32 scores, as ``bsa_topk_bisect_kernel`` (same result), with
    the long bisection run on a short list of candidates instead of the whole row.

    The row is read in chunks of G scores (G < NK); group g = {g, g+G, g+2G, ...}.
    1. The N_SEL-th largest group maximum is <= the N_SEL-th largest score (N_SEL distinct groups
       reach it; needs N_SEL <= G), so ``lo`` = that maximum, found to 12 bits below the group
       maxima's common prefix (rounded down), is a lower bound of the threshold: every selected
       score is >= lo.
    2. The scores >= lo (a little more than N_SEL for G >= 3 N_SEL on unstructured rows) are
       compacted in index order, as int16 indices, into this row's ``CAP`` scratch slots.
    3. Bisection over those <= CAP candidates gives the exact threshold; ties and output as in the
       bisect kernel. A row with more than CAP candidates (e.g. many equal scores) runs the
       bisection over the whole row instead, chunk by chunk, so the result never depends on the
       data. ``VEC`` (1 or 4) divides NK (aligned, vectorised chunk loads); LANES = 32 * num_warps
       <= 128.
    """
    row = tl.program_id(0).to(tl.int64)
    NK = (NK // VEC) * VEC
    p_s = s + row * NK
    o_g = tl.arange(0, G)
    n_chunks = tl.cdiv(NK, G)
    gmax = tl.zeros([G], dtype=tl.uint32)
    for j in range(0, n_chunks):
        key, m = _chunk_keys(p_s, j * G + o_g, NK)
        gmax = tl.maximum(gmax, key)
    hi = tl.max(gmax, 0)
    # every group holds a real score (G < NK), so min(gmax) <= the N_SEL-th largest maximum
    lo = _nth_key(gmax, N_SEL, tl.min(gmax, 0), hi, 12)

    # compaction, four LANES-score slices per step: one score per thread (the scan and the
    # scattered store share one layout); the four slices' flags are packed in 8-bit fields so one
    # scan and one sum serve them all (a field counts at most LANES <= 128)
    p_scr = scratch + row * CAP
    o_w = tl.arange(0, LANES)
    n_cand = tl.zeros([], dtype=tl.int32)
    for j in range(0, tl.cdiv(NK, 4 * LANES)):
        o0 = j * (4 * LANES) + o_w
        k0, m0 = _chunk_keys(p_s, o0, NK)
        k1, m1 = _chunk_keys(p_s, o0 + LANES, NK)
        k2, m2 = _chunk_keys(p_s, o0 + 2 * LANES, NK)
        k3, m3 = _chunk_keys(p_s, o0 + 3 * LANES, NK)
        c0 = (k0 >= lo) & m0
        c1 = (k1 >= lo) & m1
        c2 = (k2 >= lo) & m2
        c3 = (k3 >= lo) & m3
        packed = c0.to(tl.int32) | (c1.to(tl.int32) << 8) | (c2.to(tl.int32) << 16) | (c3.to(tl.int32) << 24)
        scan = tl.cumsum(packed, 0)
        tot = tl.sum(packed, 0)
        # exclusive start of each slice
        b1 = n_cand + (tot & 0xFF)
        b2 = b1 + ((tot >> 8) & 0xFF)
        b3 = b2 + ((tot >> 16) & 0xFF)
        pos = n_cand + (scan & 0xFF) - 1
        tl.store(p_scr + pos, o0.to(tl.int16), mask=c0 & (pos < CAP))
        pos = b1 + ((scan >> 8) & 0xFF) - 1
        tl.store(p_scr + pos, (o0 + LANES).to(tl.int16), mask=c1 & (pos < CAP))
        pos = b2 + ((scan >> 16) & 0xFF) - 1
        tl.store(p_scr + pos, (o0 + 2 * LANES).to(tl.int16), mask=c2 & (pos < CAP))
        pos = b3 + ((scan >> 24) & 0xFF) - 1
        tl.store(p_scr + pos, (o0 + 3 * LANES).to(tl.int16), mask=c3 & (pos < CAP))
        n_cand = b3 + ((tot >> 24) & 0xFF)
    p_out = idx + row * N_SEL
    if n_cand <= CAP:
        tl.debug_barrier()
        o_c = tl.arange(0, CAP)
        m_c = o_c < n_cand
        b_i = tl.load(p_scr + o_c, mask=m_c, other=0).to(tl.int32)
        b_key = tl.where(m_c, _score_keys(tl.load(p_s + b_i, mask=m_c, other=0.0)), 0)
        # [CAP]
        t = _nth_key(b_key, N_SEL, lo, hi, 32)
        _store_top(b_key, b_i, m_c, t, N_SEL, p_out)
    else:
        # whole-row bisection, chunk by chunk
        t, top = _bisect_start(lo, hi)
        for i in range(0, top + 1):
            cand_t = t | (tl.full([], 1, tl.uint32) << (top - i).to(tl.uint32))
            c = tl.zeros([], dtype=tl.int32)
            for j in range(0, n_chunks):
                key, m = _chunk_keys(p_s, j * G + o_g, NK)
                c += tl.sum((key >= cand_t).to(tl.int32), 0)
            t = tl.where(c >= N_SEL, cand_t, t)
        n_gt = tl.zeros([], dtype=tl.int32)
        for j in range(0, n_chunks):
            key, m = _chunk_keys(p_s, j * G + o_g, NK)
            n_gt += tl.sum(((key > t) & m).to(tl.int32), 0)
        need = N_SEL - n_gt
        n_eq = tl.zeros([], dtype=tl.int32)
        n_sel = tl.zeros([], dtype=tl.int32)
        for j in range(0, n_chunks):
            o = j * G + o_g
            key, m = _chunk_keys(p_s, o, NK)
            eq = (key == t) & m
            sel = ((key > t) & m) | (eq & (n_eq + tl.cumsum(eq.to(tl.int32), 0) - 1 < need))
            tl.store(p_out + n_sel + tl.cumsum(sel.to(tl.int32), 0) - 1, o, mask=sel)
            n_eq += tl.sum(eq.to(tl.int32), 0)
            n_sel += tl.sum(sel.to(tl.int32), 0)
