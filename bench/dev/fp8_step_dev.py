"""Issue 17: where the FP8 step's time goes, and what the fused quantisation and fast accumulation buy.

One call, real width (hidden 4096, FFN 11008), ``--depth`` blocks (default 6), 480p 93 frames,
13 cond frames (4 cond latents), B2 CFG, cache on, random weights:

1. GEMMs alone at the step's shapes (M = 62,400): bf16 ``F.linear`` vs fp8 ``torch._scaled_mm``
   row-wise (fast accumulation off / on), and the activation quantisation kernel
   (``longcat_kernels.fp8_quantize_rows``) at each GEMM's input.
2. The DiT step, median of ``--reps`` CUDA-event timings over two input sets, each checked (rel L2
   of the step output vs bf16):
   ``bf16``; ``fp8`` (the product: quantisation fused into modulate / LayerNorm / SwiGLU gate,
   ``use_fast_accum``); ``fp8 exact-accum`` (``longcat_vc.fp8.FAST_ACCUM = False``);
   ``fp8 unfused`` (every ``Fp8Linear`` quantises its own input: the blocks' fusions off).
3. One torch-profiler pass of the bf16 and the fp8 step: CUDA time by kernel family, top kernels.

History: the first run (commit 69537f5, before the fused kernels existed) measured the fusions as
monkeypatched variants over ``torch.compile``d quantisation: fp8 1.134x, +FFN sharing 1.141x,
+modulate fusion 1.157x, +fast accumulation 1.184x (H200, depth 6; the call's files were lost
with the workstation before they were committed: the figures are from its printed output).
With the fused kernels (commit 4f49ced, H200, ``bench/results/h200/fp8-step_20261204_4f49ced.*``):
bf16 681.3 ms, fp8 556.7 ms (1.224x), exact-accum 573.1 (1.189x), unfused 576.5 (1.182x), rel L2
vs bf16 0.029; fp8 GEMMs 1,174-1,330 TF/s vs bf16 684-711; attention is 366 of the fp8 step's
547 profiled ms.

Run: ``PYTHONPATH=$PWD python bench/dev/fp8_step_dev.py --out $OUT/fp8_step.json``;
``--smoke`` runs the logic tiny on CPU (emulated fp8, no timing meaning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    return p.parse_args()


def quant_rows(x):
    import longcat_kernels as lk

    return lk.fp8_quantize_rows(x)


def main():
    args = parse_args()
    smoke = args.smoke
    dev = torch.device("cpu" if smoke else "cuda")
    dt = torch.float32 if smoke else torch.bfloat16
    from bench.machine import machine_header

    out = {"machine": machine_header(dev), "depth": args.depth}

    XQ = quant_rows

    def cuda_time(fn, sets, reps):
        if smoke:
            t0 = time.perf_counter()
            for i in range(2):
                fn(*sets[i % len(sets)])
            return (time.perf_counter() - t0) / 2 * 1e3, []
        for i in range(3):
            fn(*sets[i % len(sets)])
        torch.cuda.synchronize()
        ts = []
        for i in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(*sets[i % len(sets)])
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts), ts

    # ------------------------------------------------------------------ 1. GEMMs alone
    M = 64 if smoke else 62400
    shapes = {"qkv": (4096, 12288), "proj/q/out": (4096, 4096), "w1/w3": (4096, 11008), "w2": (11008, 4096)}
    if smoke:
        shapes = {k: (64, 48) for k in shapes}
    gem = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (K, N) in shapes.items():
        xs = [torch.randn(M, K, device=dev, generator=g).to(dt) for _ in range(2)]
        w = (torch.randn(N, K, device=dev, generator=g) * K ** -0.5).to(dt)
        wq, sw = quant_rows(w.float())
        sw = sw.view(1, -1)
        qs = [quant_rows(x) for x in xs]
        flops = 2 * M * K * N
        row = {"M": M, "K": K, "N": N}
        t, _ = cuda_time(lambda x: F.linear(x, w), [(x,) for x in xs], args.reps * 2)
        row["bf16_ms"] = t
        for fa in (False, True):
            if smoke:
                continue
            t, _ = cuda_time(lambda a, s: torch._scaled_mm(a, wq.t(), scale_a=s, scale_b=sw, out_dtype=dt,
                                                           use_fast_accum=fa), qs, args.reps * 2)
            row[f"fp8{'_fa' if fa else ''}_ms"] = t
        t, _ = cuda_time(XQ, [(x,) for x in xs], args.reps * 2)
        row["quantize_ms"] = t
        for k in ("bf16_ms", "fp8_ms", "fp8_fa_ms"):
            if k in row:
                row[k.replace("_ms", "_tflops")] = flops / (row[k] * 1e-3) / 1e12
        gem[name] = row
        print("gemm", name, json.dumps(row), flush=True)
    out["gemms"] = gem

    # ------------------------------------------------------------------ 2. the step
    from bench.suites.dit_common import init_random_
    from longcat_vc import DiTConfig, LongCatDiT
    from longcat_vc import fp8 as F8
    from longcat_vc.modules import block as blk

    cfg = (DiTConfig.tiny(depth=args.depth, text_tokens_zero_pad=True) if smoke
           else DiTConfig.longcat_video(depth=args.depth))
    dit = LongCatDiT(cfg, device=dev, dtype=dt)
    init_random_(dit, torch.Generator(device=dev).manual_seed(0))
    dit.eval().requires_grad_(False)
    T, H, W, c, L = (5, 4, 6, 2, 8) if smoke else (24, 60, 104, 4, 512)
    sets = []
    for seed in (1, 2):
        gg = torch.Generator(device=dev).manual_seed(seed)
        cond = torch.randn(1, cfg.in_channels, c, H, W, generator=gg, device=dev).to(dt)
        noisy = torch.randn(2, cfg.in_channels, T - c, H, W, generator=gg, device=dev).to(dt)
        text = torch.randn(2, 1, L, cfg.caption_channels, generator=gg, device=dev).to(dt)
        mask = torch.ones(2, L, dtype=torch.long, device=dev)
        mask[:, L // 2:] = 0
        sets.append((cond, noisy, text, mask))
    tt = torch.full((2,), 700.0, device=dev)

    def step_fn(cache, noisy, text, mask):
        return dit(noisy, tt, text, mask, kv_cache=cache)

    def step_sets():
        return [(dit.build_kv_cache(cd), nz, tx, mk) for cd, nz, tx, mk in sets]

    results = {}

    def run_case(label, ref=None):
        ss = step_sets()
        first = step_fn(*ss[0]).float()
        med, ts = cuda_time(step_fn, ss, args.reps)
        rec = {"ms_per_step": med, "ms_per_block": med / args.depth, "times_ms": ts,
               "finite": bool(torch.isfinite(first).all())}
        if ref is not None:
            rec["rel_l2_vs_bf16"] = float((first.double() - ref.double()).norm() / ref.double().norm())
        results[label] = rec
        print("step", label, json.dumps({k: v for k, v in rec.items() if k != "times_ms"}), flush=True)
        del ss
        return first

    ref = run_case("bf16")
    F8.quantize_dit_fp8(dit, device=dev, emulate=smoke)
    run_case("fp8", ref)

    orig_kind = blk.fp8_input_kind
    try:
        F8.FAST_ACCUM = False
        run_case("fp8 exact-accum", ref)
        F8.FAST_ACCUM = True
        blk.fp8_input_kind = lambda *m: None
        run_case("fp8 unfused", ref)
    finally:
        F8.FAST_ACCUM = True
        blk.fp8_input_kind = orig_kind
    out["steps"] = results
    base = results["bf16"]["ms_per_step"]
    out["speedup_vs_bf16"] = {k: base / v["ms_per_step"] for k, v in results.items()}
    print("speedup vs bf16", json.dumps(out["speedup_vs_bf16"]), flush=True)

    # ------------------------------------------------------------------ 3. profile
    if not (smoke or args.no_profile):
        from torch.profiler import ProfilerActivity, profile

        def families(label, setup, teardown):
            setup()
            ss = step_sets()
            step_fn(*ss[0])
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step_fn(*ss[0])
                torch.cuda.synchronize()
            teardown()
            fam, top = {}, []
            for ev in prof.key_averages():
                us = getattr(ev, "device_time_total", None)
                if us is None:
                    us = getattr(ev, "cuda_time_total", 0)
                if not us:
                    continue
                n = ev.key
                ln = n.lower()
                if "gemm" in ln or "xmma" in ln or "cutlass" in ln or "sm90" in ln and "mma" in ln or "nvjet" in ln:
                    k = "gemm"
                elif "fmha" in ln or "flash" in ln or "cudnn" in ln or "attn" in ln or "_fwd" in ln:
                    k = "attention"
                elif "triton" in ln:
                    k = "triton (fused islands, quantise, prologue)"
                else:
                    k = "other"
                fam[k] = fam.get(k, 0.0) + us / 1e3
                top.append((us / 1e3, n[:120]))
            top.sort(reverse=True)
            rec = {"family_ms": fam, "top": top[:25]}
            print("profile", label, json.dumps(fam), flush=True)
            return rec

        prof_out = {"fp8": families("fp8", lambda: None, lambda: None)}
        out["profile"] = prof_out

    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
