"""Memory modes on the GPU (issue 17): peak GiB per stage and seconds per DiT step for each mode,
basic and distill, bf16 and fp8, full-size random weights, 480p 93 frames, 13 cond frames.

    PYTHONPATH=$PWD python bench/memory_modes_gpu.py --out $OUT/memory_modes.json

Check, then time. For each variant (basic: CFG batch 2; distill: batch 1 with a random rank-128
cfg-step LoRA, unfused) and each mode (resident; balanced: DiT blocks streamed one block ahead;
low: balanced + KV cache offloaded), with the process capped by
``torch.cuda.set_per_process_memory_fraction`` (resident uncapped; balanced ``--cap-gib``; low
``--cap-low-gib``): cache build, one checked step (output equal to resident bit for bit, finite),
then ``--steps`` timed steps; ``max_memory_allocated`` of the cache build and of the denoise
steps. FP8 (``longcat_vc.fp8``) resident and low: speed, and the distance to bf16 (rel L2 of one
step and of the final latents of a ``--short-steps`` Euler run from the same noise).

Text and VAE stages: measured once as a peak *above* what is resident before the stage, then
added to each mode's resident bytes at that point (the mode changes only what sits beside them).
Text: a UMT5 encoder at the real width (d_model 4096, 64 heads, d_ff 10240, vocabulary 256,384)
with ``--text-layers`` layers; resident peaks are scaled to 24 layers by the measured per-layer
bytes (said so in the JSON); streamed (diffusers group offloading, leaf level) is checked equal to
resident. VAE: the real Wan 2.1 VAE config with random weights: encode of 13 frames and decode of
93 frames at 480p, decode at 720p (704x1280) untiled and tiled.

Upstream (``--upstream`` a carried LongCat-Video checkout, ``bench/upstream.py``): its own DiT with
random weights, cache build and cached steps at the same shapes, everything resident as its
pipeline keeps it (text and VAE stages counted as in our resident mode); the distill shape runs
without its LoRA. Without ``--upstream`` the issue's figure (40.9 GiB for one 480p step) is
recorded as a reference.

Packages: diffusers and accelerate (for the VAE and the text encoder's group offloading) come from
``.gpu_carry/vc_wheels/*.whl`` when not installed (pure-Python wheels; carry that path).
``--smoke`` runs everything tiny on CPU (a test of the script).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = float(2**30)
NOTES = []


def _ensure_packages() -> None:
    from bench.carried import use_carried_wheels

    use_carried_wheels(("diffusers", "accelerate"), NOTES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--depth", type=int, default=48, help="DiT blocks (48 = the released model)")
    p.add_argument("--steps", type=int, default=2, help="timed denoising steps per case (after one checked step)")
    p.add_argument("--short-steps", type=int, default=4, help="Euler steps of the fp8-vs-bf16 short run")
    p.add_argument("--variants", default="basic,distill")
    p.add_argument("--modes", default="resident,balanced,low")
    p.add_argument("--no-fp8", action="store_true")
    p.add_argument("--cap-gib", type=float, default=24.0, help="memory cap of the balanced mode")
    p.add_argument("--cap-low-gib", type=float, default=16.0, help="memory cap of the low mode")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--vae", choices=("real", "none"), default="real")
    p.add_argument("--no-vae-720p", action="store_true")
    # free text failed in DiTConfig after the text encoder and the VAE were built
    p.add_argument("--attn-backend", choices=("auto", "torch", "triton", "cuda"), default="auto")
    p.add_argument("--upstream", default=None,
                   help="a LongCat-Video checkout (the folder holding longcat_video): its DiT step measured too")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny everything (tests the script)")
    args = p.parse_args(argv)
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from bench.machine import check_script_args

    check_script_args(p, args, out="file", upstream=True)
    # checked now, not minutes into the run: an unknown mode failed on its cap after resident had run, an
    # unknown variant ('distil') ran as basic under its own name, and a NaN, zero or negative cap raised in
    # cap_process_memory after resident (and was silently recorded with --smoke)
    for flag, given, known in (("--variants", args.variants, ("basic", "distill")),
                               ("--modes", args.modes, ("resident", "balanced", "low"))):
        bad = [v for v in given.split(",") if v and v not in known]
        if bad or not any(given.split(",")):
            p.error(f"{flag}: expected a comma-separated subset of {','.join(known)}, got {given!r}")
    for flag, gib in (("--cap-gib", args.cap_gib), ("--cap-low-gib", args.cap_low_gib)):
        if not (math.isfinite(gib) and gib > 0):
            p.error(f"{flag}: expected a finite number of GiB > 0, got {gib}")
    # --short-steps 0 compared the untouched noise with itself (fp8 vs bf16 rel L2 0.0: "identical"),
    # --text-layers 30 scaled the resident text weights to 24 layers by -6 layers (0: IndexError after
    # the DiT table), --steps -1 ran as 0: refused here (--steps 0: memory only, no seconds per step)
    for flag, n, lo, hi in (("--depth", args.depth, 1, None), ("--steps", args.steps, 0, None),
                            ("--short-steps", args.short_steps, 1, None), ("--text-layers", args.text_layers, 1, 24)):
        if n < lo or (hi is not None and n > hi):
            p.error(f"{flag}: expected an integer >= {lo}" + (f" and <= {hi}" if hi else "") + f", got {n}")
    return args


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.smoke = args.smoke
        self.device = torch.device("cpu") if self.smoke else torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.float32 if self.smoke else torch.bfloat16

    # ------------------------------------------------------------------ memory helpers
    def sync(self):
        if not self.smoke:
            self.torch.cuda.synchronize()

    def cap(self, gib):
        """Caps this process at ``gib`` GiB (None: uncapped)."""
        if self.smoke:
            return
        torch = self.torch
        gc.collect()
        torch.cuda.empty_cache()
        from bench.machine import cap_process_memory

        cap_process_memory(gib, self.device)

    def reset_peak(self):
        if not self.smoke:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self):
        return 0 if self.smoke else self.torch.cuda.memory_allocated(self.device)

    def peak(self):
        if self.smoke:
            return 0
        self.sync()
        return self.torch.cuda.max_memory_allocated(self.device)

    def now(self):
        self.sync()
        return time.perf_counter()


def build_dit(b, depth):
    import torch

    from bench.suites.dit_common import init_random_
    from longcat_vc import DiTConfig, LongCatDiT

    if b.smoke:
        cfg = DiTConfig.tiny(depth=depth, text_tokens_zero_pad=True)
    else:
        cfg = DiTConfig.longcat_video(depth=depth, attn_backend=b.args.attn_backend)
    dit = LongCatDiT(cfg, device=b.device, dtype=b.dtype)
    init_random_(dit, torch.Generator(device=b.device).manual_seed(0))
    return dit.eval().requires_grad_(False)


def make_inputs(b, cfg, batch):
    import torch

    g = torch.Generator(device=b.device).manual_seed(7)
    if b.smoke:
        T, H, W, c, L = 5, 4, 6, 2, 8
    else:
        T, H, W, c, L = 24, 60, 104, 4, 512  # 480p 93 frames, 13 cond frames
    cond = torch.randn(1, cfg.in_channels, c, H, W, generator=g, device=b.device).to(b.dtype)
    noisy = torch.randn(batch, cfg.in_channels, T - c, H, W, generator=g, device=b.device)
    text = torch.randn(batch, 1, L, cfg.caption_channels, generator=g, device=b.device).to(b.dtype)
    mask = torch.ones(batch, L, dtype=torch.long, device=b.device)
    mask[:, L // 2:] = 0
    return cond, noisy, text, mask


def run_case(b, dit, inputs, *, offload_kv, steps):
    """Cache build + one checked step + ``steps`` timed steps. Returns (record, first output on CPU)."""
    import torch

    cond, noisy, text, mask = inputs
    B = noisy.shape[0]
    t = torch.full((B,), 700.0, device=b.device)
    b.reset_peak()
    base = b.allocated()
    t0 = b.now()
    cache = dit.build_kv_cache(cond, offload=offload_kv)
    build_s = b.now() - t0
    build_peak = b.peak()
    b.reset_peak()
    out = dit(noisy, t, text, mask, kv_cache=cache)
    first = out.float().cpu()
    finite = bool(torch.isfinite(first).all())
    del out
    times = []
    for _ in range(steps):
        t0 = b.now()
        o = dit(noisy, t, text, mask, kv_cache=cache)
        times.append(b.now() - t0)
        del o
    den_peak = b.peak()
    rec = {
        "resident_before_gib": base / GiB,
        "cache_build_peak_gib": build_peak / GiB,
        "denoise_peak_gib": den_peak / GiB,
        "cache_build_s": build_s,
        "s_per_step": statistics.median(times) if times else None,
        "step_times_s": times,
        "kv_cache_gib": cache.nbytes / GiB,
        "finite": finite,
    }
    del cache
    return rec, first


def short_run(b, dit, inputs, n):
    """``n`` Euler steps (sigma 1 -> 0, cache on) from the noisy latents; final latents on CPU."""
    import torch

    from longcat_vc.schedule import euler_step

    cond, noisy, text, mask = inputs
    cache = dit.build_kv_cache(cond)
    x = noisy.float()
    sig = torch.linspace(1.0, 0.0, n + 1).tolist()
    for i in range(n):
        t = torch.full((x.shape[0],), sig[i] * 1000.0, device=b.device)
        v = dit(x.to(b.dtype), t, text, mask, kv_cache=cache)
        x = euler_step(x, v, sig[i], sig[i + 1])
    return x.cpu()


def rel_l2(a, b_):
    return float((a.double() - b_.double()).norm() / b_.double().norm())


def dit_table(b, dit, out):
    import torch

    from longcat_vc.memory import BlockStreamer

    args = b.args
    variants = [v for v in args.variants.split(",") if v]
    # resident first (given order of --modes notwithstanding): the streamed modes' "equal to resident"
    # check needs its output, and was left out without a word when resident came later
    given = args.modes.split(",")
    modes = [m for m in ("resident", "balanced", "low") if m in given]
    caps = {"resident": None, "balanced": args.cap_gib, "low": args.cap_low_gib}
    cfg = dit.config
    lora_path = None
    if "distill" in variants:
        sys.path.insert(0, os.path.join(REPO, "bench"))
        from bench.pipeline_e2e_gpu import write_random_cfg_step_lora

        lora_path = os.path.join(tempfile.mkdtemp(prefix="mem_lora_"), "cfg_step_lora.safetensors")
        write_random_cfg_step_lora(lora_path, cfg, rank=8 if b.smoke else 128, seed=1)
        dit.load_lora(lora_path, "cfg_step_lora")
    inputs = {v: make_inputs(b, cfg, 2 if v == "basic" else 1) for v in variants}
    rows, ref = [], {}

    def set_variant(v):
        if v == "distill":
            dit.enable_loras(["cfg_step_lora"])
        else:
            dit.disable_loras()

    def one(label, mode, v, fp8=False):
        set_variant(v)
        b.cap(caps[mode])
        rec = {"variant": v, "mode": mode, "fp8": fp8, "cap_gib": caps[mode]}
        try:
            r, first = run_case(b, dit, inputs[v], offload_kv=(mode == "low"), steps=args.steps)
            rec.update(r)
            key = (v, fp8)
            if mode == "resident" and key not in ref:
                ref[key] = first
            if key in ref and mode != "resident":
                rec["equal_to_resident"] = bool(torch.equal(first, ref[key]))
                rec["max_abs_diff_vs_resident"] = float((first - ref[key]).abs().max())
            if fp8 and (v, False) in ref:
                rec["rel_l2_step_vs_bf16"] = rel_l2(first, ref[(v, False)])
        except Exception as e:  # a mode that does not fit its cap is a result, not a crash
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rec["traceback"] = traceback.format_exc(limit=3)
        b.cap(None)
        rows.append(rec)
        print(f"[{label}] {json.dumps({k: v_ for k, v_ in rec.items() if k != 'traceback'})}", flush=True)

    streamer = None
    bf16_short = {}
    for mode in modes:
        if mode == "resident":
            if streamer is not None:
                streamer.detach(b.device)
                streamer = None
        elif streamer is None:
            streamer = BlockStreamer(dit, b.device).attach()
            b.cap(None)
        for v in variants:
            one("bf16", mode, v)
        if mode == "resident" and not args.no_fp8 and "distill" in variants:
            set_variant("distill")
            bf16_short["distill"] = short_run(b, dit, inputs["distill"], args.short_steps)
    if not args.no_fp8:
        from longcat_vc.fp8 import fp8_supported, quantize_dit_fp8

        if streamer is not None:
            streamer.detach(b.device)
            streamer = None
        if not (fp8_supported(b.device) or b.smoke):
            NOTES.append("fp8 skipped: device has no fp8 GEMMs (needs sm89+)")
        else:
            t0 = time.perf_counter()
            dit.disable_loras()
            quantize_dit_fp8(dit, device=b.device, emulate=b.smoke)
            out["fp8_quantize_s"] = time.perf_counter() - t0
            gc.collect()
            if not b.smoke:
                torch.cuda.empty_cache()
            for mode in ("resident", "low"):
                if mode == "low":
                    streamer = BlockStreamer(dit, b.device).attach()
                for v in variants:
                    one("fp8", mode, v, fp8=True)
            if streamer is not None:
                streamer.detach(b.device)
            if bf16_short:
                set_variant("distill")
                fp8_short = short_run(b, dit, inputs["distill"], args.short_steps)
                out["fp8_short_run"] = {"variant": "distill", "steps": args.short_steps,
                                        "rel_l2_final_latents_vs_bf16": rel_l2(fp8_short, bf16_short["distill"]),
                                        "finite": bool(torch.isfinite(fp8_short).all())}
    out["dit_rows"] = rows
    # speed ratios
    res = {(r["variant"], r["fp8"]): r.get("s_per_step") for r in rows if r["mode"] == "resident"}
    for r in rows:
        base = res.get((r["variant"], False))
        if base and r.get("s_per_step"):
            r["time_vs_bf16_resident"] = r["s_per_step"] / base  # target <= 1.3 for balanced/low
            r["speedup_vs_bf16_resident"] = base / r["s_per_step"]  # target >= 1.2 for fp8 resident
    return dit


def upstream_table(b, out, path):
    """Upstream's DiT (its own code, random weights, everything resident as its pipeline keeps it):
    cache build (``return_kv=True, skip_crs_attn=True`` on the cond latents, batch 1, as upstream's
    ``_cache_clean_latents``) and cached denoising steps, peak GiB and seconds, per variant shape
    (basic: CFG batch 2; distill: batch 1, without its LoRA)."""
    import torch

    from bench.upstream import upstream_dit
    from longcat_vc import DiTConfig

    args = b.args
    cfg = (DiTConfig.tiny(depth=args.depth, text_tokens_zero_pad=True) if b.smoke
           else DiTConfig.longcat_video(depth=args.depth))
    rows = []
    try:
        up, note = upstream_dit(path, cfg, b.device, b.dtype, generator=torch.Generator(device=b.device).manual_seed(0))
    except Exception as e:  # reported, our numbers stand
        out["upstream"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
        print(f"[upstream] unavailable: {out['upstream']['error']}", flush=True)
        return
    out["upstream"] = {"note": note, "weights_gib": sum(p.numel() * p.element_size() for p in up.parameters()) / GiB}
    for v in [v for v in args.variants.split(",") if v]:
        cond, noisy, text, mask = make_inputs(b, cfg, 2 if v == "basic" else 1)
        B, c, T = noisy.shape[0], cond.shape[2], noisy.shape[2]
        rec = {"variant": v, "mode": "upstream", "fp8": False, "cap_gib": None}
        try:
            b.reset_peak()
            base = b.allocated()
            t0 = b.now()
            empty = torch.zeros(1, 1, text.shape[2], cfg.caption_channels, device=b.device, dtype=b.dtype)
            _, kv = up(hidden_states=cond, timestep=torch.zeros(1, c, device=b.device, dtype=b.dtype),
                       encoder_hidden_states=empty, return_kv=True, skip_crs_attn=True)
            build_s = b.now() - t0
            build_peak = b.peak()
            ts = torch.full((B, T), 700.0, device=b.device, dtype=b.dtype)
            b.reset_peak()
            times = []
            for i in range(args.steps + 1):  # the first is a warm-up
                t0 = b.now()
                o = up(hidden_states=noisy.to(b.dtype), timestep=ts, encoder_hidden_states=text,
                       encoder_attention_mask=mask, num_cond_latents=c, kv_cache_dict=kv)
                if i:
                    times.append(b.now() - t0)
                finite = bool(torch.isfinite(o).all())
                del o
            rec.update({
                "resident_before_gib": base / GiB,
                "cache_build_peak_gib": build_peak / GiB,
                "denoise_peak_gib": b.peak() / GiB,
                "cache_build_s": build_s,
                "s_per_step": statistics.median(times) if times else None,
                "step_times_s": times,
                "kv_cache_gib": sum(x.numel() * x.element_size() for pair in kv.values() for x in pair) / GiB,
                "finite": finite,
            })
            del kv
        except Exception as e:  # upstream's own limits (e.g. memory) are a result
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rec["traceback"] = traceback.format_exc(limit=4)
        rows.append(rec)
        print(f"[upstream] {json.dumps({k: v_ for k, v_ in rec.items() if k != 'traceback'})}", flush=True)
    ours = {r["variant"]: r.get("s_per_step") for r in out.get("dit_rows", [])
            if r["mode"] == "resident" and not r["fp8"]}
    for r in rows:
        if ours.get(r["variant"]) and r.get("s_per_step"):
            r["ours_resident_speedup"] = r["s_per_step"] / ours[r["variant"]]
    out["upstream"]["rows"] = rows
    out.setdefault("dit_rows", []).extend(rows)
    del up
    gc.collect()
    if not b.smoke:
        torch.cuda.empty_cache()


def text_stage(b, out):
    """Peak of encoding 2 prompts x 512 tokens above what was resident: resident vs streamed."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from longcat_vc.memory import offload_text_encoder

    L = b.args.text_layers
    if b.smoke:
        tcfg = UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=L, num_heads=4)
        n_tok = 16
    else:
        tcfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=L, num_heads=64,
                          feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                          relative_attention_max_distance=128)
        n_tok = 512
    torch.manual_seed(0)
    te = UMT5EncoderModel(tcfg).to(dtype=b.dtype).eval()
    ids = torch.randint(0, tcfg.vocab_size, (2, n_tok))
    mask = torch.ones_like(ids)
    per_layer = sum(p.numel() * p.element_size() for p in te.encoder.block[-1].parameters())
    weights = sum(p.numel() * p.element_size() for p in te.parameters())
    rec = {"layers_measured": L, "weights_measured_gib": weights / GiB, "per_layer_gib": per_layer / GiB}
    with torch.no_grad():
        te.to(b.device)
        b.reset_peak()
        base = b.allocated()
        t0 = b.now()
        ref = te(input_ids=ids.to(b.device), attention_mask=mask.to(b.device)).last_hidden_state.float().cpu()
        rec["resident_s"] = b.now() - t0
        rec["resident_peak_above_gib"] = (b.peak() - base) / GiB
        te.to("cpu")
        gc.collect()
        if not b.smoke:
            torch.cuda.empty_cache()
        offload_text_encoder(te, b.device)
        b.reset_peak()
        base = b.allocated()
        t0 = b.now()
        got = te(input_ids=ids.to(b.device), attention_mask=mask.to(b.device)).last_hidden_state.float().cpu()
        rec["streamed_s"] = b.now() - t0
        rec["streamed_peak_above_gib"] = (b.peak() - base) / GiB
    rec["streamed_equal_to_resident"] = bool(torch.equal(got, ref))
    scale = 24 - L
    rec["weights_gib_scaled_24_layers"] = (weights + scale * per_layer) / GiB
    rec["resident_total_gib_scaled_24_layers"] = rec["weights_gib_scaled_24_layers"] + rec["resident_peak_above_gib"]
    rec["note"] = (f"measured with {L} of 24 layers at the real width and vocabulary; resident weights scaled by "
                   f"{scale} x per-layer bytes (activations are freed layer by layer: not scaled); streamed "
                   "does not grow with layers (one leaf at a time)")
    out["text"] = rec
    del te
    gc.collect()


