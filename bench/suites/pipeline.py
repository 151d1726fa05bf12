"""VC denoising loop, cache on vs off: the DiT part of the pipeline end to end.

Runs LongCat's sampler (``longcat_vc.schedule``: timesteps, Euler steps, CFG-zero) over random
latents with the benchmark DiT (random weights) in ``distill`` mode (16 steps, guidance 1, batch 1;
CFG-zero with batch 2 runs for modes with guidance > 1, see ``MODES``). Cache on includes the
cache build, as the pipeline does it once per video. Text encoding and VAE are not included (they
are the same with and without the cache). Parity: final latents on vs off.

``refine``: the 720p refinement stage's loop (SPEC 11): batch 1, guidance 1, BSA on, the
``t_thresh`` 0.5 schedule (5 steps), on the refine grid (GPU: 48 latents of which 8 cond, 44x80
tokens per frame; CPU: the CPU grid with 4 cond latents and BSA sparsity 0.5 so blocks are kept).
"""

from __future__ import annotations

import dataclasses

import torch

from bench.shapes import cond_latents
from bench.suites import Case, Prepared, fmt, rel_l2, render_table
from bench.suites import dit_common as dc
from bench.timing import ms_cell

NAME = "pipeline"
SHIFT = 12.0  # published scheduler config (SPEC 7)
# basic mode (enhance_hf, 56 steps, guidance 4, CFG batch 2) would cost ~3.5 min at depth 8 on an
# H100: add it here as dict(steps=50, guidance=4.0, schedule="enhance_hf") for a long run.
MODES = {"distill": dict(steps=16, guidance=1.0, schedule="distill"),
         "refine": dict(steps=50, guidance=1.0, schedule="refine", t_thresh=0.5)}
TOL = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}  # errors compound over steps


def _schedule(mode: str, steps: int):
    from longcat_vc.schedule import vc_timesteps

    if MODES[mode]["schedule"] == "refine":
        from longcat_vc.refine import refine_timesteps

        return refine_timesteps(SHIFT, steps, MODES[mode]["t_thresh"])
    return vc_timesteps(steps, SHIFT, MODES[mode]["schedule"])


def _denoise(model, s, c, timesteps, sigmas, guidance, use_cache, dtype, bsa=False):
    old = model.config.enable_bsa
    model.config.enable_bsa = bsa
    try:
        return _denoise_loop(model, s, c, timesteps, sigmas, guidance, use_cache, dtype)
    finally:
        model.config.enable_bsa = old


def _denoise_loop(model, s, c, timesteps, sigmas, guidance, use_cache, dtype):
    from longcat_vc.schedule import cfg_zero, euler_step

    x = s["noisy"][:1].float()  # [1, 16, Tn, H, W]
    cond = s["cond"]
    cfg = guidance > 1
    B = 2 if cfg else 1
    text, mask = s["text"][:B], s["mask"][:B]
    cache = model.build_kv_cache(cond) if use_cache else None
    T = c + x.shape[2]
    for i, t in enumerate(timesteps.tolist()):
        xin = x.to(dtype).expand(B, -1, -1, -1, -1)
        if use_cache:
            tt = torch.full((B, T - c), t, device=x.device)
            pred = model(xin, tt, text, mask, kv_cache=cache)
        else:
            tt = torch.full((B, T), t, device=x.device)
            tt[:, :c] = 0
            full = torch.cat([cond.expand(B, -1, -1, -1, -1), xin], dim=2)
            pred = model(full, tt, text, mask, num_cond_latents=c)[:, :, c:]
        pred = cfg_zero(pred[:1], pred[1:], guidance) if cfg else pred
        x = euler_step(x, pred, float(sigmas[i]), float(sigmas[i + 1]))
    return x


