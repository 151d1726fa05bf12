"""Context-parallel scaling of the LongCat DiT: per-step time on 1, 2, 4, ... GPUs of one host.

    # one configuration per launch (N = 1, 2, 4, 8); rank 0 writes $OUT/cp_scaling_w{N}[_cfg].json
    PYTHONPATH=$PWD torchrun --nproc-per-node N bench/dev/cp_scaling_gpu.py --out $OUT [--cfg-parallel]
    python bench/dev/cp_scaling_gpu.py --summarize $OUT     # speedup and efficiency table (+ JSON)

What is timed: one DiT forward of a basic-mode step (CFG batch 2) with the KV cache on, 480p
(480x832 -> 30x52 tokens per frame), 93 frames (24 latent frames: 4 cond + 20 noisy), the real
width (hidden 4096, 32 heads) and ``--depth`` blocks (48 = the 13.6B model), random weights
(identical on every rank: initialised on rank 0's generator and broadcast), bf16. Also the cache
build. CUDA-event timing around each call after ``--warmup`` calls, median of ``--iters``.

Parity before timing (refuses to report on failure): rank 0 also runs the single-GPU forward
(context parallel off) on the same inputs; the sharded output must match it to rel. L2 < 2e-2
(bf16, different reduction order around the all-to-all-free parts is identical, so the difference
is bf16 rounding of attention over differently laid-out heads: usually 0). N = 1 runs the plain
model (the baseline users get without context parallelism).

NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set by
default (``longcat_vc.parallel.set_multigpu_env_defaults``). ``--smoke``: tiny model on CPU with
gloo (a test of the script itself).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="folder for the JSON (rank 0 writes)")
    p.add_argument("--summarize", metavar="DIR", help="read cp_scaling_w*.json in DIR and print the table")
    p.add_argument("--depth", type=int, default=48)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--cond-frames", type=int, default=13)
    p.add_argument("--batch", type=int, default=2, help="2 = CFG batch (basic mode), 1 = distill")
    p.add_argument("--cfg-parallel", action="store_true")
    p.add_argument("--bsa", action="store_true", help="block-sparse attention")
    p.add_argument("--backend", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo)")
    return p.parse_args(argv)


def summarize(folder: str) -> dict:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "cp_scaling_w*.json"))):
        with open(path) as f:
            d = json.load(f)
        rows.append({"gpus": d["world_size"], "cfg_parallel": d["cfg_parallel"], "step_ms": d["step_ms"],
                     "cache_build_ms": d["cache_build_ms"], "file": os.path.basename(path)})
    base = next((r for r in rows if r["gpus"] == 1), None)
    for r in rows:
        if base:
            r["speedup"] = base["step_ms"] / r["step_ms"]
            r["efficiency"] = r["speedup"] / r["gpus"]
    rows.sort(key=lambda r: (r["cfg_parallel"], r["gpus"]))
    print(f"{'GPUs':>4} {'cfg':>4} {'step ms':>10} {'speedup':>8} {'eff.':>6} {'cache build ms':>15}")
    for r in rows:
        sp = f"{r['speedup']:.2f}" if "speedup" in r else "-"
        ef = f"{r['efficiency']:.2f}" if "efficiency" in r else "-"
        print(f"{r['gpus']:>4} {('yes' if r['cfg_parallel'] else 'no'):>4} {r['step_ms']:>10.1f} {sp:>8} {ef:>6} "
              f"{r['cache_build_ms']:>15.1f}")
    out = {"rows": rows, "baseline": base}
    with open(os.path.join(folder, "cp_scaling_summary.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if not args.out:
        raise SystemExit("--out is required")
    sys.path.insert(0, REPO)
    import torch
    import torch.distributed as dist

    from bench.suites.dit_common import init_random_
    from longcat_vc import DiTConfig, LongCatDiT
    from longcat_vc.parallel import init_distributed, set_multigpu_env_defaults

    set_multigpu_env_defaults()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu") if args.smoke else None
    run = init_distributed(world, device, timeout_s=1800) if world > 1 else None
    if run is not None:
        device = run.device
    elif device is None:
        device = torch.device("cuda")
    rank = 0 if run is None else run.rank
    from bench.machine import machine_header

    machine = machine_header(device)  # before the timing: a bad LONGCAT_KERNELS_BENCH_COMMIT stops the run now
    smoke = args.smoke
    dtype = torch.float32 if smoke else torch.bfloat16

    if smoke:
        cfg = DiTConfig.tiny(hidden_size=128, num_heads=4, depth=2)
        H, W, F, CF = 32, 48, 9, 5
    else:
        cfg = DiTConfig.longcat_video(depth=args.depth)
        H, W, F, CF = args.height, args.width, args.frames, args.cond_frames
    cfg.attn_backend = args.backend
    cfg.enable_bsa = bool(args.bsa)
    t_lat = (F - 1) // 4 + 1
    c = 1 + (CF - 1) // 4
    h, w = H // 8, W // 8

    model = LongCatDiT(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        init_random_(model, g)
        if run is not None:
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
        B = args.batch
        x = torch.randn(B, 16, t_lat - c, h, w, generator=g, device=device, dtype=torch.float32)
        cond = torch.randn(1, 16, c, h, w, generator=g, device=device, dtype=torch.float32)
        text = torch.randn(B, 1, 512, cfg.caption_channels, generator=g, device=device, dtype=dtype)
        t = torch.full((B,), 500.0, device=device)
        for tt in (x, cond, text):
            if run is not None:
                dist.broadcast(tt, src=0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if run is not None:
            dist.barrier()

    # Parity: rank 0's single-GPU forward against the sharded one.
    rel = None
    with torch.no_grad():
        if run is not None:
            ref = None
            if rank == 0:
                ref = model(x, t, text, kv_cache=model.build_kv_cache(cond))
            sync()
            model.enable_context_parallel(run.group, cfg_parallel=args.cfg_parallel)
            cache = model.build_kv_cache(cond)
            out = model(x, t, text, kv_cache=cache)
            if rank == 0:
                rel = float((out.double() - ref.double()).norm() / ref.double().norm())
                del ref
            del out
            flag = torch.tensor([0 if rel is None or rel < 2e-2 else 1], device=device)
            dist.broadcast(flag, src=0)
            if flag.item():
                if rank == 0:
                    print(f"cp_scaling: parity FAILED (rel L2 {rel:.3e}); not reporting", file=sys.stderr)
                return 1
        else:
            cache = model.build_kv_cache(cond)

        def timed(fn, n):
            times = []
            for _ in range(n):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            return times

        for _ in range(args.warmup):
            model(x, t, text, kv_cache=cache)
        step = timed(lambda: model(x, t, text, kv_cache=cache), args.iters)
        build = timed(lambda: model.build_kv_cache(cond), max(1, args.iters // 2))

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        res = {
            "machine": machine, "world_size": world, "cfg_parallel": bool(args.cfg_parallel and world > 1),
            "backend": None if run is None else run.backend, "smoke": smoke,
            "shape": {"batch": args.batch, "latent_frames": t_lat, "cond_latents": c, "tokens_per_frame": (h // 2) * (w // 2),
                      "noisy_tokens": (t_lat - c) * (h // 2) * (w // 2), "depth": cfg.depth, "hidden": cfg.hidden_size,
                      "heads": cfg.num_heads, "dtype": str(dtype), "bsa": cfg.enable_bsa, "attn_backend": cfg.attn_backend},
            "parity_rel_l2_vs_single_gpu": rel,
            "step_ms": statistics.median(step), "step_ms_all": step,
            "cache_build_ms": statistics.median(build), "cache_build_ms_all": build,
            "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        }
        name = f"cp_scaling_w{world}{'_cfg' if res['cfg_parallel'] else ''}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(res, f, indent=2)
        print(json.dumps({k: res[k] for k in ("world_size", "cfg_parallel", "step_ms", "cache_build_ms",
                                              "parity_rel_l2_vs_single_gpu")}))
    if run is not None:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
