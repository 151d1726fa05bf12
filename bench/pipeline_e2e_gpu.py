"""One end-to-end video continuation at 480p, 93 frames, real DiT width, random weights.

    PYTHONPATH=$PWD python bench/pipeline_e2e_gpu.py --out DIR --depth 2

Runs ``longcat_vc.VideoContinuationPipeline`` exactly as a user does (text encoding, VAE encode of
the cond frames, KV-cache build, denoising loop with CFG-zero, VAE decode, resize back), in both
modes (basic: enhance_hf schedule, 50 requested -> 56 steps, guidance 4.0 with the CFG batch;
distill: a random cfg-step LoRA in LongCat's file format, 16 steps, guidance 1.0), each with the KV
cache on and off, and writes the timings as JSON to ``--out``.

Components, all random (no downloads, no checkpoint):
* DiT: ``DiTConfig.longcat_video(depth=--depth)``: hidden 4096, 32 heads, text_tokens_zero_pad,
  weights ~ N(0, 1/fan_in) (nothing zero-initialised);
* VAE: ``diffusers.AutoencoderKLWan`` with the Wan 2.1 VAE config (real compute; ``--vae tiny``
  for a small one);
* text: ``transformers.UMT5EncoderModel`` at the real width (d_model 4096, 64 heads, d_ff 10240)
  with ``--text-layers`` layers (1) and a small vocabulary; a word-level tokenizer built here.

Every configuration is first run once as a warm-up (Triton compilation, cuDNN autotuning), with
the fewest steps its schedule allows; the reported run follows.

Packages: the device image has torch/transformers but not diffusers or ftfy. Pure-Python wheels
in ``.gpu_carry/vc_wheels/`` (carry that path) are put on ``sys.path`` automatically; without
ftfy a stub ``fix_text`` (identity; the prompts here are plain ASCII) is used and recorded.

``--smoke`` runs the same script on CPU with tiny everything (a test of the script itself).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES = []


def _ensure_packages() -> None:
    """Put carried pure-Python wheels on sys.path when diffusers/ftfy are not installed."""
    from bench.carried import use_carried_wheels

    from bench.carried import stub_ftfy_if_missing

    use_carried_wheels(("diffusers", "ftfy", "wcwidth"), NOTES)
    stub_ftfy_if_missing(NOTES)
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        sys.exit(
            f"pipeline_e2e_gpu: diffusers is needed for AutoencoderKLWan ({e}). Carry pure-Python wheels: "
            "pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any "
            "-d .gpu_carry/vc_wheels diffusers ftfy wcwidth   (and name .gpu_carry/vc_wheels in carry)"
        )


WORDS = ("a person rides motorcycle along long straight road between water and forested hillside "
         "the rider accelerates scenery passes camera follows bright overexposed static blurred "
         "details subtitles style worst low quality ugly").split()
PROMPT = ("A person rides a motorcycle along a long straight road between the water and a forested "
          "hillside; the camera follows the rider as the scenery passes")


def write_random_cfg_step_lora(path, config, rank, seed):
    """cfg-step LoRA targets of every block in LongCat's format (SPEC 8), small random up weights."""
    import torch
    from safetensors.torch import save_file

    h, ffn = config.hidden_size, config.ffn_hidden_size
    targets = [("attn.qkv", h, 3 * h, 3), ("attn.proj", h, h, 1), ("cross_attn.q_linear", h, h, 1),
               ("cross_attn.kv_linear", h, 2 * h, 2), ("ffn.w1", h, ffn, 1), ("ffn.w3", h, ffn, 1),
               ("ffn.w2", ffn, h, 1)]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(config.depth):
        for mod, fin, fout, n in targets:
            key = "lora___lorahyphen___" + f"blocks.{i}.{mod}".replace(".", "___lorahyphen___")
            out[key + ".lora_down.weight"] = (torch.randn(n * rank, fin, generator=g) * fin ** -0.5).to(torch.bfloat16)
            if n > 1:
                for j in range(n):
                    out[key + f".lora_up.blocks.{j}.weight"] = (torch.randn(fout // n, rank, generator=g) * 1e-2).to(torch.bfloat16)
            else:
                out[key + ".lora_up.weight"] = (torch.randn(fout, rank, generator=g) * 1e-2).to(torch.bfloat16)
            out[key + ".alpha_scale"] = torch.tensor(0.5)
    save_file(out, path)


def machine(device):
    try:
        sys.path.insert(0, REPO)
        from bench.machine import machine_header

        return machine_header(device)
    except Exception as e:  # the header is informative only
        import torch

        info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "torch": torch.__version__, "header_error": str(e)}
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
        return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the timings JSON")
    p.add_argument("--depth", type=int, default=2, help="DiT blocks (48 in the released model)")
    p.add_argument("--modes", default="basic,distill")
    p.add_argument("--cache", default="on,off", help="on, off or on,off")
    p.add_argument("--steps-basic", type=int, default=50)
    p.add_argument("--steps-distill", type=int, default=16)
    p.add_argument("--resolution", choices=("480p", "720p"), default="480p")
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--cond-frames", type=int, default=13)
    p.add_argument("--input-frames", type=int, default=None, help="input clip length (default: cond frames)")
    p.add_argument("--vae", choices=("real", "tiny"), default="real")
    p.add_argument("--text-layers", type=int, default=1)
    # free text failed in DiTConfig after the text encoder and the VAE were built
    p.add_argument("--attn-backend", choices=("auto", "torch", "triton", "cuda"), default="auto")
    p.add_argument("--bsa", action="store_true", help="block-sparse attention in the DiT")
    p.add_argument("--offload-kv-cache", action="store_true")
    p.add_argument("--fuse-lora", action="store_true", help="distill: merge the LoRA into the weights")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny components (tests the script)")
    args = p.parse_args(argv)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from bench.machine import check_script_args

    check_script_args(p, args, out="folder")
    # "--cache of" ran the cache-off run alone (any value but "on" was off), "--modes distil" failed after
    # every component was built: both lists are checked here
    for flag, value, allowed in (("--cache", args.cache, ("on", "off")), ("--modes", args.modes, ("basic", "distill"))):
        items = [x.strip() for x in value.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if not items or bad or len(set(items)) < len(items):
            p.error(f"{flag}: expected a comma-separated list of distinct values from {', '.join(allowed)}, "
                    f"got {value!r}")
    # the counts too: --steps-basic 0, --depth 0, --resolution 1080p, --input-frames 5 with 13 cond frames
    # failed (or a bare KeyError) only after every full-width component was built
    for flag, n in (("--depth", args.depth), ("--steps-basic", args.steps_basic), ("--steps-distill", args.steps_distill),
                    ("--frames", args.frames), ("--cond-frames", args.cond_frames), ("--text-layers", args.text_layers)):
        if n < 1:
            p.error(f"{flag}: expected an integer >= 1, got {n}")
    if args.input_frames is not None and args.input_frames < args.cond_frames:
        p.error(f"--input-frames: expected >= --cond-frames ({args.cond_frames}), got {args.input_frames}")
    return args


def main(argv=None):
    args = parse_args(argv)
    _ensure_packages()
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    sys.path.insert(0, REPO)
    from bench.suites.dit_common import init_random_
    from longcat_vc.testing import build_word_tokenizer
    from longcat_vc import DiTConfig, LongCatDiT
    from longcat_vc.pipeline import VideoContinuationPipeline

    os.makedirs(args.out, exist_ok=True)
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        sys.exit("pipeline_e2e_gpu: no CUDA device (use --smoke for the CPU check of the script)")
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(args.seed)

    # ---- components
    t0 = time.perf_counter()
    if smoke:
        dcfg = DiTConfig.tiny(depth=args.depth, attn_backend=args.attn_backend, text_tokens_zero_pad=True)
        text_dim, t_heads, t_dkv, t_ff = dcfg.caption_channels, 4, 8, 64
        resolution = (32, 48)
    else:
        dcfg = DiTConfig.longcat_video(depth=args.depth, attn_backend=args.attn_backend)
        text_dim, t_heads, t_dkv, t_ff = 4096, 64, 64, 10240
        resolution = args.resolution
    dit = LongCatDiT(dcfg, device=device, dtype=dtype)
    init_random_(dit, torch.Generator(device=device).manual_seed(args.seed))
    dit.eval()
    if args.vae == "tiny" or smoke:
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    else:
        vae = AutoencoderKLWan()  # the Wan 2.1 VAE config (base_dim 96, dim_mult [1,2,4,4], 2 res blocks)
    vae = vae.to(device=device, dtype=dtype).eval()
    tcfg = UMT5Config(vocab_size=len(WORDS) + 8, d_model=text_dim, d_kv=t_dkv, d_ff=t_ff,
                      num_layers=args.text_layers, num_heads=t_heads, feed_forward_proj="gated-gelu",
                      relative_attention_num_buckets=32, relative_attention_max_distance=128)
    text_encoder = UMT5EncoderModel(tcfg).to(device=device, dtype=dtype).eval()
    work = tempfile.mkdtemp(prefix="vc_e2e_")
    tokenizer = build_word_tokenizer(os.path.join(work, "tokenizer"), WORDS)
    lora_path = os.path.join(work, "cfg_step_lora.safetensors")
    write_random_cfg_step_lora(lora_path, dcfg, rank=8 if smoke else 128, seed=args.seed + 1)
    pipe = VideoContinuationPipeline(dit, vae, text_encoder, tokenizer, {"shift": 12.0, "num_train_timesteps": 1000})
    pipe.dit.load_lora(lora_path, "cfg_step_lora")
    build_s = time.perf_counter() - t0

    # ---- input clip, already at the bucket size (no resize)
    if isinstance(resolution, str):
        from longcat_vc.pipeline import BUCKETS

        h, w = BUCKETS[resolution]["0.58"] if resolution == "480p" else BUCKETS[resolution]["0.54"]
    else:
        h, w = resolution
    n_in = args.input_frames or args.cond_frames
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, ((xx + yy) // 2 + i) % 256], -1)
                       for i in range(n_in)]).astype(np.uint8)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    caches = [c.strip() == "on" for c in args.cache.split(",") if c.strip()]
    frames_arg = min(args.frames, 13) if smoke else args.frames
    cond_arg = min(args.cond_frames, 5) if smoke else args.cond_frames
    steps = {"basic": args.steps_basic, "distill": args.steps_distill}
    if smoke:
        steps = {"basic": 1, "distill": 2}
        frames = frames[:max(cond_arg, 5)]
    common = dict(resolution=resolution, num_frames=frames_arg, num_cond_frames=cond_arg, use_bsa=args.bsa,
                  offload_kv_cache=args.offload_kv_cache, progress=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runs = []
    latents = {}
    first = True
    for mode in modes:
        pipe.set_mode(mode, fuse_lora=args.fuse_lora and mode == "distill")
        for cache in caches:
            if not args.no_warmup:
                sync()
                tw = time.perf_counter()
                pipe(frames, PROMPT, num_inference_steps=1, use_kv_cache=cache,
                     generator=torch.Generator(device=device).manual_seed(args.seed),
                     output_type="np" if first else "latent", **common)
                sync()
                print(f"warm-up {mode} cache={'on' if cache else 'off'}: {time.perf_counter() - tw:.1f} s", flush=True)
                first = False
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = pipe(frames, PROMPT, num_inference_steps=steps[mode], use_kv_cache=cache,
                       generator=torch.Generator(device=device).manual_seed(args.seed), **common)
            t = dict(out.timings)
            st = t.pop("denoise_steps")
            row = {
                "mode": mode,
                "kv_cache": cache,
                "guidance": 4.0 if mode == "basic" else 1.0,
                "steps": t["steps"],
                "size_hw": list(out.size),
                "num_frames": frames_arg,
                "num_cond_frames": cond_arg,
                "batch": 2 if mode == "basic" else 1,
                "seconds": {k: v for k, v in t.items() if isinstance(v, float)},
                "step_s_median": statistics.median(st),
                "step_s_first": st[0],
                "step_s_min": min(st),
                "kv_cache_bytes": t.get("kv_cache_bytes", 0),
                "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
                "finite": bool(np.isfinite(out.frames).all()) and bool(torch.isfinite(out.latents).all()),
                "output_frames": int(out.frames.shape[0]),
            }
            latents[(mode, cache)] = out.latents.float().cpu()
            runs.append(row)
            s = row["seconds"]
            print(f"{mode:7s} cache={'on ' if cache else 'off'} steps {row['steps']:3d}  text {s['text']:.2f}  "
                  f"vae-enc {s['vae_encode']:.2f}  cache {s['cache_build']:.2f}  denoise {s['denoise']:.2f} "
                  f"({row['step_s_median'] * 1e3:.0f} ms/step median)  decode {s['decode']:.2f}  "
                  f"total {s['total']:.2f} s  peak {row['peak_memory_gib'] or 0:.1f} GiB", flush=True)

    summary = {}
    for mode in modes:
        on = next((r for r in runs if r["mode"] == mode and r["kv_cache"]), None)
        off = next((r for r in runs if r["mode"] == mode and not r["kv_cache"]), None)
        if on and off:
            a, b = latents[(mode, True)], latents[(mode, False)]
            summary[mode] = {
                "denoise_speedup_cache": off["seconds"]["denoise"] / on["seconds"]["denoise"],
                "step_speedup_cache_median": off["step_s_median"] / on["step_s_median"],
                "total_speedup_cache": off["seconds"]["total"] / on["seconds"]["total"],
                # guidance 1 (distill): same computation; basic: CFG-zero's scale covers the cond
                # frames' predictions only with the cache off (upstream semantics), so not equal.
                "latents_rel_l2_cache_on_vs_off": float((a - b).norm() / b.norm()),
            }
            print(f"{mode}: cache speedup denoise {summary[mode]['denoise_speedup_cache']:.3f}x, "
                  f"per step {summary[mode]['step_speedup_cache_median']:.3f}x, end to end "
                  f"{summary[mode]['total_speedup_cache']:.3f}x; latents rel. L2 on vs off "
                  f"{summary[mode]['latents_rel_l2_cache_on_vs_off']:.2e}", flush=True)

    doc = {
        "benchmark": "pipeline_e2e",
        "machine": machine(device),
        "config": {
            "dit": {"hidden_size": dcfg.hidden_size, "num_heads": dcfg.num_heads, "depth": dcfg.depth,
                    "attn_backend": dcfg.attn_backend, "text_tokens_zero_pad": dcfg.text_tokens_zero_pad,
                    "bsa": args.bsa},
            "vae": "tiny" if (args.vae == "tiny" or smoke) else "Wan2.1 config, random weights",
            "text_encoder": {"d_model": text_dim, "layers": args.text_layers, "heads": t_heads, "d_ff": t_ff},
            "dtype": str(dtype).replace("torch.", ""),
            "resolution": resolution if isinstance(resolution, str) else list(resolution),
            "input_frames": int(frames.shape[0]),
            "warmup": not args.no_warmup,
            "offload_kv_cache": args.offload_kv_cache,
            "fuse_lora": args.fuse_lora,
            "smoke": smoke,
        },
        "build_s": build_s,
        "notes": NOTES,
        "runs": runs,
        "summary": summary,
    }
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.out, f"pipeline_e2e_depth{dcfg.depth}_{stamp}.json")
    from bench.writer import write_json

    write_json(path, doc, indent=2, default=str)
    print(f"wrote {path}")
    return doc


if __name__ == "__main__":
    main()
