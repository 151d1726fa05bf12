"""Refinement (SPEC 11) on the GPU: check, then time the refine step and the whole refine stage.

    PYTHONPATH=$PWD python bench/refine_step_gpu.py --out $OUT/refine_step.json \\
        [--upstream .gpu_carry/upstream] [--depths 8[,48]] [--rounds 5] [--no-stage | --no-steps]
        [--stage-depth N] [--stage-memory resident|balanced|low]

Upstream: ``git --git-dir=<LongCat-Video mirror> archive HEAD longcat_video | tar -x -C
.gpu_carry/upstream`` (ignored folder; carry it). Packages missing on the device (diffusers, ftfy,
einops) are taken from pure-Python wheels in ``.gpu_carry/vc_wheels/`` (carry that too).

1. Check (small shape, hidden 4096, depth 2, 8 latents of which 4 cond, 16x32 tokens per frame,
   BSA sparsity 0.5 so several blocks are kept): one refine DiT step with the KV cache vs without,
   in bf16 (auto backend) and fp32 (torch backend); the noise latents' predictions must agree
   (rel. L2 < 2e-2 bf16, < 1e-5 fp32). With ``--upstream``: our cache-off step vs upstream's DiT
   (its own Triton BSA) on the same weights and inputs (rel. L2, informative: block selection can
   flip on bf16 near-ties).
2. Step timings at the real shape: B1, 48 latents of which 8 cond, 44x80 tokens per frame (704x1280),
   hidden 4096, 32 heads, text 512 tokens, random weights, bf16, BSA from the released config
   (sparsity 0.9375, chunks 4x4x4): ours cache off (one forward over all 48 latents, cond at t=0),
   ours cache on (40 noise latents against the cache; the cache build timed once), and upstream's
   ``LongCatVideoTransformer3DModel`` with ``enable_bsa`` when ``--upstream`` names a checkout
   (cross-attention through flash_attn if importable, else an SDPA stand-in, recorded).
   Interleaved rounds (upstream, off, on, upstream, ...) with CUDA events; medians and ratios.
3. The whole refine stage (``pipe.refine``: text, VAE encode of 192 frames at 704x1280, cache build,
   5 steps, VAE decode) at the first depth, ours (BSA + KV cache) vs the dense path (no BSA, no
   cache), with the time per part. Real Wan 2.1 VAE config (random weights), a 1-layer UMT5 at
   width 4096, a random rank-128 refinement LoRA.

``--smoke``: CPU, tiny everything (tests the script, no timing meaning).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES = []


def _ensure_packages():
    """Carried pure-Python wheels (``.gpu_carry/vc_wheels/*.whl``: diffusers, ftfy, wcwidth, and
    einops for upstream's code) go on sys.path when the package is not installed."""
    from bench.carried import use_carried_wheels

    use_carried_wheels(("diffusers", "ftfy", "wcwidth", "einops"), NOTES)


def _ensure_text_deps():
    from bench.carried import stub_ftfy_if_missing

    _ensure_packages()
    stub_ftfy_if_missing(NOTES)


def _rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class _Timer:
    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def __call__(self, fn):
        torch = self.torch
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            return out, a.elapsed_time(b)
        t = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t) * 1e3


def _reset_peak(device):
    """Starts a peak-memory window (no-op off CUDA): a part's peak is its own, not the check's or an
    earlier depth's."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    """``max_memory_allocated`` since the last ``_reset_peak`` in GiB (None off CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _inputs(cfg, T, c, th, tw, text_len, device, dtype, seed):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, T, th * 2, tw * 2, generator=g, device=device, dtype=torch.float32).to(dtype)
    t = torch.full((1, T), 500.0, device=device, dtype=dtype)
    t[:, :c] = 0
    text = torch.randn(1, 1, text_len, cfg.caption_channels, generator=g, device=device, dtype=torch.float32).to(dtype)
    mask = torch.ones(1, text_len, device=device, dtype=torch.long)
    mask[:, text_len * 3 // 4:] = 0  # a padded prompt, as real ones are
    return dict(x=x, t=t, text=text, mask=mask)


def _upstream_dit(path, cfg, state_dict, device, dtype):
    """Upstream's DiT with BSA on, loaded strictly with ``state_dict`` (``bench/upstream.py``)."""
    from bench.upstream import upstream_dit

    m, note = upstream_dit(path, cfg, device, dtype, state_dict=state_dict, enable_bsa=True)
    if "stand-in" in note:
        note += " (cross-attention only; self-attention is upstream's BSA)"
    return m, note


def check(args, device):
    import torch

    from bench.suites.dit_common import init_random_
    from longcat_vc import DiTConfig, LongCatDiT

    res = {}
    small = dict(T=8, c=4, th=4 if args.smoke else 16, tw=8 if args.smoke else 32)
    bsa = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    runs = [("fp32", torch.float32, "torch")] + ([] if args.smoke else [("bf16", torch.bfloat16, "auto")])
    state = None
    for name, dtype, backend in runs:
        if args.smoke:
            cfg = DiTConfig.tiny(depth=2, attn_backend=backend, bsa_params=bsa, enable_bsa=True, text_tokens_zero_pad=True)
        else:
            cfg = DiTConfig.longcat_video(depth=2, attn_backend=backend, bsa_params=bsa, enable_bsa=True)
        dit = LongCatDiT(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
        init_random_(dit, torch.Generator(device=device).manual_seed(7))
        if state is None:
            state = {k: v.float().cpu() for k, v in dit.state_dict().items()}
        s = _inputs(cfg, small["T"], small["c"], small["th"], small["tw"], 64, device, dtype, 3)
        c = small["c"]
        with torch.no_grad():
            off = dit(s["x"], s["t"], s["text"], s["mask"], num_cond_latents=c)
            cache = dit.build_kv_cache(s["x"][:, :, :c])
            on = dit(s["x"][:, :, c:], s["t"][:, c:], s["text"], s["mask"], kv_cache=cache)
            dit.config.enable_bsa = False
            dense = dit(s["x"], s["t"], s["text"], s["mask"], num_cond_latents=c)
            dit.config.enable_bsa = True
        r = {"rel_l2_cache_on_vs_off": _rel(on, off[:, :, c:]), "rel_l2_bsa_vs_dense": _rel(off[:, :, c:], dense[:, :, c:]),
             "finite": bool(torch.isfinite(on).all() and torch.isfinite(off).all())}
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        # the comparison can fail: BSA must change the result by more than cache on/off does
        r["ok"] = (r["finite"] and r["rel_l2_cache_on_vs_off"] < tol
                   and r["rel_l2_bsa_vs_dense"] > max(1e-3, 3 * r["rel_l2_cache_on_vs_off"]))
        if args.upstream and dtype == torch.bfloat16:
            try:
                up, flash = _upstream_dit(args.upstream, cfg, dit.state_dict(), device, dtype)
                with torch.no_grad():
                    u = up(s["x"], s["t"], s["text"], s["mask"], num_cond_latents=c)
                r["rel_l2_ours_off_vs_upstream"] = _rel(off[:, :, c:], u[:, :, c:].float())
                r["upstream_flash"] = flash
                del up
            except Exception as e:  # reported, the rest of the script goes on
                r["upstream_error"] = f"{type(e).__name__}: {e}"
        res[name] = r
        print(f"check {name}: {json.dumps(r)}", flush=True)
        del dit, cache
    return res


def time_steps(args, device, depth):
    import torch

    from bench.suites.dit_common import init_random_
    from longcat_vc import DiTConfig, LongCatDiT

    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        cfg = DiTConfig.tiny(depth=depth, enable_bsa=True, text_tokens_zero_pad=True,
                             bsa_params={"sparsity": 0.5, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]})
        T, c, th, tw, L = 8, 4, 4, 8, 16
    else:
        cfg = DiTConfig.longcat_video(depth=depth, enable_bsa=True)
        T, c, th, tw, L = 48, 8, 44, 80, 512
    # the peak of this depth alone: without a reset it was the maximum since the process started (the
    # check's models, an earlier and deeper depth's steps)
    _reset_peak(device)
    dit = LongCatDiT(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    init_random_(dit, torch.Generator(device=device).manual_seed(11))
    s = _inputs(cfg, T, c, th, tw, L, device, dtype, 5)
    timer = _Timer(device)
    fns = {}
    with torch.no_grad():
        cache, build_ms = timer(lambda: dit.build_kv_cache(s["x"][:, :, :c]))
        cache, build_ms = timer(lambda: dit.build_kv_cache(s["x"][:, :, :c]))  # the second, warm
        fns["ours_cache_off"] = lambda: dit(s["x"], s["t"], s["text"], s["mask"], num_cond_latents=c)
        fns["ours_cache_on"] = lambda: dit(s["x"][:, :, c:], s["t"][:, c:], s["text"], s["mask"], kv_cache=cache)
        up_note = None
        if args.upstream:
            try:
                up, up_note = _upstream_dit(args.upstream, cfg, dit.state_dict(), device, dtype)
                fns["upstream"] = lambda: up(s["x"], s["t"], s["text"], s["mask"], num_cond_latents=c)
            except Exception as e:
                up_note = f"upstream unavailable: {type(e).__name__}: {e}"
        ms = {k: [] for k in fns}
        for k, fn in fns.items():  # warm-up (Triton compile, autotune)
            for _ in range(2 if not args.smoke else 1):
                try:
                    timer(fn)
                except Exception as e:
                    if k != "upstream":
                        raise
                    up_note = f"upstream failed: {type(e).__name__}: {e}"
                    ms.pop("upstream", None)
        order = [k for k in ("upstream", "ours_cache_off", "ours_cache_on") if k in ms]
        for _ in range(args.rounds):
            for k in order:
                ms[k].append(timer(fns[k])[1])
    med = {k: statistics.median(v) for k, v in ms.items()}
    row = {"depth": depth, "shape": {"batch": 1, "latents": T, "cond_latents": c, "tokens_hw": [th, tw], "text": L},
           "bsa": cfg.bsa_settings(), "median_ms": med, "all_ms": ms, "cache_build_ms": build_ms,
           "upstream_note": up_note}
    if "upstream" in med:
        row["speedup_vs_upstream"] = {k: med["upstream"] / med[k] for k in ("ours_cache_off", "ours_cache_on")}
    if device.type == "cuda":
        row["peak_memory_gib"] = _peak_gib(device)
    print(f"depth {depth}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
          + (f"; vs upstream {row['speedup_vs_upstream']}" if "speedup_vs_upstream" in row else "")
          + (f" ({up_note})" if up_note else ""), flush=True)
    del dit, cache, fns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def time_stage(args, device, depth):
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    import longcat_vc.refine as refine_mod
    from bench.suites.dit_common import init_random_
    from longcat_vc.testing import build_word_tokenizer
    from longcat_vc import DiTConfig, LongCatDiT
    from longcat_vc.pipeline import VideoContinuationPipeline

    sys.path.insert(0, os.path.join(REPO, "tests", "vc"))
    from tiny_ckpt import LORA_TARGETS_REFINEMENT, write_longcat_lora

    dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        cfg = DiTConfig.tiny(depth=depth, text_tokens_zero_pad=True,
                             bsa_params={"sparsity": 0.5, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]})
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        tcfg = dict(d_model=cfg.caption_channels, d_kv=8, d_ff=64, num_heads=4)
        n1, s1_hw, v_hw, res, rank = 6, (32, 64), (36, 64), (64, 64), 4
    else:
        cfg = DiTConfig.longcat_video(depth=depth)
        vae = AutoencoderKLWan()
        tcfg = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64)
        n1, s1_hw, v_hw, res, rank = 93, (480, 832), (720, 1280), "720p", 128
    words = "a person rides motorcycle along road water forest camera follows".split()
    work = tempfile.mkdtemp(prefix="refine_stage_")
    tok = build_word_tokenizer(os.path.join(work, "tok"), words)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(words) + 8, num_layers=1, feed_forward_proj="gated-gelu",
                                     relative_attention_num_buckets=32, relative_attention_max_distance=128, **tcfg))
    dit = LongCatDiT(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    init_random_(dit, torch.Generator(device=device).manual_seed(13))
    lora = os.path.join(work, "refinement_lora.safetensors")
    write_longcat_lora(lora, cfg, targets=LORA_TARGETS_REFINEMENT, rank=rank, scale=0.01, seed=3)
    pipe = VideoContinuationPipeline(dit, vae.to(device=device, dtype=dtype).eval(),
                                     te.to(device=device, dtype=dtype).eval(), tok, {"shift": 12.0})
    pipe.refinement_lora_path = lora
    if args.stage_memory != "resident":
        # streamed modes (issue 17: 720p refinement within 48 GiB): components go back to the CPU and
        # apply_memory_mode places them (DiT blocks streamed one ahead, text encoder while encoding)
        from longcat_vc.memory import apply_memory_mode

        dit.to("cpu")
        te.to("cpu")
        apply_memory_mode(pipe, args.stage_memory, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    yy, xx = np.mgrid[0:s1_hw[0], 0:s1_hw[1]]
    stage1 = np.stack([np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, ((xx + yy) // 2 + i) % 256], -1)
                       for i in range(n1)]).astype(np.uint8)
    vy, vx = np.mgrid[0:v_hw[0], 0:v_hw[1]]
    video = np.stack([np.stack([(vx + 5 * i) % 256, (vy + i) % 256, ((vx + vy) // 3 + i) % 256], -1)
                      for i in range(30)]).astype(np.uint8)
    nc = 10 if args.smoke else 26

    real_state = refine_mod.refine_state

    @contextlib.contextmanager
    def dense_state(p, path):  # the refinement LoRA without BSA: the dense path
        with real_state(p, path):
            p.dit.config.enable_bsa = False
            yield

    def run(kind, steps=50, frames=None):
        refine_mod.refine_state = dense_state if kind == "dense" else real_state
        try:
            out = pipe.refine(stage1 if frames is None else frames, "a person rides a motorcycle", video=video, num_cond_frames=nc, resolution=res,
                              num_inference_steps=steps, generator=1, use_kv_cache=kind == "ours", progress=False)
        finally:
            refine_mod.refine_state = real_state
        return out

    t = time.perf_counter()
    # warm-up on a short clip: the VAE's per-chunk conv shapes (it runs frame chunk by frame chunk)
    # and the text encoder; the DiT kernels at the full shape were warmed by the step timings (BSA with the
    # cache, unless --no-steps). Every timed kind is warmed: the dense path (prefix attention, no BSA, no
    # cache) ran its kernels' first-call compilation inside its timed run, inflating the speedups
    for kind in args.kinds:
        run(kind, steps=2, frames=stage1[: max(nc // 2 + 4, 9)])
    warm_s = time.perf_counter() - t
    rows = {}
    cap = None
    if device.type == "cuda" and args.stage_cap_gib is not None:
        from bench.machine import cap_process_memory

        torch.cuda.empty_cache()
        cap = cap_process_memory(args.stage_cap_gib, device)
    for kind in args.kinds:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = run(kind, steps=args.stage_steps)
        tm = {k: v for k, v in out.timings.items() if k != "denoise_steps"}
        tm["step_ms"] = [1e3 * x for x in out.timings["denoise_steps"]]
        tm["latent_shape"] = list(out.latents.shape)
        tm["output_frames"] = int(out.frames.shape[0])
        tm["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows[kind] = tm
        print(f"stage {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in tm.items() if isinstance(v, float)), flush=True)
    if cap is not None:
        cap_process_memory(None, device)
    res = {"depth": depth, "memory": args.stage_memory, "cap_gib": args.stage_cap_gib, "steps": args.stage_steps,
           "warmup_s": warm_s, "num_cond_frames": nc, "stage1_frames": n1, "runs": rows}
    if "ours" in rows and "dense" in rows:
        res["speedup_total"] = rows["dense"]["total"] / rows["ours"]["total"]
        res["speedup_denoise"] = rows["dense"]["denoise"] / rows["ours"]["denoise"]
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON path")
    p.add_argument("--upstream", default=None, help="folder holding upstream's longcat_video package")
    p.add_argument("--depths", default="8", help="comma list, e.g. 8,48")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-stage", action="store_true", help="skip the whole-stage timing")
    p.add_argument("--no-steps", action="store_true", help="skip the step timings (the stage runs at --stage-depth)")
    p.add_argument("--stage-depth", type=int, default=None, help="DiT depth of the stage run (default: first of --depths)")
    p.add_argument("--stage-memory", choices=("resident", "balanced", "low"), default="resident",
                   help="memory mode of the stage run (longcat_vc.memory); peak GiB per run is reported")
    p.add_argument("--stage-steps", type=int, default=50,
                   help="num_inference_steps of the stage runs (refinement runs the steps below t_thresh)")
    p.add_argument("--stage-kinds", default="ours,dense", help="comma list of ours (BSA + KV cache), dense")
    p.add_argument("--stage-cap-gib", type=float, default=None,
                   help="cap the process at this many GiB during the stage (set_per_process_memory_fraction)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from bench.machine import check_script_args

    check_script_args(p, args, out="file", upstream=True)
    kinds = [k for k in args.stage_kinds.split(",") if k]
    if not kinds or any(k not in ("ours", "dense") for k in kinds):
        p.error(f"--stage-kinds: expected a comma list of ours, dense; got {args.stage_kinds!r}")
    if args.stage_steps < 1:
        p.error(f"--stage-steps: expected >= 1, got {args.stage_steps}")
    if args.stage_cap_gib is not None and not args.stage_cap_gib > 0:
        p.error(f"--stage-cap-gib: expected > 0, got {args.stage_cap_gib}")
    # checked before the check run and the model builds: --rounds 0 ended in statistics.median([]) after
    # them, "--depths 8,x" in a bare int() traceback
    if args.rounds < 1:
        p.error(f"--rounds: expected >= 1, got {args.rounds}")
    try:
        args.depth_list = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        p.error(f"--depths: expected a comma list of integers >= 1, got {args.depths!r}")
    if (not args.depth_list and not args.no_steps) or any(d < 1 for d in args.depth_list):
        p.error(f"--depths: expected a comma list of integers >= 1, got {args.depths!r}")
    if args.stage_depth is not None and args.stage_depth < 1:
        p.error(f"--stage-depth: expected >= 1, got {args.stage_depth}")
    args.kinds = kinds
    sys.path.insert(0, REPO)
    _ensure_text_deps()
    import torch

    # diffusers probes for flash_attn while importing these: import them before any stand-in
    from diffusers import AutoencoderKLWan  # noqa: F401
    import diffusers.loaders.peft  # noqa: F401
    import diffusers.video_processor  # noqa: F401

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("refine_step_gpu: no CUDA device (--smoke runs the CPU check of the script)")
    # an indexed device: torch.cuda.set_per_process_memory_fraction refuses a bare "cuda"
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    try:
        from bench.machine import machine_header

        machine = machine_header(device)
    except Exception as e:
        machine = {"error": str(e)}
    from bench.writer import write_json

    doc = {"benchmark": "refine_step", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(), "machine": machine,
           "smoke": args.smoke}
    depths = args.depth_list
    stage_depth = args.stage_depth if args.stage_depth is not None else (depths[0] if depths else 8)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every part: a time-out keeps what ran
        doc["notes"] = NOTES
        write_json(args.out, doc, indent=2, default=str)  # whole: a kill mid-write kept the parts before

    doc["check"] = check(args, device)
    doc["ok"] = all(r["ok"] for r in doc["check"].values())
    save()
    if not doc["ok"]:
        print("CHECK FAILED: timings skipped", flush=True)
    else:
        if not args.no_steps:
            doc["steps"] = []
            for d in depths:
                try:
                    doc["steps"].append(time_steps(args, device, d))
                except torch.cuda.OutOfMemoryError as e:
                    doc["steps"].append({"depth": d, "error": f"OOM: {e}"})
                    torch.cuda.empty_cache()
                save()
        if not args.no_stage:
            doc["stage"] = time_stage(args, device, stage_depth)
    save()
    print(f"wrote {args.out}; check {'ok' if doc['ok'] else 'FAILED'}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
