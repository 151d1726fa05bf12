"""Issue 17: where the FP8 step's time goes, and which fusions close the gap to the GEMM bound.

One call, real width (hidden 4096, FFN 11008), ``--depth`` blocks (default 6), 480p 93 frames,
13 cond frames (4 cond latents), B2 CFG, cache on, random weights:

1. GEMMs alone at the step's shapes (M = 62,400): bf16 ``F.linear`` vs fp8 ``torch._scaled_mm``
   row-wise (fast accumulation off / on), and the per-token activation quantisation kernel.
2. The DiT step, median of ``--reps`` CUDA-event timings over two input sets, for
   bf16 and the fp8 variants below (each checked: rel L2 of the step output vs bf16).
3. One torch-profiler pass per chosen case: CUDA time by kernel family.

Variants (monkeypatched here; the winner moves into ``longcat_vc.fp8``):
  ``fp8``          the product path at this commit (one compiled quantise per linear)
  ``fp8+ffn``      FFN: one quantisation of x for w1 and w3, ``silu(a) * b`` fused with the
                   quantisation of w2's input (the bf16 [M, F] product never written)
  ``fp8+ffn+mod``  also adaLN ``modulate`` fused with the quantisation of the qkv and FFN inputs,
                   and the cross-attention LayerNorm with q_linear's
  ``... +fa``      the same with ``use_fast_accum=True`` (Hopper fp8 accumulation without the
                   periodic fp32 promotion: faster, less exact)

Run: ``PYTHONPATH=$PWD python bench/dev/fp8_step_dev.py --out $OUT/fp8_step.json``;
``--smoke`` runs the logic tiny on CPU (eager, emulated numbers, no timing meaning).
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

E4M3 = torch.float8_e4m3fn
QMAX = 448.0


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    return p.parse_args()


# --------------------------------------------------------------------------- fused pieces
def _q(y):
    """fp32 rows -> (e4m3, fp32 scale [.., 1]) with the product's rule."""
    amax = y.abs().amax(dim=-1, keepdim=True)
    s = amax.clamp(min=1e-12) / QMAX
    return (y / s).clamp(-QMAX, QMAX).to(E4M3), s


def modulate_quant(x, shift, scale, eps: float, dt: torch.dtype):
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    y = (y * (scale + 1) + shift).to(dt).float()  # rounded as the unfused path rounds
    return _q(y)


def layernorm_quant(x, w, b, eps: float, dt: torch.dtype):
    y = F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), eps).to(dt).float()
    return _q(y)


def silu_mul_quant(a, b):
    y = (F.silu(a) * b).float()  # silu_mul in the activation dtype, as the unfused path
    return _q(y)


def quant_rows(x):
    return _q(x.float())


class QAct:
    """A pre-quantised activation: ``xq [M, K]`` e4m3, ``sx [M, 1]``, logical ``shape``."""

    def __init__(self, xq, sx, shape):
        self.xq, self.sx, self.shape = xq, sx, tuple(shape)


def main():
    args = parse_args()
    smoke = args.smoke
    dev = torch.device("cpu" if smoke else "cuda")
    dt = torch.float32 if smoke else torch.bfloat16
    out = {"device": "cpu" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": os.environ.get("LONGCAT_KERNELS_BENCH_COMMIT", "?"), "depth": args.depth}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass

    comp = (lambda f: f) if smoke else (lambda f: torch.compile(f, dynamic=True, fullgraph=True))
    MQ, LQ, SQ, XQ = comp(modulate_quant), comp(layernorm_quant), comp(silu_mul_quant), comp(quant_rows)

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
        wq, sw = _q(w.float())
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
    from longcat_vc.modules.norms import gated_residual

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

    # ---- the patches
    orig_lin_fwd = F8.Fp8Linear.forward
    orig_ffn_fwd = blk.FeedForwardSwiGLU.forward
    orig_block_fwd = blk.LongCatBlock.forward
    state = {"fa": False}

    def lin_forward(self, x):
        if isinstance(x, QAct):
            xq, sx, shp = x.xq, x.sx, x.shape
        elif state["fa"]:
            shp = x.shape
            xq, sx = XQ(x.reshape(-1, shp[-1]))
        else:
            return orig_lin_fwd(self, x)
        bias = None if self.bias is None else self.bias.to(dt)
        if smoke:
            y = F.linear(xq.float() * sx, self.dequantized_weight()).to(dt)
            y = y if bias is None else y + bias
        else:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale[None, :], bias=bias,
                                 out_dtype=dt, use_fast_accum=state["fa"])
        return y.view(*shp[:-1], y.shape[-1])

    def ffn_forward(self, x):
        if isinstance(x, QAct):
            q = x
        else:
            xq, sx = XQ(x.reshape(-1, x.shape[-1]))
            q = QAct(xq, sx, x.shape)
        a, b = self.w1(q), self.w3(q)
        hq, sh = SQ(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
        return self.w2(QAct(hq, sh, a.shape))

    def block_forward(self, x, t, y, y_mask, plan, layer):
        B, N, C = x.shape
        T_ = plan.grid[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t)
        xv = x.view(B, T_, -1, C)
        xq, sx = MQ(xv, shift_msa, scale_msa, 1e-6, dt)
        a = self.attn(QAct(xq.view(-1, C), sx.view(-1, 1), (B, N, C)), plan, layer)
        x = gated_residual(xv, gate_msa, a.view(B, T_, -1, C)).view(B, N, C)
        if not plan.skip_cross:
            assert not plan.prefix_tokens
            nrm = self.pre_crs_attn_norm
            lq, ls = LQ(x, nrm.weight, nrm.bias, nrm.eps, dt)
            x = x + self.cross_attn(QAct(lq.view(-1, C), ls.view(-1, 1), (B, N, C)), y, y_mask)
        xv = x.view(B, T_, -1, C)
        fq, fs = MQ(xv, shift_mlp, scale_mlp, 1e-6, dt)
        f = self.ffn(QAct(fq.view(-1, C), fs.view(-1, 1), (B, N, C)))
        return gated_residual(xv, gate_mlp, f.view(B, T_, -1, C)).view(B, N, C)

    F8.Fp8Linear.forward = lin_forward
    try:
        blk.FeedForwardSwiGLU.forward = ffn_forward
        run_case("fp8+ffn", ref)
        blk.LongCatBlock.forward = block_forward
        run_case("fp8+ffn+mod", ref)
        state["fa"] = True
        run_case("fp8+ffn+mod+fa", ref)
        blk.FeedForwardSwiGLU.forward = orig_ffn_fwd
        blk.LongCatBlock.forward = orig_block_fwd
        run_case("fp8+fa", ref)
        state["fa"] = False
    finally:
        F8.Fp8Linear.forward = orig_lin_fwd
        blk.FeedForwardSwiGLU.forward = orig_ffn_fwd
        blk.LongCatBlock.forward = orig_block_fwd
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

        prof_out = {}
        prof_out["fp8"] = families("fp8", lambda: None, lambda: None)

        def on():
            F8.Fp8Linear.forward = lin_forward
            blk.FeedForwardSwiGLU.forward = ffn_forward
            blk.LongCatBlock.forward = block_forward

        def off():
            F8.Fp8Linear.forward = orig_lin_fwd
            blk.FeedForwardSwiGLU.forward = orig_ffn_fwd
            blk.LongCatBlock.forward = orig_block_fwd

        prof_out["fp8+ffn+mod"] = families("fp8+ffn+mod", on, off)
        out["profile"] = prof_out

    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
