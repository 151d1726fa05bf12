"""Triton cached-KV attention (SPEC 4): two key/value segments, no concat, no repeat.

One flash-attention forward kernel, `kv_cache_attn_fwd_kernel`, reads keys/values from two
segments: segment 1 (`[B1, L1, H, D]`, batch stride 0 allowed, i.e. a batch-1 cache broadcast
over the CFG batch) and segment 2 (`[B, L2, H, D]`). Query rows with index `< q_prefix` see
segment 1 only; the others see both. That one rule serves both public ops:

- `attn_with_kv_cache`: segment 1 = cache, segment 2 = fresh keys, `q_prefix = 0`.
- `prefix_attn` (cache off, one launch): segment 1 = `k[:, :P]`, segment 2 = `k[:, P:]` (views),
  `q_prefix = P`. A query block entirely below P never visits segment 2 (per-query-block key
  range); a block that straddles P visits it with a row mask.

```
            keys:  [ segment 1 (cache / prefix) | segment 2 (fresh / rest) ]
  q rows < q_prefix  ##########################  ..........................
  q rows >= q_prefix ##########################  ##########################
```

Softmax: online, fp32 statistics, exp2 with `scale * log2(e)` folded into one multiply. With
`rope`, fresh q is rotated at load inside the attention kernel (q is read once per program) and
fresh k is rotated by the rope kernel into a temporary; cached keys are never touched.

A second implementation of the same ops, the Triton prologue + cuDNN route, is in `cudnn.py`.
Which one runs is decided by `longcat_kernels.dispatch` (backend="triton" runs this fused kernel
only; "auto" picks the cuDNN route where it measured faster).

Forward only: inputs requiring grad raise. Outputs are BSHD-contiguous, q's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from longcat_kernels._validate import (check_op_block_geometry, check_op_cache_rope, check_op_kv, check_op_prefix,
                                       default_scale)
from longcat_kernels.dispatch import launcher, triton_interpret
from longcat_kernels.grid import num_blocks, total_blocks
from longcat_kernels.ops.rope.triton import (
    check_no_grad_triton, kernel_tables, launch_norm_rope, rope_apply, rope_cos_sin, rope_table_args,
)
from longcat_kernels.ops.kv_cache_attn.reference import cat_cache

_INTERPRET = triton_interpret()  # at import, as Triton decides at the @triton.jit of the kernels
_LOG2E = 1.4426950408889634


@triton.jit
def _attn_segment(acc, l_i, m_i, q, K, V, lo, hi, L, q_prefix, qk_scale, offs_m, offs_d, m_d,
                  stride_kn, stride_kd, stride_vn, stride_vd,
                  BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, MASK_ROW: tl.constexpr,
                  DOT_PREC: tl.constexpr, WS: tl.constexpr):
    """Online-softmax update over key tiles [lo, hi) of one segment of length L."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        # the tile's first row in int64 (one scalar multiply; offsets inside the tile stay int32):
        # row * stride in int32 wrapped past 2**31 elements, e.g. v a view of a fused qkv (row
        # stride 3*H*D = 12288) over 175k+ keys (720p, 50+ latent frames)
        Kt = K + tl.cast(start_n, tl.int64) * stride_kn
        Vt = V + tl.cast(start_n, tl.int64) * stride_vn
        offs_t = tl.arange(0, BLOCK_N)
        if MASK_N:
            m_n = (start_n + offs_t) < L
            b_k = tl.load(Kt + offs_t[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                          mask=m_d[:, None] & m_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        else:
            b_k = tl.load(Kt + offs_t[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                          mask=m_d[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        b_s = tl.dot(q, b_k, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASK_N:
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        if MASK_ROW:
            # rows below q_prefix see segment 1 only; they already hold finite m_i from it
            b_s = tl.where(offs_m[:, None] >= q_prefix, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))  # [BLOCK_M]
        alpha = tl.math.exp2(m_i - m_new)
        b_p = tl.math.exp2(b_s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(b_p, axis=1)
        acc = acc * alpha[:, None]
        if MASK_N:
            b_v = tl.load(Vt + offs_t[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                          mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        else:
            b_v = tl.load(Vt + offs_t[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                          mask=m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_D]
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_two_masks(acc, l_i, m_i, q, K, V, L, q_prefix, qk_scale, offs_m, offs_d, m_d,
                    stride_kn, stride_kd, stride_vn, stride_vd,
                    BLOCK_N: tl.constexpr, MASK_ROW: tl.constexpr, DOT_PREC: tl.constexpr,
                    WS: tl.constexpr):
    """Whole segment: full tiles unmasked, then the partial tail tile with a key mask."""
    n_full = (L // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_segment(acc, l_i, m_i, q, K, V, 0, n_full, L, q_prefix, qk_scale,
                                  offs_m, offs_d, m_d, stride_kn, stride_kd, stride_vn,
                                  stride_vd, BLOCK_N, False, MASK_ROW, DOT_PREC, WS)
    acc, l_i, m_i = _attn_segment(acc, l_i, m_i, q, K, V, n_full, L, L, q_prefix, qk_scale,
                                  offs_m, offs_d, m_d, stride_kn, stride_kd, stride_vn,
                                  stride_vd, BLOCK_N, True, MASK_ROW, DOT_PREC, WS)
    return acc, l_i, m_i


# Launch shape (BLOCK_M, BLOCK_N, num_warps, num_stages) on GPU, from the sweep in
# bench/dev/bench_kv_cache_gpu_dev.py on the H100 (bf16, D=128, both VC shapes; per-config times in
# bench/results/h100/kv-cache-attn-triton-sweep_20261124_3f64ee5.json): 128x128, 8 warps, 3 stages was best or within 3%
# at both shapes; warp specialisation gained 3% at cond 4 and lost 1.6% at cond 16, so `_attn_config`
# turns it on for head_dim 128 on sm_90 only (where it was measured). Fixed rather than autotuned: an autotune pass over 70 ms
# launches is noisy (it picked configs 6% apart in a first run) and costs seconds at first call.
ATTN_CONFIG = {64: (128, 128, 8, 3), 128: (128, 128, 8, 3)}


# fp32 inputs (reference-precision runs, e.g. a DiT kept in fp32): the bf16 tiles above need
# 384 KB of shared memory at 4 bytes an element (H100: 227 KB), so fp32 gets 64x64 tiles, 2 stages
# (~160 KB at D=128).
ATTN_CONFIG_FP32 = (64, 64, 4, 2, False)


def _attn_config(D: int, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    if _INTERPRET:
        return 16, 16, 4, 1, False
    bd = triton.next_power_of_2(D)
    if dtype == torch.float32 and bd <= 128:
        return ATTN_CONFIG_FP32
    if bd in ATTN_CONFIG:
        bm, bn, w, st = ATTN_CONFIG[bd]
        return bm, bn, w, st, bd == 128 and _is_sm90(device)
    return (64, 64, 4, 2, False) if bd > 128 else (128, 64, 4, 3, False)


_SM90 = {}


def _is_sm90(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM90:
        _SM90[idx] = torch.cuda.get_device_capability(idx) == (9, 0)
    return _SM90[idx]


@triton.jit(do_not_specialize=["SQ", "L1", "L2", "q_prefix", "q_pos0", "GH", "GW"])
def kv_cache_attn_fwd_kernel(
    Q, K1, V1, K2, V2, O, LSE,
    COS_T, SIN_T, COS_H, SIN_H, COS_W, SIN_W,
    H, GROUP, SQ, L1, L2, q_prefix, qk_scale, q_pos0, GH, GW, stride_lb, stride_lh,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_k1b, stride_k1s, stride_k1h, stride_k1d,
    stride_v1b, stride_v1s, stride_v1h, stride_v1d,
    stride_k2b, stride_k2s, stride_k2h, stride_k2d,
    stride_v2b, stride_v2s, stride_v2h, stride_v2d,
    stride_ob, stride_os, stride_oh, stride_od,
    ROPE_Q: tl.constexpr, DT: tl.constexpr, DH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Grid (cdiv(SQ, BLOCK_M), B * H); query-block index varies fastest so concurrently running
    programs share one head's keys/values in L2. WRITE_LSE: also store lse [B, H, SQ] (natural log).
    GROUP: query heads per key/value head (GQA/MQA; 1 for plain attention): K/V head h // GROUP."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_m = offs_m < SQ
    m_d = offs_d < HEAD_DIM
    p_q = (Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs
           + offs_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if ROPE_Q:
        b_cos, b_sin = rope_cos_sin(q_pos0 + offs_m.to(tl.int64), m_m, tl.arange(0, BLOCK_D // 2),
                                     COS_T, SIN_T, COS_H, SIN_H, COS_W, SIN_W, GH, GW, DT, DH,
                                     HEAD_DIM)  # [BLOCK_M, BLOCK_D // 2]
        # round to the input dtype exactly like "rotate, cast, then attend"
        b_q = rope_apply(b_q, b_cos, b_sin, BLOCK_M, BLOCK_D).to(b_q.dtype)
    else:
        # an exact no-op select: q is then produced by an elementwise op rather than a load, so
        # the compiler feeds it to wgmma from registers instead of shared memory (seen in TTGIR;
        # the rotated-q path, which does this by construction, ran 2-8% faster on the H100)
        b_q = tl.where(m_m[:, None], b_q, 0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # segment 1 (cache / prefix): seen by every query row
    K1b = K1 + b * stride_k1b + hk * stride_k1h
    V1b = V1 + b * stride_v1b + hk * stride_v1h
    acc, l_i, m_i = _attn_two_masks(acc, l_i, m_i, b_q, K1b, V1b, L1, q_prefix, qk_scale, offs_m,
                                    offs_d, m_d, stride_k1s, stride_k1d, stride_v1s, stride_v1d,
                                    BLOCK_N, False, DOT_PREC, WS)
    # segment 2 (fresh / rest): only rows >= q_prefix; skipped by blocks entirely below it
    K2b = K2 + b * stride_k2b + hk * stride_k2h
    V2b = V2 + b * stride_v2b + hk * stride_v2h
    m_start = pid_m * BLOCK_M
    if m_start >= q_prefix:
        acc, l_i, m_i = _attn_two_masks(acc, l_i, m_i, b_q, K2b, V2b, L2, q_prefix, qk_scale,
                                        offs_m, offs_d, m_d, stride_k2s, stride_k2d, stride_v2s,
                                        stride_v2d, BLOCK_N, False, DOT_PREC, WS)
    elif m_start + BLOCK_M > q_prefix:
        acc, l_i, m_i = _attn_two_masks(acc, l_i, m_i, b_q, K2b, V2b, L2, q_prefix, qk_scale,
                                        offs_m, offs_d, m_d, stride_k2s, stride_k2d, stride_v2s,
                                        stride_v2d, BLOCK_N, True, DOT_PREC, WS)

    # rows that saw no key at all (only possible when L1 + L2 == 0) output 0, never NaN
    l_safe = tl.where(l_i == 0, 1.0, l_i)  # a NaN l stays NaN
    b_o = acc / l_safe[:, None]
    p_o = (O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os
           + offs_d[None, :] * stride_od)
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    if WRITE_LSE:
        _store_lse(LSE + b * stride_lb + h * stride_lh + offs_m.to(tl.int64), m_i, l_i, m_m)


@triton.jit
def _store_lse(p_l, m_i, l_i, mask):
    """lse = ln 2 * (m + log2 l) of an online softmax kept in log2 units; -inf where no key was seen
    (l == 0), NaN where a NaN reached the row (l NaN: ``l > 0`` would have called it empty)."""
    lse = tl.where(l_i == 0, float("-inf"),
                   (m_i + tl.math.log2(tl.where(l_i == 0, 1.0, l_i))) * 0.6931471805599453)
    tl.store(p_l, lse, mask=mask)


def _launch_attn(q, k1, v1, k2, v2, out, q_prefix, scale, tables=None, gh=1, gw=1, q_frame=0, lse=None):
    """q [B,Sq,H,D]; segment 1 k1/v1 [B or 1, L1, H, D] (batch stride forced to 0 when 1);
    segment 2 k2/v2 [B, L2, H, D]; writes out [B,Sq,H,D] and, when given, lse [B,H,Sq] fp32
    (unit stride along Sq)."""
    B, SQ, H, D = q.shape
    if B * SQ * H == 0:
        return
    L1, L2 = k1.shape[1], k2.shape[1]

    def st(x):
        s = list(x.stride())
        if x.shape[0] == 1:
            s[0] = 0  # broadcast a batch-1 segment over the batch, no copy
        return s

    rope_q = tables is not None
    if rope_q:
        dt, dh = int(tables[0].shape[1]), int(tables[2].shape[1])  # Rope3D.axis_dims
        t_args = kernel_tables(tables, q)
    else:
        dt, dh = D, 0
        t_args = [q] * 6
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    bm, bn, warps, stages, ws = _attn_config(D, q.device, q.dtype)
    grid = (triton.cdiv(SQ, bm), B * H)
    write_lse = lse is not None
    launcher(kv_cache_attn_fwd_kernel, grid)(
        q, k1, v1, k2, v2, out, lse if write_lse else out, *t_args,
        H, H // k2.shape[2], SQ, L1, L2, int(q_prefix), float(scale) * _LOG2E, int(q_frame) * gh * gw, gh, gw,
        lse.stride(0) if write_lse else 0, lse.stride(1) if write_lse else 0,
        *q.stride(), *st(k1), *st(v1), *st(k2), *st(v2), *out.stride(),
        ROPE_Q=rope_q, DT=dt, DH=dh, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        DOT_PREC=dot_prec, BLOCK_M=bm, BLOCK_N=bn, WS=ws, WRITE_LSE=write_lse, num_warps=warps,
        num_stages=stages,
    )


# ----------------------------------------------------------------------------------------------
# block-sparse variant over the same two segments (selection over the [cache; fresh] key grid)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _block_token(blk, r, T, HH, WW, nH, nW, CT: tl.constexpr, CH: tl.constexpr,
                 CW: tl.constexpr):
    """Sequence index and validity of slot r of 3D block blk (DESIGN.md, Geometry)."""
    bw = blk % nW
    bh = (blk // nW) % nH
    bt = blk // (nW * nH)
    t = bt * CT + r // (CH * CW)
    hh = bh * CH + (r // CW) % CH
    ww = bw * CW + r % CW
    valid = (t < T) & (hh < HH) & (ww < WW) & (r < CT * CH * CW)
    return (t * HH + hh) * WW + ww, valid


@triton.jit(do_not_specialize=["Tq", "Tk", "GH", "GW", "nHq", "nWq", "nHk", "nWk", "NQ",
                               "MAX_SEL", "SC"])
def kv_cache_bsa_fwd_kernel(
    Q, K1, V1, K2, V2, O, LSE, IDX, CNT,
    H, Tq, Tk, GH, GW, nHq, nWq, nHk, nWk, NQ, MAX_SEL, SC, qk_scale, stride_lb, stride_lh,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_k1b, stride_k1s, stride_k1h, stride_k1d,
    stride_v1b, stride_v1s, stride_v1h, stride_v1d,
    stride_k2b, stride_k2s, stride_k2h, stride_k2d,
    stride_v2b, stride_v2s, stride_v2h, stride_v2d,
    stride_ob, stride_os, stride_oh, stride_od,
    CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
    CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Grid (Nq, B * H): one 3D query block against its selected key blocks of the combined
    [cache (SC tokens); fresh] grid; a key token at index < SC is read from segment 1 (batch
    stride 0 for a broadcast cache), the others from segment 2 at index - SC."""
    i_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM
    seq_q, m_q = _block_token(i_m, tl.arange(0, BLOCK_M), Tq, GH, GW, nHq, nWq, CQT, CQH, CQW)
    seq_q = seq_q.to(tl.int64)
    p_q = Q + b * stride_qb + h * stride_qh + seq_q[:, None] * stride_qs + offs_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    row = pid_bh.to(tl.int64) * NQ + i_m
    n_sel = tl.load(CNT + row)
    p_idx = IDX + row * MAX_SEL
    K1b = K1 + b * stride_k1b + h * stride_k1h
    V1b = V1 + b * stride_v1b + h * stride_v1h
    K2b = K2 + b * stride_k2b + h * stride_k2h
    V2b = V2 + b * stride_v2b + h * stride_v2h
    offs_r = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_sel):
        kb = tl.load(p_idx + j)
        seq_k, m_k = _block_token(kb, offs_r, Tk, GH, GW, nHk, nWk, CKT, CKH, CKW)
        seq_k = seq_k.to(tl.int64)
        in1 = seq_k < SC
        s1 = tl.where(in1, seq_k, 0)
        s2 = tl.where(in1, 0, seq_k - SC)
        # each segment with its own strides (head_dim included: the cache and the fresh keys may differ)
        p_k = tl.where(in1[:, None], K1b + s1[:, None] * stride_k1s + offs_d[None, :] * stride_k1d,
                       K2b + s2[:, None] * stride_k2s + offs_d[None, :] * stride_k2d)
        b_k = tl.load(p_k, mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        b_p = tl.math.exp2(b_s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(b_p, axis=1)
        acc = acc * alpha[:, None]
        p_v = tl.where(in1[:, None], V1b + s1[:, None] * stride_v1s + offs_d[None, :] * stride_v1d,
                       V2b + s2[:, None] * stride_v2s + offs_d[None, :] * stride_v2d)
        b_v = tl.load(p_v, mask=m_k[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PREC)
        m_i = m_new
    # a query block with no selected key block outputs zeros, never NaN
    l_safe = tl.where(l_i == 0, 1.0, l_i)  # a NaN l stays NaN
    b_o = acc / l_safe[:, None]
    p_o = O + b * stride_ob + h * stride_oh + seq_q[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_q[:, None] & m_d[None, :])
    if WRITE_LSE:
        _store_lse(LSE + b * stride_lb + h * stride_lh + seq_q, m_i, l_i, m_q)


# ----------------------------------------------------------------------------------------------
# registered ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("longcat_kernels::kv_cache_attn_fwd", mutates_args=())
def _kv_cache_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
                      cos_t: Optional[torch.Tensor], sin_t: Optional[torch.Tensor],
                      cos_h: Optional[torch.Tensor], sin_h: Optional[torch.Tensor],
                      cos_w: Optional[torch.Tensor], sin_w: Optional[torch.Tensor],
                      grid_h: int, grid_w: int, scale: float,
                      return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [B,Sn,H,D], lse [B,H,Sn] fp32, or an empty tensor when return_lse is False)."""
    check_op_kv("kv_cache_attn_fwd", q, [("k", k, "v", v, False), ("k_cache", k_cache, "v_cache", v_cache, True)],
                gqa=True)
    check_op_cache_rope("kv_cache_attn_fwd", q, k, k_cache, [cos_t, sin_t, cos_h, sin_h, cos_w, sin_w], grid_h, grid_w)
    B, Sn, H, D = q.shape
    out = torch.empty((B, Sn, H, D), dtype=q.dtype, device=q.device)
    lse = new_lse(q, return_lse)
    if k_cache is None:
        k_cache, v_cache = k[:, :0], v[:, :0]
    tables = None if cos_t is None else [cos_t, sin_t, cos_h, sin_h, cos_w, sin_w]
    frame = k_cache.shape[1] // (grid_h * grid_w) if tables is not None else 0
    if tables is not None:
        # cached keys are already rotated; only the fresh keys are, once, here
        k_rot = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        launch_norm_rope(k=k, out_k=k_rot, tables=tables, gh=grid_h, gw=grid_w,
                         frame_offset=frame)
        k = k_rot
    _launch_attn(q, k_cache, v_cache, k, v, out, 0, scale, tables, grid_h, grid_w, frame,
                 lse=lse if return_lse else None)
    return out, lse


def new_lse(q, return_lse: bool) -> torch.Tensor:
    """lse buffer [B, H, Sq] fp32 when asked, else an empty placeholder (the kernel skips it)."""
    if return_lse:
        return torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    return torch.empty((0,), dtype=torch.float32, device=q.device)


@_kv_cache_attn_op.register_fake
def _(q, k, v, k_cache, v_cache, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w,
      scale, return_lse=False):
    return q.new_empty(q.shape), new_lse(q, return_lse)


@torch.library.custom_op("longcat_kernels::prefix_attn_fwd", mutates_args=())
def _prefix_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                    scale: float, return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    check_op_kv("prefix_attn_fwd", q, [("k", k, "v", v, False)], gqa=True)
    P = check_op_prefix("prefix_attn_fwd", q, k, prefix_len)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = new_lse(q, return_lse)
    _launch_attn(q, k[:, :P], v[:, :P], k[:, P:], v[:, P:], out, P, scale, lse=lse if return_lse else None)
    return out, lse


@_prefix_attn_op.register_fake
def _(q, k, v, prefix_len, scale, return_lse=False):
    return q.new_empty(q.shape), new_lse(q, return_lse)


@torch.library.custom_op("longcat_kernels::kv_cache_bsa_fwd", mutates_args=())
def _kv_cache_bsa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
                     indices: torch.Tensor, counts: torch.Tensor, grid_q: list[int],
                     grid_k: list[int], chunk_q: list[int], chunk_k: list[int],
                     scale: float, return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k already rotated; selection over q's grid vs the [cache; fresh] key grid."""
    check_op_kv("kv_cache_bsa_fwd", q, [("k", k, "v", v, False), ("k_cache", k_cache, "v_cache", v_cache, True)])
    check_op_block_geometry("kv_cache_bsa_fwd", q, k.shape[1] + (0 if k_cache is None else k_cache.shape[1]),
                            grid_q, grid_k, chunk_q, chunk_k, indices, counts)
    B, Sn, H, D = q.shape
    out = torch.empty((B, Sn, H, D), dtype=q.dtype, device=q.device)
    lse = new_lse(q, return_lse)
    if k_cache is None:
        k_cache, v_cache = k[:, :0], v[:, :0]
    Sc = k_cache.shape[1]
    nq, nk = num_blocks(grid_q, chunk_q), num_blocks(grid_k, chunk_k)
    NQ = total_blocks(grid_q, chunk_q)
    if B * H * NQ == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    idx = indices.to(torch.int32).contiguous()
    cnt = counts.to(torch.int32).contiguous()

    def st(x):
        s_ = list(x.stride())
        if x.shape[0] == 1:
            s_[0] = 0
        return s_

    bm = max(16, triton.next_power_of_2(chunk_q[0] * chunk_q[1] * chunk_q[2]))
    bn = max(16, triton.next_power_of_2(chunk_k[0] * chunk_k[1] * chunk_k[2]))
    bd = max(16, triton.next_power_of_2(D))
    launcher(kv_cache_bsa_fwd_kernel, (NQ, B * H))(
        q, k_cache, v_cache, k, v, out, lse if return_lse else out, idx, cnt,
        H, grid_q[0], grid_k[0], grid_q[1], grid_q[2], nq[1], nq[2], nk[1], nk[2], NQ,
        idx.shape[-1], Sc, float(scale) * _LOG2E,
        lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        *q.stride(), *st(k_cache), *st(v_cache), *st(k), *st(v), *out.stride(),
        CQT=chunk_q[0], CQH=chunk_q[1], CQW=chunk_q[2],
        CKT=chunk_k[0], CKH=chunk_k[1], CKW=chunk_k[2],
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", WRITE_LSE=return_lse,
        num_warps=4, num_stages=1 if _INTERPRET else 2,
    )
    return out, lse


@_kv_cache_bsa_op.register_fake
def _(q, k, v, k_cache, v_cache, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale, return_lse=False):
    return q.new_empty(q.shape), new_lse(q, return_lse)


def _block_sums(x, t0, grid_all, chunk, out):
    """Add fp32 sums of x [B, Tx*H*W, Hh, D] (frames t0.. of grid_all) into out [B, nT, nH, nW, Hh, D]."""
    B, S, Hh, D = x.shape
    _, GH, GW = grid_all
    ct, ch, cw = chunk
    Tx = S // (GH * GW)
    if Tx == 0:
        return
    nT, nH, nW = out.shape[1:4]
    front = t0 % ct
    back = (-(front + Tx)) % ct
    xg = x.reshape(B, Tx, GH, GW, Hh, D).to(torch.float32)
    xg = torch.nn.functional.pad(xg, (0, 0, 0, 0, 0, nW * cw - GW, 0, nH * ch - GH, front, back))
    nt_x = (front + Tx + back) // ct
    sums = xg.reshape(B, nt_x, ct, nH, ch, nW, cw, Hh, D).sum(dim=(2, 4, 6))
    bt0 = t0 // ct
    out[:, bt0:bt0 + nt_x] += sums


def _select_two_segments(q, k, k_cache, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf):
    """SPEC 3 gating of q against the [cache; fresh] keys without concatenating them: fp32 block
    sums of each segment are added into the blocks of the combined key grid, then mean, rounding
    and scores/selection exactly as the torch gating (selection.py)."""
    from longcat_kernels.grid import block_sizes
    from longcat_kernels.ops.block_sparse_attn.selection import (
        BlockSelection, select_rows, block_scores, pool_blocks, warn_if_keeps_nothing,
    )
    B, _, H, D = q.shape
    nT, nH, nW = num_blocks(grid_k, chunk_k)
    warn_if_keeps_nothing(sparsity, cdf, nT * nH * nW, grid_k, chunk_k)
    q_blk = pool_blocks(q, grid_q, chunk_q)  # [B, H, Nq, D]
    sums = torch.zeros((B, nT, nH, nW, H, D), dtype=torch.float32, device=q.device)
    c = 0
    if k_cache is not None:
        c = k_cache.shape[1] // (grid_k[1] * grid_k[2])
        _block_sums(k_cache, 0, grid_k, chunk_k, sums)  # a batch-1 cache broadcasts in the add
    _block_sums(k, c, grid_k, chunk_k, sums)
    n = block_sizes(grid_k, chunk_k, q.device).to(torch.float32).view(1, nT, nH, nW, 1, 1)
    k_blk = (sums / n).to(k.dtype).reshape(B, nT * nH * nW, H, D).transpose(1, 2)
    Nq, Nk = q_blk.shape[2], k_blk.shape[2]
    max_sel = max(1, int((1.0 - sparsity) * Nk)) if cdf is None else Nk
    s_ = block_scores(q_blk.reshape(B * H, Nq, D), k_blk.reshape(B * H, Nk, D))
    idx, cnt = select_rows(s_, D, sparsity, cdf, max_sel)
    return BlockSelection(idx.reshape(B, H, Nq, max_sel), cnt.reshape(B, H, Nq), tuple(grid_q),
                          tuple(grid_k), tuple(chunk_q), tuple(chunk_k))


def gate_two_segments(q, k, k_cache, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf, impl="auto"):
    """Gating of fresh queries against the ``[cache; fresh]`` key grid -> ``BlockSelection``.

    ``impl``: ``"triton"`` concatenates the keys once (a batch-1 cache expanded over the batch) and
    runs the Triton gating (pooling, scores and top-k kernels); ``"torch"`` adds fp32 block sums of
    each segment without concatenating (`_select_two_segments`); ``"auto"``: triton on CUDA for
    top-k selection (measured on the H100 at cond 4, 480p, B2: the torch route cost 5 ms next to a
    10.7 ms kernel), torch otherwise (cdf rules sort in torch either way).
    """
    if impl == "auto":
        impl = "triton" if (q.is_cuda and cdf is None) else "torch"
    if impl == "torch":
        return _select_two_segments(q, k, k_cache, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf)
    if impl != "triton":
        raise ValueError(f"impl: expected 'auto', 'triton' or 'torch', got {impl!r}")
    from longcat_kernels.ops.block_sparse_attn.triton import select_blocks_triton
    k_all = cat_cache(k_cache, k)
    return select_blocks_triton(q, k_all, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf)


def _attn_with_kv_cache_bsa(q, k, v, k_cache, v_cache, rope, scale, bs, return_lse=False):
    """Block-sparse attn_with_kv_cache: fresh q/k rotated once (rope kernel), gating over the
    combined key grid (unless bs.selection is given), then the two-segment block-sparse kernel."""
    Sc = 0 if k_cache is None else k_cache.shape[1]
    Hf, Wf = bs.frame_hw
    n = Hf * Wf
    grid_q = (q.shape[1] // n, Hf, Wf)
    grid_k = ((Sc + q.shape[1]) // n, Hf, Wf)
    if rope is not None:
        tabs, gh, gw = rope_tables_for(rope, q, Sc)
        q_r = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_r = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        # through the registered op (a bare launch here was traced into by torch.compile: no op boundary)
        torch.ops.longcat_kernels.rope_3d(q, *tabs, gh, gw, Sc // n, q_r)
        torch.ops.longcat_kernels.rope_3d(k, *tabs, gh, gw, Sc // n, k_r)
        q, k = q_r, k_r
    sel = bs.selection
    if sel is None:
        chunk_k = bs.chunk_q if bs.chunk_k is None else bs.chunk_k
        sel = gate_two_segments(q, k, k_cache, grid_q, grid_k, tuple(bs.chunk_q), tuple(chunk_k),
                                bs.sparsity, bs.cdf_threshold)
    out, lse = torch.ops.longcat_kernels.kv_cache_bsa_fwd(
        q, k, v, k_cache, v_cache, sel.indices, sel.counts, list(sel.grid_q), list(sel.grid_k),
        list(sel.chunk_q), list(sel.chunk_k), scale, return_lse)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# public entry points called by api.py
# ----------------------------------------------------------------------------------------------

def rope_tables_for(rope, q, Sc):
    """(six fp32 tables on q's device, grid_h, grid_w) for fresh tokens after ``Sc`` cached ones;
    ([None] * 6, 1, 1) without rope. Raises if the cache/fresh lengths are not whole frames."""
    if rope is None:
        return [None] * 6, 1, 1
    tabs, gh, gw = rope_table_args(rope)
    if not torch.compiler.is_compiling():
        T = rope.grid[0]
        if Sc % (gh * gw) or q.shape[1] % (gh * gw):
            raise ValueError(f"attn_with_kv_cache: cache length {Sc} and fresh length "
                             f"{q.shape[1]} must be whole frames of {gh}x{gw} tokens")
        if (Sc + q.shape[1]) // (gh * gw) > T:
            raise ValueError(f"attn_with_kv_cache: {(Sc + q.shape[1]) // (gh * gw)} frames of "
                             f"cache + fresh exceed rope.grid T={T}")
    return [t.to(q.device) for t in tabs], gh, gw


def attn_with_kv_cache_triton(q, k, v, k_cache=None, v_cache=None, rope=None, scale=None,
                              block_sparse=None, return_lse=False):
    """softmax(q' [k_cache; k']^T * scale) [v_cache; v] in one fused Triton kernel (SPEC 4).

    Args:
        q, k, v (Tensor): [B, Sn, H, D] fresh tokens, any strides, bf16/fp16/fp32.
        k_cache, v_cache (Tensor | None): [Bc, Sc, H, D], Bc in {1, B}; Bc = 1 is broadcast
            (batch stride 0), never repeated. Cached K must already be rotated.
        rope (Rope3D | None): rotate fresh q, k at frames Sc/(H*W).. of rope.grid.
        scale (float | None): default head_dim ** -0.5.
        block_sparse (BlockSparseParams | None, frame_hw filled in): block-sparse attention over
            the [cache; fresh] key grid: gating (unless `selection` is given) sums each segment's
            blocks into the combined grid, then a block-sparse variant of the same two-segment
            kernel reads the selected blocks from cache or fresh keys. Not yet timed on a GPU.

    Returns [B, Sn, H, D] BSHD-contiguous, q's dtype (with return_lse: (out, lse [B, H, Sn] fp32)).
    Forward only.
    """
    check_no_grad_triton("attn_with_kv_cache", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    scale = default_scale(q, scale)
    if block_sparse is not None:
        return _attn_with_kv_cache_bsa(q, k, v, k_cache, v_cache, rope, scale, block_sparse, return_lse)
    Sc = 0 if k_cache is None else k_cache.shape[1]
    tabs, gh, gw = rope_tables_for(rope, q, Sc)
    out, lse = torch.ops.longcat_kernels.kv_cache_attn_fwd(q, k, v, k_cache, v_cache, *tabs, gh, gw,
                                                           scale, return_lse)
    return (out, lse) if return_lse else out


def prefix_attn_triton(q, k, v, prefix_len, scale=None, return_lse=False):
    """Cache-off rule in one launch: queries [:P] attend keys [:P], the rest attend all keys.

    q, k, v: [B, S, H, D], any strides. Returns [B, S, H, D] BSHD-contiguous. Forward only.
    """
    check_no_grad_triton("prefix_attn", q=q, k=k, v=v)
    scale = default_scale(q, scale)
    out, lse = torch.ops.longcat_kernels.prefix_attn_fwd(q, k, v, int(prefix_len), scale, return_lse)
    return (out, lse) if return_lse else out
