"""GPU check-and-time script for cached-KV attention (issue 4), one call on the device.

HISTORICAL (kept for its numbers, not runnable; bench/dev/README.md): it overwrites the private
`_CONFIG_OVERRIDE` of longcat_kernels.ops.kv_cache_attn.triton. Produced: kv-cache-attn-triton-
sweep_20261124_3f64ee5.json (commit 3f64ee5). To re-run, check out the commit that produced the
result.


    PYTHONPATH=$PWD python bench/dev/bench_kv_cache_gpu_dev.py --out $OUT/kv_cache.json

480p VC shapes (B2 = CFG, H32, D128, bf16, 1560 tokens per latent frame, 24 latent frames):
  cond 4 : cache 6,240 (batch 1, broadcast) + fresh 31,200 keys, 31,200 queries
  cond 16: cache 24,960 + fresh 12,480 keys, 12,480 queries
Parity first (bf16 vs an fp32 reference on sampled query rows, FlashAttention rule: our error at
most 2x cuDNN's on the same rows), then timing side by side in one run (median of CUDA-event
timings after warm-up, triton.testing.do_bench):
  cudnn_prebuilt   SDPA cuDNN on pre-built rotated q and concatenated K, V (no other work)
  unfused          repeat batch-1 cache + cat + fp32 eager RoPE over q and all keys + SDPA cuDNN
  triton_op        attn_with_kv_cache_triton(rope=rope): k rope kernel + fused attention (q rope
                   inside), on normed q/k
  cudnn_op         attn_with_kv_cache_cudnn(rope=rope): rope prologue + two cuDNN calls (queries over
                   the cache, over the fresh keys) merged by lse, no KV copy
  cudnn_split_norm qk_norm_rope_triton + attn_with_kv_cache_cudnn(rope=None) (the DiT's path)
  triton_norm      qk_norm_rope_triton (RMSNorm+RoPE) + attn_with_kv_cache_triton(rope=None)
  cudnn_norm       qk_norm_rope_triton writing k into a KV buffer tail + v/cache copies + one cuDNN
                   call (the previous route, for comparison)
  prefix_*         cache-off rule: prefix_attn_triton vs two cuDNN calls, S = cache + fresh
Also sweeps the attention kernel's launch shapes and the prologue's tile shape (times per config
in the JSON) and times the main table with the best ones.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys

import torch
import triton
from triton.testing import do_bench

from longcat_kernels.ops.kv_cache_attn import triton as kvt
from longcat_kernels.ops.rope import triton as rpt

GRID_HW = (30, 52)  # 480p latent frame
T_TOTAL = 24


def _Rope(grid, head_dim, device):
    from longcat_kernels.ops.rope.api import Rope3D
    return Rope3D(grid, head_dim, device=device)


def rope_eager_fp32(x, cos, sin):
    """Unfused baseline RoPE: fp32 eager over [B, S, H, D], interleaved pairs, cast back."""
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1).flatten(-2).to(x.dtype)


def rmsnorm_eager(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def sdpa_cudnn(q, k, v, scale):
    return kvt._sdpa_cudnn(q, k, v, scale)


def ref_rows(q, K, V, rows, scale):
    """fp32 attention for query rows `rows` of q [B,Sq,H,D] over K, V [B,Sk,H,D] -> [B,r,H,D]."""
    outs = []
    for b in range(q.shape[0]):
        qb = q[b, rows].float().transpose(0, 1)  # [H, r, D]
        kb = K[b].float().transpose(0, 1)  # [H, Sk, D]
        vb = V[b].float().transpose(0, 1)
        p = torch.softmax(qb @ kb.transpose(1, 2) * scale, -1)
        outs.append((p @ vb).transpose(0, 1))
        del p
    return torch.stack(outs)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def machine_header():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except Exception as e:  # pragma: no cover
            return f"n/a ({e})"
    return {
        "gpu": torch.cuda.get_device_name(),
        "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": sh("git rev-parse HEAD 2>/dev/null") or "n/a (tree copy)",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_case(name, c, B=2, H=32, D=128, dtype=torch.bfloat16, reps_ms=2000, sweep_ms=400,
             bsa=False):
    dev = "cuda"
    hw = GRID_HW[0] * GRID_HW[1]
    Sc, Sn = c * hw, (T_TOTAL - c) * hw
    scale = D ** -0.5
    rope = _Rope((T_TOTAL, *GRID_HW), D, dev)
    tabs_all = rope.tables(0, T_TOTAL)
    cos_f, sin_f = rope.tables(c, T_TOTAL - c)
    g = torch.Generator(device=dev).manual_seed(1234 + c)

    # fused-projection layout: q, k, v are strided views of one [B, Sn, 3, H, D] tensor
    qkv = torch.randn(B, Sn, 3, H, D, device=dev, dtype=dtype, generator=g)
    q_raw, k_raw, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    qw = (1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(dtype)
    kw = (1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(dtype)
    # normed q, k (input of the op-level variants); cache: batch 1, already rotated
    qn, kn = rmsnorm_eager(q_raw, qw), rmsnorm_eager(k_raw, kw)
    k_cache_raw = torch.randn(1, Sc, H, D, device=dev, dtype=dtype, generator=g)
    k_cache = rope_eager_fp32(k_cache_raw, *rope.tables(0, c))
    v_cache = torch.randn(1, Sc, H, D, device=dev, dtype=dtype, generator=g)

    # pre-built inputs for cuDNN alone (rotated q, concatenated batch-B K, V; contiguous)
    q_rot = rope_eager_fp32(qn, cos_f, sin_f).contiguous()
    k_rot = rope_eager_fp32(kn, cos_f, sin_f)
    K = torch.cat([k_cache.expand(B, -1, -1, -1), k_rot], 1).contiguous()
    V = torch.cat([v_cache.expand(B, -1, -1, -1), v], 1).contiguous()
    out_case = {"shape": {"B": B, "H": H, "D": D, "Sc": Sc, "Sn": Sn, "Sq": Sn, "Sk": Sc + Sn,
                          "dtype": str(dtype)}}
    flops = 4 * B * H * Sn * (Sc + Sn) * D

    # ---------------- parity ----------------
    rows = torch.cat([torch.arange(0, 64), torch.randint(0, Sn, (192,), generator=None),
                      torch.arange(Sn - 64, Sn)]).to(dev)
    ref = ref_rows(q_rot, K, V, rows, scale)
    o_cudnn = sdpa_cudnn(q_rot, K, V, scale)
    err_base = rel(o_cudnn[:, rows], ref)
    par = {"cudnn_prebuilt_vs_fp32": err_base}

    def check(label, out, base=err_base):
        assert not torch.isnan(out).any(), f"{label}: NaN in output"
        e = rel(out[:, rows], ref)
        par[label] = e
        ok = e <= 2 * base + 1e-4 and e < 1e-2
        print(f"  parity {name} {label:14s} rel_l2 {e:.3e} (cuDNN {base:.3e}) "
              f"{'ok' if ok else 'FAIL'}", flush=True)
        return ok

    ok = True
    # poison then run (outputs are fresh allocations; poison the KV buffers via NaN caches)
    o = kvt.attn_with_kv_cache_triton(qn, kn, v, k_cache, v_cache, rope, scale)
    ok &= check("triton_op", o)
    o = kvt.attn_with_kv_cache_cudnn(qn, kn, v, k_cache, v_cache, rope, scale)
    ok &= check("cudnn_op", o)
    o = kvt.attn_with_kv_cache_cudnn(q_rot, k_rot, v, k_cache, v_cache, None, scale)
    ok &= check("cudnn_split", o)
    # prologue (norm + rope) parity against eager: should be exact up to rare 1-ulp roundings
    pq, pk = rpt.qk_norm_rope_triton(q_raw, k_raw, qw, kw, rope, c, 1e-6)
    par["prologue_q_vs_eager"] = rel(pq, q_rot)
    par["prologue_k_vs_eager"] = rel(pk, k_rot)
    par["prologue_q_maxabs"] = (pq.float() - q_rot.float()).abs().max().item()
    print(f"  parity {name} prologue q {par['prologue_q_vs_eager']:.2e} k "
          f"{par['prologue_k_vs_eager']:.2e} maxabs {par['prologue_q_maxabs']:.2e}", flush=True)
    ok &= par["prologue_q_vs_eager"] < 4e-3 and par["prologue_k_vs_eager"] < 4e-3
    o = kvt.attn_with_kv_cache_triton(pq, pk, v, k_cache, v_cache, None, scale)
    ok &= check("triton_norm", o)
    # prefix (cache off): rows >= P against the same reference (keys = all)
    qfull = torch.cat([q_rot.new_zeros(B, Sc, H, D).normal_(generator=g), q_rot], 1)
    o = kvt.prefix_attn_triton(qfull, K, V, Sc, scale)
    ok &= check("prefix_triton", o[:, Sc:])
    ref_p = ref_rows(qfull[:, :Sc], K[:, :Sc], V[:, :Sc], torch.arange(0, Sc, 97, device=dev),
                     scale)
    e_p = rel(o[:, :Sc][:, ::97], ref_p)
    e_pb = rel(sdpa_cudnn(qfull[:, :Sc], K[:, :Sc], V[:, :Sc], scale)[:, ::97], ref_p)
    par["prefix_triton_cond_rows"] = e_p
    print(f"  parity {name} prefix cond rows {e_p:.3e} (cuDNN {e_pb:.3e})", flush=True)
    ok &= e_p <= 2 * e_pb + 1e-4
    o = kvt.prefix_attn_cudnn(qfull, K, V, Sc, scale)
    ok &= check("prefix_cudnn", o[:, Sc:])
    # public API, backend="auto" (routes through the measured-faster implementation)
    from longcat_kernels import attn_with_kv_cache
    o = attn_with_kv_cache(qn, kn, v, k_cache, v_cache, rope=rope, scale=scale)
    ok &= check("api_auto", o)
    out_case["parity"] = par
    out_case["parity_ok"] = bool(ok)
    ref_keep = ref
    del o
    if not ok:
        print(f"  {name}: parity FAILED, not timing", flush=True)
        return out_case

    # ---------------- sweeps (launch shapes), then the main table with the best ones ----------
    sweep = {}
    for cfg in kvt.ATTN_CONFIG_SWEEP:
        kvt._CONFIG_OVERRIDE = cfg
        try:
            o = kvt.attn_with_kv_cache_triton(q_rot, k_rot, v, k_cache, v_cache, None, scale)
            e = rel(o[:, rows], ref_keep)
            ms = do_bench(lambda: kvt.attn_with_kv_cache_triton(q_rot, k_rot, v, k_cache, v_cache,
                                                                None, scale),
                          warmup=100, rep=sweep_ms, return_mode="median")
            sweep[str(cfg)] = {"ms": ms, "rel_l2": e}
            print(f"  sweep {name} attn {cfg} {ms:8.2f} ms rel {e:.2e}", flush=True)
        except Exception as ex:  # a config that does not compile/fit is reported, not fatal
            sweep[str(cfg)] = {"error": f"{type(ex).__name__}: {str(ex)[:200]}"}
            print(f"  sweep {name} attn {cfg} failed: {type(ex).__name__}", flush=True)
    ok_cfgs = [(v_["ms"], k_) for k_, v_ in sweep.items() if "ms" in v_ and v_["rel_l2"] < 1e-2]
    best_cfg = eval(min(ok_cfgs)[1]) if ok_cfgs else None
    kvt._CONFIG_OVERRIDE = best_cfg
    out_case["attn_config_sweep"] = sweep
    out_case["attn_config_best"] = best_cfg
    psweep = {}
    for bs in (16, 32, 64):
        for hpp in (1, 4, 8, 32):
            rpt.PROLOGUE_BLOCK_S, rpt.PROLOGUE_HEADS_PER_PROG = bs, hpp
            ms = do_bench(lambda: rpt.qk_norm_rope_triton(q_raw, k_raw, qw, kw, rope, c, 1e-6),
                          warmup=50, rep=200, return_mode="median")
            psweep[f"{bs}x{hpp}"] = ms
    best_p = min(psweep, key=psweep.get)
    print(f"  sweep {name} prologue " + " ".join(f"{k_}:{v_:.3f}" for k_, v_ in psweep.items()),
          flush=True)
    rpt.PROLOGUE_BLOCK_S, rpt.PROLOGUE_HEADS_PER_PROG = map(int, best_p.split("x"))
    pq, pk = rpt.qk_norm_rope_triton(q_raw, k_raw, qw, kw, rope, c, 1e-6)
    assert rel(pq, q_rot) < 4e-3 and rel(pk, k_rot) < 4e-3, "prologue parity after sweep"
    out_case["prologue_sweep_ms"] = psweep
    out_case["prologue_best"] = best_p
    prologue_bytes = 2 * 2 * B * Sn * H * D * 2  # read + write q and k, bf16
    out_case["prologue_gbps"] = prologue_bytes / psweep[best_p] / 1e6

    # ---------------- timing ----------------
    kbuf = torch.empty(B, Sc + Sn, H, D, device=dev, dtype=dtype)
    vbuf = torch.empty_like(kbuf)

    def unfused():
        Kc = torch.cat([k_cache_raw.repeat(B, 1, 1, 1), kn], 1)
        Vc = torch.cat([v_cache.repeat(B, 1, 1, 1), v], 1)
        qq = rope_eager_fp32(qn, cos_f, sin_f)
        kk = rope_eager_fp32(Kc, *tabs_all)
        return sdpa_cudnn(qq, kk, Vc, scale)

    def cudnn_norm():
        kbuf[:, :Sc].copy_(k_cache.expand(B, -1, -1, -1))
        vbuf[:, :Sc].copy_(v_cache.expand(B, -1, -1, -1))
        qq, _ = rpt.qk_norm_rope_triton(q_raw, k_raw, qw, kw, rope, c, 1e-6, out_k=kbuf[:, Sc:])
        vbuf[:, Sc:].copy_(v)
        return sdpa_cudnn(qq, kbuf, vbuf, scale)

    def cudnn_norm_persistent():
        # a caller that keeps the [cache; fresh] buffer across steps: cache part written once
        qq, _ = rpt.qk_norm_rope_triton(q_raw, k_raw, qw, kw, rope, c, 1e-6, out_k=kbuf[:, Sc:])
        vbuf[:, Sc:].copy_(v)
        return sdpa_cudnn(qq, kbuf, vbuf, scale)

    def cudnn_split_norm():
        # what the DiT runs: qk_norm_rope, then the cuDNN route without rope (two calls + merge)
        qq, kk = rpt.qk_norm_rope_triton(q_raw, k_raw, qw, kw, rope, c, 1e-6)
        return kvt.attn_with_kv_cache_cudnn(qq, kk, v, k_cache, v_cache, None, scale)

    def triton_norm():
        qq, kk = rpt.qk_norm_rope_triton(q_raw, k_raw, qw, kw, rope, c, 1e-6)
        return kvt.attn_with_kv_cache_triton(qq, kk, v, k_cache, v_cache, None, scale)

    qh, Kh, Vh = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q_rot, K, V))
    cases = {
        "cudnn_prebuilt": lambda: sdpa_cudnn(q_rot, K, V, scale),
        "cudnn_prebuilt_bhsd": lambda: sdpa_cudnn(qh, Kh, Vh, scale),
        "unfused": unfused,
        "triton_op": lambda: kvt.attn_with_kv_cache_triton(qn, kn, v, k_cache, v_cache, rope,
                                                           scale),
        "cudnn_op": lambda: kvt.attn_with_kv_cache_cudnn(qn, kn, v, k_cache, v_cache, rope, scale),
        "triton_attn_only": lambda: kvt.attn_with_kv_cache_triton(q_rot, k_rot, v, k_cache,
                                                                  v_cache, None, scale),
        "prologue_only": lambda: rpt.qk_norm_rope_triton(q_raw, k_raw, qw, kw, rope, c, 1e-6),
        "triton_norm": triton_norm,
        "cudnn_norm": cudnn_norm,
        "cudnn_split_norm": cudnn_split_norm,
        "cudnn_split_attn_only": lambda: kvt.attn_with_kv_cache_cudnn(q_rot, k_rot, v, k_cache, v_cache, None, scale),
        "cudnn_norm_persistent_buf": cudnn_norm_persistent,
        "prefix_triton": lambda: kvt.prefix_attn_triton(qfull, K, V, Sc, scale),
        "prefix_cudnn_2calls": lambda: kvt.prefix_attn_cudnn(qfull, K, V, Sc, scale),
    }
    S_all = Sc + Sn
    flops_prefix = 4 * B * H * D * (Sc * Sc + Sn * S_all)
    times = {}
    for label, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=200, rep=reps_ms, return_mode="median")
        times[label] = ms
        tf = (flops_prefix if label.startswith("prefix") else flops) / ms / 1e9
        print(f"  time {name} {label:26s} {ms:8.2f} ms  {tf:6.0f} TFLOP/s(attn)", flush=True)
    out_case["ms"] = times
    out_case["attn_flops"] = flops
    out_case["prefix_flops"] = flops_prefix
    kvt._CONFIG_OVERRIDE = None
    if bsa:
        # block-sparse over [cache; fresh] (sparsity 0.9375, chunk 4x4x4): two-segment gating +
        # kernel vs the BSA op on the explicit concatenation, same selection
        from longcat_kernels import block_sparse_attn
        gq, gk = (T_TOTAL - c, *GRID_HW), (T_TOTAL, *GRID_HW)
        sel = kvt._select_two_segments(q_rot, k_rot, k_cache, gq, gk, (4, 4, 4), (4, 4, 4),
                                       0.9375, None)
        bsp = kvt._attn_with_kv_cache_bsa
        from longcat_kernels.ops.kv_cache_attn.api import BlockSparseParams
        bsp_sel = BlockSparseParams(frame_hw=GRID_HW, selection=sel)
        bsp_gate = BlockSparseParams(sparsity=0.9375, frame_hw=GRID_HW)
        o1 = bsp(q_rot, k_rot, v, k_cache, v_cache, None, scale, bsp_sel)
        o2 = block_sparse_attn(q_rot, K, V, grid_q=gq, grid_k=gk, selection=sel, scale=scale,
                               backend="triton")
        e = rel(o1, o2)
        print(f"  bsa {name} two-segment vs BSA-on-concat rel {e:.2e}", flush=True)
        bt = {"rel_vs_bsa_on_concat": e, "density": sel.density()}
        for label, fn in {
            "kv_bsa_kernel": lambda: bsp(q_rot, k_rot, v, k_cache, v_cache, None, scale, bsp_sel),
            "kv_bsa_with_gating": lambda: bsp(q_rot, k_rot, v, k_cache, v_cache, None, scale,
                                              bsp_gate),
            "bsa_on_concat_kernel": lambda: block_sparse_attn(q_rot, K, V, grid_q=gq, grid_k=gk,
                                                              selection=sel, scale=scale,
                                                              backend="triton"),
        }.items():
            bt[label] = do_bench(fn, warmup=100, rep=reps_ms, return_mode="median")
            print(f"  time {name} {label:26s} {bt[label]:8.2f} ms", flush=True)
        out_case["block_sparse"] = bt
    return out_case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/h100/kv-cache-attn-triton-sweep_20261124_3f64ee5.json")
    ap.add_argument("--reps-ms", type=int, default=2000)
    ap.add_argument("--sweep-ms", type=int, default=400)
    ap.add_argument("--bsa", action="store_true",
                    help="also check/time the block-sparse option (not in the committed results)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"machine": machine_header(), "cases": {}}
    print(json.dumps(res["machine"]), flush=True)
    with torch.no_grad():
        for name, c in (("cond4", 4), ("cond16", 16)):
            res["cases"][name] = run_case(name, c, reps_ms=args.reps_ms, sweep_ms=args.sweep_ms,
                                         bsa=args.bsa)
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("\nsummary (ms):")
    for name, cse in res["cases"].items():
        print(name, "parity_ok", cse.get("parity_ok"))
        for k, v in cse.get("ms", {}).items():
            print(f"  {k:26s} {v:8.2f}")
    return 0 if all(c.get("parity_ok") for c in res["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(f"{__file__}: historical script, kept for the record of how its results were made; "
             "see bench/dev/README.md")