def vae_stage(b, out):
    import torch
    from diffusers import AutoencoderKLWan

    if b.smoke:
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        sizes = {"480p": (32, 48)}
        n_cond, n_frames = 5, 5
    else:
        vae = AutoencoderKLWan()
        sizes = {"480p": (480, 832)}
        if not b.args.no_vae_720p:
            sizes["720p"] = (704, 1280)
        n_cond, n_frames = 13, 93
    vae = vae.to(device=b.device, dtype=b.dtype).eval()
    rec = {"weights_gib": sum(p.numel() * p.element_size() for p in vae.parameters()) / GiB}
    with torch.no_grad():
        h, w = sizes["480p"]
        px = torch.rand(1, 3, n_cond, h, w, device=b.device, dtype=b.dtype) * 2 - 1
        b.reset_peak()
        base = b.allocated()
        t0 = b.now()
        vae.encode(px).latent_dist.sample()
        rec["encode_480p_s"] = b.now() - t0
        rec["encode_480p_peak_above_gib"] = (b.peak() - base) / GiB
        del px
        for name, (h, w) in sizes.items():
            for tiled in ((False, True) if name == "720p" else (False,)):
                if tiled:
                    vae.enable_tiling()
                z = torch.randn(1, 16, (n_frames - 1) // 4 + 1, h // 8, w // 8, device=b.device, dtype=b.dtype)
                b.reset_peak()
                base = b.allocated()
                t0 = b.now()
                try:
                    vae.decode(z, return_dict=False)[0]
                    key = f"decode_{name}{'_tiled' if tiled else ''}"
                    rec[key + "_s"] = b.now() - t0
                    rec[key + "_peak_above_gib"] = (b.peak() - base) / GiB
                except Exception as e:
                    rec[f"decode_{name}{'_tiled' if tiled else ''}_error"] = f"{type(e).__name__}: {e}"[:300]
                del z
                if tiled:
                    vae.disable_tiling()
    out["vae"] = rec
    del vae
    gc.collect()


def stage_table(b, out):
    """Per mode: peak GiB per stage = what the mode keeps resident at that stage + the stage's peak."""
    from longcat_vc.memory import estimate_peak_bytes

    rows = out.get("dit_rows", [])
    text, vae = out.get("text", {}), out.get("vae", {})
    table = {}
    for r in rows:
        if "error" in r:
            continue
        key = f"{r['variant']}/{r['mode']}{'/fp8' if r['fp8'] else ''}"
        dit_res = r["resident_before_gib"]  # DiT weights (all, or the non-block part) + inputs
        # upstream's pipeline keeps every component on the GPU: as our resident mode
        resident_like = r["mode"] in ("resident", "upstream")
        text_res = 0.0 if not resident_like else text.get("weights_gib_scaled_24_layers", 0.0)
        vae_w = vae.get("weights_gib", 0.0)
        # resident: the encoder's (scaled) weights sit there all along, plus its activations;
        # streamed: the measured peak includes the onloaded leaves.
        t_peak = (text_res + text["resident_peak_above_gib"] if resident_like and text
                  else text.get("streamed_peak_above_gib"))
        row = {
            "text": None if t_peak is None else dit_res + vae_w + t_peak,
            "vae_encode": None if "encode_480p_peak_above_gib" not in vae else
            dit_res + text_res + vae_w + vae["encode_480p_peak_above_gib"],
            "cache_build": r["cache_build_peak_gib"] + text_res + vae_w,
            "denoise": r["denoise_peak_gib"] + text_res + vae_w,
            "decode": None if "decode_480p_peak_above_gib" not in vae else
            dit_res + text_res + vae_w + vae["decode_480p_peak_above_gib"],
            "s_per_step": r["s_per_step"],
        }
        row["peak"] = max(v for k, v in row.items() if k != "s_per_step" and v is not None)
        table[key] = row
    out["stage_table_gib"] = table
    if rows and not b.smoke:
        from longcat_vc import DiTConfig

        cfg = DiTConfig.longcat_video(depth=b.args.depth)
        out["estimate_gib"] = {m: {k: v / GiB for k, v in estimate_peak_bytes(cfg, m).items()}
                               for m in ("resident", "balanced", "low")}


def print_table(out):
    t = out.get("stage_table_gib", {})
    cols = ["text", "vae_encode", "cache_build", "denoise", "decode", "peak", "s_per_step"]
    print(f"{'case':24s} " + " ".join(f"{c:>11s}" for c in cols))
    for k, row in t.items():
        cells = [("-" if row[c] is None else f"{row[c]:.2f}") for c in cols]
        print(f"{k:24s} " + " ".join(f"{c:>11s}" for c in cells))
    if "fp8_short_run" in out:
        print("fp8 short run:", out["fp8_short_run"])


def main(argv=None):
    args = parse_args(argv)
    _ensure_packages()
    import torch

    sys.path.insert(0, REPO)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("memory_modes_gpu: no CUDA device (use --smoke for the CPU check of the script)")
    b = Bench(args)
    out = {"args": vars(args), "notes": NOTES,
           "upstream_reference": {"480p_step_peak_gib": 40.9, "source": "issue 17, measured on the H200 earlier"}}
    try:
        from bench.machine import machine_header

        out["machine"] = machine_header(b.device)
    except Exception as e:  # informative only
        out["machine"] = {"error": str(e)}
    t_all = time.perf_counter()
    with torch.no_grad():
        dit = build_dit(b, args.depth)
        out["dit_weights_gib"] = sum(p.numel() * p.element_size() for p in dit.parameters()) / GiB
        dit = dit_table(b, dit, out)
        del dit
        gc.collect()
        if not args.smoke:
            torch.cuda.empty_cache()
        if args.upstream:
            upstream_table(b, out, args.upstream)
        text_stage(b, out)
        if args.vae == "real":
            vae_stage(b, out)
    stage_table(b, out)
    out["total_s"] = time.perf_counter() - t_all
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from bench.writer import write_json

    write_json(args.out, out, indent=2, default=str)
    print_table(out)
    print(f"wrote {args.out} ({out['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
