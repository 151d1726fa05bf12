"""Issue 18, the ceiling note's untried route: a block-sparse forward on float8 e4m3 Q/K/V (half the
bytes per visited key block, twice the tensor-core rate), to see how far below the bf16 kernels it
lands and what it costs in accuracy. An experiment: nothing in the product calls it.

Layout and numerics (SageAttention-style, written for this experiment):

- q and k: per-token scales (amax over D / 448), k first smoothed by its per-(b, h, d) mean over the
  sequence (softmax is invariant to adding q . mean(k) to every score of a row, so the result is
  unchanged in exact arithmetic and the k rows quantise with less range); both stored in block order
  ``[B*H, nblocks, 64, D]`` so every visited key block is one contiguous 8 KB tile;
- v: per-(b, h, d) scale over the sequence, stored in block order and transposed per block
  ``[B*H, nblocks, D, 64]`` (the P V product's B operand is K-major, as fp8 wgmma needs);
- P is cast to e4m3 (values in [0, 1]) for the P V product; statistics, scores and the accumulator
  stay fp32; the output is bf16 in the caller's [B, S, H, D] layout, lse fp32 natural log.

A third variant quantises only q and k, to int8 (per-token scales, smoothed k, rounded codes, int32
scores: SageAttention's split), and keeps P and v in bf16 (v block-ordered, unscaled).

A second variant (``UP``) keeps the e4m3 K/V bytes but widens them to bf16 in registers and runs
bf16 math on a bf16 q: what the halved bytes alone buy, apart from the doubled tensor rate.

The quantisation here is plain torch (several passes; a fused Triton pass would read q/k/v once), so
it is timed separately from the kernel and reported, not hidden.

    PYTHONPATH=$PWD python bench/dev/bsa_fp8_fwd_gpu.py --out $OUT/fp8.json [--rounds 2]
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python bench/dev/bsa_fp8_fwd_gpu.py --cpu-check
        (tiny shapes, fp16 standing in for e4m3, against the reference: checks the indexing)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
import triton
import triton.language as tl

import longcat_kernels as lk
from bench.dev.bsa_blocked_layout_gpu import block_perm
from longcat_kernels.ops.block_sparse_attn._triton_kernels import _block_rows

_LOG2E = 1.4426950408889634
FP8_MAX = 448.0


def _fmax(dt) -> float:
    """Largest code of a quantised dtype (e4m3 448, int8 127); 1.0 for a float standing in (CPU check)."""
    return {torch.float8_e4m3fn: FP8_MAX, torch.int8: 127.0}.get(dt, 1.0)


def quantize(q, k, v, perm, vol, qdt, smooth_k=True):
    """-> q8 [BH, NB, vol, D], sq [BH, NB*vol], k8, sk (same), v8t [BH, NB, D, vol], sv [BH, D]."""
    B, S, H, D = q.shape
    fmax = _fmax(qdt)

    def rows(x):  # per-token scale, block order
        xb = x[:, perm].permute(0, 2, 1, 3).float().contiguous().view(B * H, S, D)
        s = (xb.abs().amax(-1) / fmax).clamp_min(1e-12)
        y = xb / s[..., None]
        y = y.round() if qdt == torch.int8 else y
        return y.to(qdt).contiguous().view(B * H, S // vol, vol, D), s.contiguous()

    q8, sq = rows(q)
    if smooth_k:
        k = k - k.float().mean(1, keepdim=True).to(k.dtype)
    k8, sk = rows(k)
    vf = v.float()
    sv = (vf.abs().amax(1) / fmax).clamp_min(1e-12)  # [B, H, D]
    v8 = (vf / sv[:, None]).to(qdt)[:, perm]  # [B, S, H, D] block order
    v8t = v8.permute(0, 2, 3, 1).reshape(B * H, D, S // vol, vol).permute(0, 2, 1, 3).contiguous()
    return q8, sq, k8, sk, v8t, sv.reshape(B * H, D).contiguous()


@triton.jit
def quant_kernel(x, s_b, s_s, s_h, mean, out, scl, T, HH, WW, nH, nW, NB, NH, FMAX,
                 CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, VOL: tl.constexpr, D: tl.constexpr,
                 SUB: tl.constexpr, PER_CHANNEL: tl.constexpr, ROUND: tl.constexpr):
    """One pass over one block of one (b, h): block-order e4m3 rows with per-token scales (q, k;
    ``SUB``: minus the per-(b, h, d) mean), or ``PER_CHANNEL``: v times 1 / its per-(b, h, d) scale,
    written transposed per block ``[D, VOL]``."""
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1)
    o_r = tl.arange(0, VOL)
    o_d = tl.arange(0, D)
    seq, _ = _block_rows(i_blk, o_r, T, HH, WW, nH, nW, CT, CH, CW)
    p_x = x + (i_bh // NH).to(tl.int64) * s_b + (i_bh % NH).to(tl.int64) * s_h + seq.to(tl.int64)[:, None] * s_s + o_d[None, :]
    b_x = tl.load(p_x).to(tl.float32)
    base = (i_bh.to(tl.int64) * NB + i_blk) * (VOL * D)
    if PER_CHANNEL:
        b_s = tl.load(scl + i_bh.to(tl.int64) * D + o_d)
        b_y = b_x / b_s[None, :]
        tl.store(out + base + o_d[None, :] * VOL + o_r[:, None], b_y.to(out.dtype.element_ty))
    else:
        if SUB:
            b_x = b_x - tl.load(mean + i_bh.to(tl.int64) * D + o_d)[None, :]
        b_s = tl.maximum(tl.max(tl.abs(b_x), 1) / FMAX, 1e-12)
        b_y = b_x / b_s[:, None]
        if ROUND:  # int8: to nearest, ties away from zero
            b_y = tl.where(b_y >= 0, tl.floor(b_y + 0.5), tl.ceil(b_y - 0.5))
        tl.store(out + base + o_r[:, None] * D + o_d[None, :], b_y.to(out.dtype.element_ty))
        tl.store(scl + (i_bh.to(tl.int64) * NB + i_blk) * VOL + o_r, b_s)


def quantize_fused(q, k, v, grid, chunk, qdt, smooth_k=True, vdt=None):
    """``quantize``'s outputs from one Triton pass per tensor (plus the k mean and the v amax, torch
    reductions that read once). ``vdt`` (default ``qdt``): v's dtype; bf16 keeps v unscaled (sv = 1)."""
    B, S, H, D = q.shape
    vol = chunk[0] * chunk[1] * chunk[2]
    NB = S // vol
    vdt = qdt if vdt is None else vdt
    geo = (grid[0], grid[1], grid[2], grid[1] // chunk[1], grid[2] // chunk[2], NB, H)
    meta = dict(CT=chunk[0], CH=chunk[1], CW=chunk[2], VOL=vol, D=D)
    outs = []
    for x, sub in ((q, False), (k, smooth_k)):
        mean = x.mean(1, dtype=torch.float32).contiguous() if sub else x  # [B, H, D]
        o8 = torch.empty((B * H, NB, vol, D), dtype=qdt, device=x.device)
        sc = torch.empty((B * H, S), dtype=torch.float32, device=x.device)
        quant_kernel[(NB, B * H)](x, x.stride(0), x.stride(1), x.stride(2), mean, o8, sc, *geo, _fmax(qdt), **meta,
                                  SUB=sub, PER_CHANNEL=False, ROUND=qdt == torch.int8)
        outs += [o8, sc]
    if vdt == torch.bfloat16:
        sv = torch.ones(B * H, D, device=v.device)
    else:  # max |v| over the sequence without an fp32 or abs copy
        sv = (torch.maximum(v.amax(1), -v.amin(1)).float() / _fmax(vdt)).clamp_min(1e-12).reshape(B * H, D).contiguous()
    v8t = torch.empty((B * H, NB, D, vol), dtype=vdt, device=v.device)
    quant_kernel[(NB, B * H)](v, v.stride(0), v.stride(1), v.stride(2), v, v8t, sv, *geo, 1.0, **meta,
                              SUB=False, PER_CHANNEL=True, ROUND=False)
    return (*outs, v8t, sv)


@triton.jit(do_not_specialize=["Tq", "HH", "WW", "nHq", "nWq", "NQ", "NK", "MAX_SEL"])
def bsa_fp8_fwd_kernel(
    q8, sq, k8, sk, v8t, sv, o, lse, idx, cnt,
    s_ob, s_os, s_oh,
    Tq, HH, WW, nHq, nWq, NQ, NK, MAX_SEL, NH, scale_log2,
    CQT: tl.constexpr, CQH: tl.constexpr, CQW: tl.constexpr,
    VOL: tl.constexpr, D: tl.constexpr, BPI: tl.constexpr, UP: tl.constexpr,
):
    BLOCK_N: tl.constexpr = VOL * BPI
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // NH
    i_h = i_bh % NH
    o_r = tl.arange(0, VOL)
    o_d = tl.arange(0, D)
    qrow = i_bh.to(tl.int64) * NQ + i_m
    b_q = tl.load(q8 + qrow * (VOL * D) + o_r[:, None] * D + o_d[None, :])
    b_sq = tl.load(sq + qrow * VOL + o_r) * scale_log2
    n_sel = tl.load(cnt + qrow)
    p_idx = idx + qrow * MAX_SEL
    o_c = tl.arange(0, BLOCK_N)
    o_slot = o_c // VOL
    o_rk = o_c % VOL
    kv_base = i_bh.to(tl.int64) * NK

    b_m = tl.full([VOL], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([VOL], dtype=tl.float32)
    b_acc = tl.zeros([VOL, D], dtype=tl.float32)
    for j in range(0, n_sel, BPI):
        if BPI == 1:
            kb = (kv_base + tl.load(p_idx + j)) * VOL
            b_k = tl.load(k8 + kb * D + o_c[:, None] * D + o_d[None, :])
            b_sk = tl.load(sk + kb + o_c)
            b_vt = tl.load(v8t + kb * D + o_d[:, None] * VOL + o_c[None, :])
        else:
            m_sel = (j + o_slot) < n_sel
            kb = (kv_base + tl.load(p_idx + j + o_slot, mask=m_sel, other=0)) * VOL  # [BLOCK_N]
            b_k = tl.load(k8 + (kb + o_rk)[:, None] * D + o_d[None, :])
            b_sk = tl.load(sk + kb + o_rk)
            b_vt = tl.load(v8t + (kb * D + o_rk)[None, :] + o_d[:, None] * VOL)
        if UP:  # fp8 bytes, bf16 math: K/V widened in registers (q is bf16 with unit scales)
            b_k = b_k.to(tl.bfloat16)
            b_vt = b_vt.to(tl.bfloat16)
        b_s = tl.dot(b_q, tl.trans(b_k)) * b_sq[:, None] * b_sk[None, :]
        if BPI > 1:
            b_s = tl.where(m_sel[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None]
        b_acc = tl.dot(b_p.to(b_vt.dtype), tl.trans(b_vt), b_acc)
        b_m = b_mn

    m_empty = b_l == 0.0
    b_lse = tl.where(m_empty, float("-inf"), (b_m + tl.log2(tl.where(m_empty, 1.0, b_l))) * 0.6931471805599453)
    b_sv = tl.load(sv + i_bh.to(tl.int64) * D + o_d)
    b_o = b_acc * (b_sv[None, :] / tl.where(m_empty, 1.0, b_l)[:, None])
    seq_q, m_q = _block_rows(i_m, o_r, Tq, HH, WW, nHq, nWq, CQT, CQH, CQW)
    seq_q = seq_q.to(tl.int64)
    p_o = o + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh + seq_q[:, None] * s_os + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty))
    tl.store(lse + i_bh.to(tl.int64) * (Tq * HH * WW) + seq_q, b_lse)


def fp8_fwd(qz, sel, scale, shape, out_dtype, bpi=1, num_warps=4, num_stages=2, up=False, poison=False):
    """The kernel on quantised inputs (``quantize``'s tuple); grids must divide by the chunk."""
    q8, sq, k8, sk, v8t, sv = qz
    B, S, H, D = shape
    grid, chunk = sel.grid_q, sel.chunk_q
    vol = chunk[0] * chunk[1] * chunk[2]
    NQ = S // vol
    NK = k8.shape[1]
    # poison: NaN-filled outputs, so that an element the kernel leaves unwritten fails the check
    new = functools.partial(torch.full, fill_value=float("nan")) if poison else torch.empty
    out = new((B, S, H, D), dtype=out_dtype, device=q8.device)
    lse = new((B, H, S), dtype=torch.float32, device=q8.device)
    idx = sel.indices.to(torch.int32).contiguous()
    cnt = sel.counts.to(torch.int32).contiguous()
    bsa_fp8_fwd_kernel[(NQ, B * H)](
        q8, sq, k8, sk, v8t, sv, out, lse, idx, cnt, out.stride(0), out.stride(1), out.stride(2),
        grid[0], grid[1], grid[2], grid[1] // chunk[1], grid[2] // chunk[2], NQ, NK, idx.shape[-1], H,
        scale * _LOG2E, CQT=chunk[0], CQH=chunk[1], CQW=chunk[2], VOL=vol, D=D, BPI=bpi,
        UP=up, num_warps=num_warps, num_stages=num_stages)
    return out, lse


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def cpu_check() -> int:
    """Tiny shapes under the interpreter, fp16 (scale 1) standing in for e4m3: checks addressing,
    scales, smoothing and the BPI=2 masking against the reference (fp64)."""
    from longcat_kernels.ops.block_sparse_attn.reference import block_sparse_attn_reference

    bad = 0
    for grid, chunk, sp, bpi in (((4, 4, 8), (2, 2, 4), 0.5, 1), ((4, 4, 8), (2, 2, 4), 0.25, 2)):
        B, H, D = 1, 2, 16
        S = grid[0] * grid[1] * grid[2]
        vol = chunk[0] * chunk[1] * chunk[2]
        q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
        sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=sp)
        ref, ref_lse = block_sparse_attn_reference(q.double(), k.double(), v.double(), sel, D ** -0.5)
        qz = quantize(q, k, v, block_perm(grid, chunk, "cpu"), vol, torch.float16)
        qf = quantize_fused(q, k, v, grid, chunk, torch.float16)
        qdiff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(qz, qf))
        print(f"fused quantisation vs torch: max abs {qdiff:.2e}")
        bad += not qdiff < 2e-3
        out, lse = fp8_fwd(qf, sel, D ** -0.5, (B, S, H, D), torch.float32, bpi=bpi, poison=True)
        # smoothing k shifts each row's scores by q . mean(k): out is unchanged, lse moves by it
        r = _rel(out, ref)
        print(f"cpu check grid {grid} chunk {chunk} sparsity {sp} bpi {bpi}: rel L2 vs fp64 {r:.2e}, "
              f"nan {bool(out.isnan().any())}")
        bad += not (r < 2e-3 and not bool(out.isnan().any()))
        # int8 q/k (rounded codes, int32 scores), fp16 v
        qi = quantize_fused(q, k, v, grid, chunk, torch.int8, vdt=torch.float16)
        qt = quantize(q, k, v, block_perm(grid, chunk, "cpu"), vol, torch.int8)
        idiff = max(int((a.int() - b.int()).abs().max()) for a, b in zip(qi[0:3:2], qt[0:3:2]))
        out, _ = fp8_fwd(qi, sel, D ** -0.5, (B, S, H, D), torch.float32, bpi=bpi, poison=True)
        r = _rel(out, ref)
        print(f"    int8 q/k: codes vs torch max diff {idiff}, rel L2 vs fp64 {r:.2e}, nan {bool(out.isnan().any())}")
        bad += not (r < 2e-2 and idiff <= 1 and not bool(out.isnan().any()))
    return bad


