"""Dev script (GPU): where one DiT step's time goes, cache on vs off, and an interleaved on/off timing.

Real width (hidden 4096, 32 heads), 480p (24x30x52 latents), B2, random weights, bf16, depth 8 by
default. For each cond length: warm-up, then on/off steps timed *interleaved* (off, on, off, on, ...)
with CUDA events so clock drift hits both alike; median of N pairs and the ratio. Then one torch
profiler pass per case: CUDA time per kernel family, written as a table.

    python bench/dev/profile_dit_step_gpu.py --out $OUT/prof --cond 4,16 --pairs 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench.machine import machine_header
from bench.suites import dit_common as dc


class _Ctx:
    """The little of bench's Context that dit_common needs."""

    def __init__(self, depth: int):
        self.device = torch.device("cuda")
        self.dtype = torch.bfloat16
        self.quick = False
        self.is_cuda = True
        self.depth = depth
        self.backends = None
        self.grids = None
        self.shared = {}

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


def _family(name: str) -> str:
    n = name.lower()
    for key, fam in [("cudnn", "attention (cuDNN)"), ("flash", "attention (flash)"), ("fmha", "attention (cuDNN)"),
                     ("kv_cache", "attention (triton)"), ("_attn", "attention (triton)"), ("norm_rope", "qk norm+rope"),
                     ("gemm", "matmul"), ("sm90_xmma", "matmul"), ("nvjet", "matmul"), ("cutlass", "matmul"),
                     ("triton_", "fused islands (inductor)"), ("copy", "copies"), ("elementwise", "elementwise"),
                     ("reduce", "reductions"), ("cat", "copies")]:
        if key in n:
            return fam
    return "other"


def _gaps(prof, path: str) -> dict:
    """Idle time between consecutive GPU kernels of one profiled step (from the chrome trace)."""
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    os.remove(path)
    ks = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in ev
                if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not ks:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "n_gaps_over_50us": 0, "largest": []}
    gaps, busy, end = [], 0.0, ks[0][1]
    busy = ks[0][1] - ks[0][0]
    prev = ks[0][2]
    for t0, t1, name in ks[1:]:
        if t0 > end:
            gaps.append(((t0 - end) / 1e3, prev, name))
        busy += max(0.0, t1 - max(t0, end))
        if t1 > end:
            end, prev = t1, name
    gaps.sort(reverse=True)
    return {"span_ms": (end - ks[0][0]) / 1e3, "busy_ms": busy / 1e3, "idle_ms": sum(g[0] for g in gaps),
            "n_gaps_over_50us": sum(1 for g in gaps if g[0] > 0.05), "largest": gaps[:10]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cond", default="4,16")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ctx = _Ctx(args.depth)
    bc = dc.default_config(ctx)
    model = dc.build_model(ctx, bc)
    result = {"machine": machine_header(torch.device("cuda")), "config": bc.describe(), "cases": []}
    print(bc.describe(), flush=True)
    for c in [int(x) for x in args.cond.split(",")]:
        sets = dc.make_inputs(ctx, bc, c, 2)
        with torch.no_grad():
            cache = model.build_kv_cache(sets[0]["cond"])
            for s in sets:  # warm-up (compiles the fused islands for both shapes)
                dc.forward_off(model, s, c)
                dc.forward_on(model, s, cache)
            torch.cuda.synchronize()
            off_ms, on_ms = [], []
            for i in range(args.pairs):
                s = sets[i % len(sets)]
                for fn, acc in ((lambda: dc.forward_off(model, s, c), off_ms), (lambda: dc.forward_on(model, s, cache), on_ms)):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    fn()
                    e1.record()
                    e1.synchronize()
                    acc.append(e0.elapsed_time(e1))
            ratios = [a / b for a, b in zip(off_ms, on_ms)]
            case = {"cond_latents": c, "off_ms": off_ms, "on_ms": on_ms,
                    "off_median_ms": statistics.median(off_ms), "on_median_ms": statistics.median(on_ms),
                    "pair_ratio_median": statistics.median(ratios), "pair_ratio_min": min(ratios),
                    "pair_ratio_max": max(ratios),
                    "ideal": dc.step_flops(bc, c, cache=False) / dc.step_flops(bc, c, cache=True)}
            print(f"cond {c}: off {case['off_median_ms']:.1f} ms on {case['on_median_ms']:.1f} ms "
                  f"ratio {case['pair_ratio_median']:.3f} (min {case['pair_ratio_min']:.3f} max "
                  f"{case['pair_ratio_max']:.3f}) ideal {case['ideal']:.3f}", flush=True)
            if not args.no_profile:
                from torch.profiler import ProfilerActivity, profile

                for tag, fn in (("off", lambda: dc.forward_off(model, sets[0], c)),
                                ("on", lambda: dc.forward_on(model, sets[0], cache))):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        fn()
                        torch.cuda.synchronize()
                    fam: dict = {}
                    rows = []
                    for ev in prof.key_averages():
                        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                        if t <= 0:
                            continue
                        rows.append((t / 1e3, ev.count, ev.key[:110]))
                        f = _family(ev.key)
                        fam[f] = fam.get(f, 0.0) + t / 1e3
                    rows.sort(reverse=True)
                    case[f"profile_{tag}_gaps"] = _gaps(prof, os.path.join(args.out, f"trace_{tag}_{c}.json"))
                    g = case[f"profile_{tag}_gaps"]
                    print(f"  {tag}: kernels span {g['span_ms']:.1f} ms, busy {g['busy_ms']:.1f} ms, idle "
                          f"{g['idle_ms']:.1f} ms in {g['n_gaps_over_50us']} gaps > 50 us; largest: "
                          + "; ".join(f"{x[0]:.2f} ms after {x[1][:40]} before {x[2][:40]}" for x in g["largest"][:4]))
                    case[f"profile_{tag}_families_ms"] = dict(sorted(fam.items(), key=lambda kv: -kv[1]))
                    case[f"profile_{tag}_top"] = rows[:25]
                    print(f"  {tag}: " + ", ".join(f"{k} {v:.1f}" for k, v in case[f"profile_{tag}_families_ms"].items()))
                    for t, n, k in rows[:12]:
                        print(f"     {t:8.2f} ms x{n:4d}  {k}")
            result["cases"].append(case)
            del cache
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(os.path.join(args.out, "dit_step_profile.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