def cases(ctx) -> list[Case]:
    base = dc.default_config(ctx, batch=2)
    frames = 13 if 13 in ctx.cond_frames else ctx.cond_frames[0]
    c = cond_latents(frames)
    modes = ["distill", "refine"]
    steps_override = 2 if ctx.quick else (None if ctx.is_cuda else 4)
    ctx.log(base.describe() + f"; cond {frames} frames ({c} latents); modes {modes}"
            + (f", {steps_override} steps" if steps_override else ""))
    out = []
    c_vc = c
    for mode in modes:
        m = MODES[mode]
        refine = m["schedule"] == "refine"
        steps = m["steps"] if refine else (steps_override or m["steps"])
        timesteps, sigmas = _schedule(mode, steps)
        guidance = m["guidance"]
        B = 2 if guidance > 1 else 1
        bc = dataclasses.replace(base, batch=max(B, 1))
        c = c_vc
        if refine:
            from bench.shapes import Grid

            if ctx.is_cuda and not ctx.quick and not ctx.grids:
                bc = dataclasses.replace(bc, grid=Grid("refine-720p", 48, 44, 80))
                c = 8
            else:
                c = 4
                bsa = dict(bc.dit.bsa_params or {}, sparsity=0.5)
                bc = dataclasses.replace(bc, dit=dataclasses.replace(bc.dit, bsa_params=bsa))
        params = dict(grid=str(bc.grid), mode_name=mode, steps=len(timesteps), guidance=guidance, batch=B,
                      cond_frames=(26 if c == 8 else frames) if refine else frames, cond_latents=c,
                      depth=bc.dit.depth, config=bc.name, bsa=refine)
        key = ("pipe-check", mode)

        def check(bc=bc, timesteps=timesteps, sigmas=sigmas, guidance=guidance, key=key, c=c, refine=refine):
            if key not in ctx.shared:
                model = dc.build_model(ctx, bc)
                s = dc.make_inputs(ctx, bc, c, 1, offset=21)[0]
                with torch.no_grad():
                    off = _denoise(model, s, c, timesteps, sigmas, guidance, False, ctx.dtype, refine)
                    on = _denoise(model, s, c, timesteps, sigmas, guidance, True, ctx.dtype, refine)
                ctx.shared[key] = (rel_l2(on, off), TOL.get(ctx.dtype, 3e-2))
            return ctx.shared[key]

        for use_cache in (False, True):
            def prep(bc=bc, timesteps=timesteps, sigmas=sigmas, guidance=guidance, use_cache=use_cache,
                     check=check, c=c, refine=refine):
                model = dc.build_model(ctx, bc)
                sets = dc.make_inputs(ctx, bc, c, 1, offset=22)

                def fn(s):
                    with torch.no_grad():
                        _denoise(model, s, c, timesteps, sigmas, guidance, use_cache, ctx.dtype, refine)

                # the parity check runs both loops once: that is the warm-up
                pol = ctx.policy(warmup=0, min_reps=1, max_reps=3, budget_s=15.0)
                pol = dataclasses.replace(pol, warmup=0)
                return Prepared(fn=fn, inputs=[(s,) for s in sets], check=check, policy=pol,
                                extra=dict(steps=len(timesteps)))

            name = f"{mode}/{'on' if use_cache else 'off'}"
            out.append(Case(NAME, name, bc.dit.attn_backend, dict(params, cache="on" if use_cache else "off"), prep))
    return out


def finish(ctx, rows: list[dict]) -> list[dict]:
    by = {(r.get("mode_name"), r.get("cache")): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["ms_per_step"] = r["ms"] / r["steps"]
        off = by.get((r.get("mode_name"), "off"))
        if r.get("cache") == "on" and off is not None:
            r["speedup"] = off["ms"] / r["ms"]
    return rows


def table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        body.append([r.get("mode_name", "-"), fmt(r.get("steps")), fmt(r.get("batch")), fmt(r.get("cond_frames")),
                     r.get("cache", "-"), ms_cell(r, ".0f") if ok else r.get("status", "-").upper(),
                     ms_cell(r, ".1f", "ms_per_step"), fmt(r.get("speedup"), ".2f"), fmt(r.get("rel_l2"), ".1e"),
                     "" if ok else str(r.get("reason", ""))[:60]])
    return render_table(["mode", "steps", "batch", "cond fr.", "cache", "total ms", "ms/step", "speedup",
                         "rel.L2", "note"], body)