def gpu(args) -> int:
    from bench.timing import TimingPolicy, ab_results, interleaved
    from bench.upstream import upstream_bsa
    from longcat_kernels.dispatch import impl_fn
    from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda
    from longcat_kernels.testing import make_qkv, make_video_qkv

    B, H, D = 1, 32, 128
    grid, chunk = (24, 44, 80), (4, 4, 4)
    S, vol = grid[0] * grid[1] * grid[2], 64
    scale = D ** -0.5
    res = ab_results({"B": B, "H": H, "D": D, "grid": grid, "chunk": chunk, "dtype": "bf16 in, e4m3 inside"})
    if res is None:
        return 2
    up, up_note = upstream_bsa(args.upstream)
    res["upstream"] = up_note
    perm = block_perm(grid, chunk, "cuda")
    tri = impl_fn("block_sparse_attn_fwd", "triton")
    bad = 0
    for spec in args.cases.split(","):
        kind, sp = spec.split(":")
        sp = float(sp)
        sets = []
        for seed in (1, 2):
            g = torch.Generator(device="cuda").manual_seed(seed)
            if kind == "random":
                q, k, v = make_qkv(B, S, H, D, dtype=torch.bfloat16, device="cuda", generator=g)
            else:
                q, k, v = make_video_qkv(B, grid, H, D, dtype=torch.bfloat16, device="cuda", generator=g)
            sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=sp)
            sets.append((q, k, v, sel))
        q, k, v, sel = sets[0]
        ref, ref_lse = tri(q.float(), k.float(), v.float(), sel, scale)  # fp32 (ieee dots) on the same selection
        bf, _ = tri(q, k, v, sel, scale)
        qz = quantize(q, k, v, perm, vol, torch.float8_e4m3fn)
        qf = quantize_fused(q, k, v, grid, chunk, torch.float8_e4m3fn)
        chk = {"bf16_triton_rel_l2_vs_fp32": _rel(bf, ref),
               "fused_vs_torch_quant_max_abs": [float((a.float() - b.float()).abs().max()) for a, b in zip(qz, qf)]}
        del qf
        configs = [(1, 4, 2), (1, 4, 3), (2, 4, 2)]  # (1, 8, 2) 23.1 ms, (2, 8, 2) 29.1 ms in the first run
        good, good_up, good_i8 = [], [], []
        for bpi, nw, ns in configs:
            name = f"fp8_bpi{bpi}_w{nw}_s{ns}"
            try:
                o, lse = fp8_fwd(qz, sel, scale, (B, S, H, D), torch.bfloat16, bpi, nw, ns, poison=True)
                torch.cuda.synchronize()
                r = _rel(o, ref)
                chk[name] = {"rel_l2_vs_fp32": r, "nan": bool(o.isnan().any())}
                if not chk[name]["nan"] and r < 0.1:
                    good.append((name, bpi, nw, ns))
            except Exception as e:  # noqa: BLE001 - report, time the rest
                chk[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        # fp8 K/V bytes with bf16 math: q in block order, bf16, unit scales (what the bytes alone buy)
        qb16 = q[:, perm].permute(0, 2, 1, 3).contiguous().view(B * H, S // vol, vol, D)
        qz_up = (qb16, torch.ones(B * H, S, device="cuda"), *qz[2:])
        for nw in (4,):  # 8 warps: 52.8 ms in the first run
            name = f"fp8kv_bf16math_w{nw}"
            try:
                o, _ = fp8_fwd(qz_up, sel, scale, (B, S, H, D), torch.bfloat16, 1, nw, 2, up=True, poison=True)
                torch.cuda.synchronize()
                chk[name] = {"rel_l2_vs_fp32": _rel(o, ref), "nan": bool(o.isnan().any())}
                if not chk[name]["nan"] and chk[name]["rel_l2_vs_fp32"] < 0.1:
                    good_up.append((name, nw))
            except Exception as e:  # noqa: BLE001
                chk[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        # int8 q/k (per-token scales, smoothed k; int32 scores), bf16 P and v (block order, unscaled)
        qi = quantize_fused(q, k, v, grid, chunk, torch.int8, vdt=torch.bfloat16)
        for bpi, nw, ns in ((1, 4, 2), (1, 4, 3), (2, 4, 2), (1, 8, 2)):
            name = f"int8qk_bf16pv_bpi{bpi}_w{nw}_s{ns}"
            try:
                o, _ = fp8_fwd(qi, sel, scale, (B, S, H, D), torch.bfloat16, bpi, nw, ns, poison=True)
                torch.cuda.synchronize()
                chk[name] = {"rel_l2_vs_fp32": _rel(o, ref), "nan": bool(o.isnan().any())}
                if not chk[name]["nan"] and chk[name]["rel_l2_vs_fp32"] < 0.1:
                    good_i8.append((name, bpi, nw, ns))
            except Exception as e:  # noqa: BLE001
                chk[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        del qi
        qz_plain = quantize(q, k, v, perm, vol, torch.float8_e4m3fn, smooth_k=False)
        o, _ = fp8_fwd(qz_plain, sel, scale, (B, S, H, D), torch.bfloat16)
        chk["fp8_no_smoothing_rel_l2_vs_fp32"] = _rel(o, ref)
        print(f"[{kind} {sp}] {chk}", flush=True)
        del ref, ref_lse, bf, qz, qz_plain, o
        bad += not good
        qzs = [quantize(a, b_, c, perm, vol, torch.float8_e4m3fn) for a, b_, c, _ in sets]
        fns = {"triton_bf16_fwd": lambda i: tri(sets[i][0], sets[i][1], sets[i][2], sets[i][3], scale)}
        try:
            bsa_forward_cuda(q, k, v, sel, scale, kernel="sm90_ws")
            fns["csrc_sm90_ws_fwd"] = lambda i: bsa_forward_cuda(sets[i][0], sets[i][1], sets[i][2], sets[i][3],
                                                                scale, kernel="sm90_ws")
        except Exception as e:  # noqa: BLE001
            chk["csrc_error"] = f"{type(e).__name__}: {e}"[:200]
        for name, bpi, nw, ns in good:
            fns[name] = (lambda b_, w_, s_: lambda i: fp8_fwd(qzs[i], sets[i][3], scale, (B, S, H, D), torch.bfloat16,
                                                               b_, w_, s_))(bpi, nw, ns)
        for name, nw in good_up:
            qzu = [(a[:, perm].permute(0, 2, 1, 3).contiguous().view(B * H, S // vol, vol, D),
                    torch.ones(B * H, S, device="cuda"), *z[2:]) for (a, _, _, _), z in zip(sets, qzs)]
            fns[name] = (lambda w_, qzu_: lambda i: fp8_fwd(qzu_[i], sets[i][3], scale, (B, S, H, D), torch.bfloat16,
                                                            1, w_, 2, up=True))(nw, qzu)
        if good_i8:
            qis = [quantize_fused(a, b_, c, grid, chunk, torch.int8, vdt=torch.bfloat16) for a, b_, c, _ in sets]
            for name, bpi, nw, ns in good_i8:
                fns[name] = (lambda b_, w_, s_: lambda i: fp8_fwd(qis[i], sets[i][3], scale, (B, S, H, D),
                                                                   torch.bfloat16, b_, w_, s_))(bpi, nw, ns)
            fns["quantize_fused_int8"] = lambda i: quantize_fused(sets[i][0], sets[i][1], sets[i][2], grid, chunk,
                                                                  torch.int8, vdt=torch.bfloat16)
        fns["quantize_torch"] = lambda i: quantize(sets[i][0], sets[i][1], sets[i][2], perm, vol, torch.float8_e4m3fn)
        fns["quantize_fused"] = lambda i: quantize_fused(sets[i][0], sets[i][1], sets[i][2], grid, chunk,
                                                         torch.float8_e4m3fn)
        fns["gating"] = lambda i: lk.select_blocks(sets[i][0], sets[i][1], grid_q=grid, chunk_q=chunk, sparsity=sp)
        fns["op_auto_gating_plus_fwd"] = lambda i: lk.block_sparse_attn(sets[i][0], sets[i][1], sets[i][2],
                                                                        grid_q=grid, chunk_q=chunk, sparsity=sp)
        if up is not None:
            bhsd = [tuple(x.transpose(1, 2).contiguous() for x in s[:3]) for s in sets]
            fns["upstream_gating_plus_fwd"] = lambda i: up(*bhsd[i], grid, grid, sparsity=sp, cdf_threshold=None,
                                                           chunk_3d_shape_q=list(chunk), chunk_3d_shape_k=list(chunk))
        pol = TimingPolicy(warmup=2, min_reps=3, max_reps=30, budget_s=args.budget)
        ms, per = interleaved(fns, [(0,), (1,)], "cuda", pol, args.rounds)
        print("    " + ", ".join(f"{n} {t:.2f}" for n, t in ms.items()), flush=True)
        res["cases"].append({"inputs": kind, "sparsity": sp, "check": chk, "ms": ms, "rounds_ms": per})
        fns = None
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--cpu-check", action="store_true")
    p.add_argument("--upstream")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--cases", default="video:0.9375,random:0.9375")
    args = p.parse_args()
    if args.cpu_check:
        return 1 if cpu_check() else 0
    if not args.out:
        p.error("--out is required on the GPU")
    return gpu(args)


if __name__ == "__main__":
    sys.exit(main())
