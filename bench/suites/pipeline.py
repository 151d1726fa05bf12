"""VC denoising loop, cache on vs off: the DiT part of the pipeline end to end.

Runs LongCat's sampler (``longcat_vc.schedule``: timesteps, Euler steps, CFG-zero) over random
latents with the benchmark DiT (random weights) in ``distill`` mode (16 steps, guidance 1, batch 1;
CFG-zero with batch 2 runs for modes with guidance > 1, see ``MODES``). Cache on includes the
cache build, as the pipeline does it once per video. Text encoding and VAE are not included (they
are the same with and without the cache). Parity: final latents on vs off.

``refine``: the 720p refinement stage's loop (SPEC 11): batch 1, guidance 1, BSA on, the
``t_thresh`` 0.5 schedule (5 steps), on the refine grid (GPU: 48 latents of which 8 cond, 44x80
tokens per frame; CPU: the CPU grid with 4 cond latents and BSA sparsity 0.5 so blocks are kept;
quick: 2x2x2 chunks as well). A refine case whose selection would keep no key block (it would
time an attention that outputs zeros) is skipped with the reason (``bsa_empty_selection``).

The distill loop runs one conditioning: 13 frames when ``--cond-frames`` names it, else the first value;
each other value it names is reported as a skipped row with that reason.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.shapes import COND_FRAMES, cond_latents
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


# Refine cond frames of the GPU refine grid: SPEC 11 doubles the stage-1 13 cond frames to 26, which
# refine_padding pads to 8 cond latents.
REFINE_COND_FRAMES_GPU = 26
# The quick run's refine chunks: the tiny grid's 4 cond latents (4x2x4) are one 4x4x4 block, of which
# no sparsity > 0 keeps a block; 2x2x2 chunks give 4 cond key blocks (2 kept at sparsity 0.5).
QUICK_REFINE_CHUNK = [2, 2, 2]


def bsa_empty_selection(bc, c: int) -> str | None:
    """Why the block-sparse attention of ``bc`` with ``c`` cond latents keeps no key block in one of
    its calls (the top-k count ``int((1 - sparsity) * Nk)`` is 0: that attention outputs zeros and a
    timing of it measures nothing), or None. The calls are those of the DiT with ``enable_bsa``
    (longcat_vc.modules.attention): the cond latents over the cond grid (cache build and cache off,
    when ``c > 1``) and the noisy latents over all key frames (when more than one is noisy)."""
    from longcat_kernels.grid import total_blocks

    st = bc.dit.bsa_settings()
    if st["cdf_threshold"] is not None or st["sparsity"] is None:
        return None
    T, H, W = bc.grid.shape
    calls = []
    if c > 1:
        calls.append(("cond", (c, H, W)))
    if T - c > 1:
        calls.append(("noisy", (T, H, W)))
    for what, grid_k in calls:
        chunk = tuple(min(a, g) for a, g in zip(st["chunk_k"], grid_k))
        nk = total_blocks(grid_k, chunk)
        if int((1 - st["sparsity"]) * nk) < 1:
            return (f"BSA sparsity {st['sparsity']:g} keeps no key block of the {what} attention "
                    f"({nk} key block(s) of {'x'.join(map(str, grid_k))} with chunk {'x'.join(map(str, chunk))}): "
                    "it would output zeros")
    return None


def cases(ctx) -> list[Case]:
    configs = dc.default_configs(ctx, batch=2)
    out = []
    for base in configs:  # case names carry the grid when there are several
        out += _grid_cases(ctx, base, f"{base.grid}/" if len(configs) > 1 else "")
    return out


def _grid_cases(ctx, base, prefix: str) -> list[Case]:
    from bench.shapes import Grid

    frames = 13 if 13 in ctx.cond_frames else ctx.cond_frames[0]
    c_vc = cond_latents(frames)
    modes = ["distill", "refine"]
    steps_override = 2 if ctx.quick else (None if ctx.is_cuda else 4)
    ctx.log(base.describe() + f"; cond {frames} frames ({c_vc} latents); modes {modes}"
            + (f", {steps_override} steps" if steps_override else ""))
    out = []
    for mode in modes:
        m = MODES[mode]
        refine = m["schedule"] == "refine"
        steps = m["steps"] if refine else (steps_override or m["steps"])
        timesteps, sigmas = _schedule(mode, steps)
        guidance = m["guidance"]
        B = 2 if guidance > 1 else 1
        bc = dataclasses.replace(base, batch=max(B, 1))
        c, cond_frames = c_vc, frames
        if refine:  # the refine stage's own conditioning, whatever --cond-frames says
            if ctx.is_cuda and not ctx.quick and not ctx.grids:
                bc = dataclasses.replace(bc, grid=Grid("refine-720p", 48, 44, 80))
                c, cond_frames = 8, REFINE_COND_FRAMES_GPU
            else:
                c = 4
                cond_frames = 4 * (c - 1) + 1  # 13 frames = 4 latents
                bsa = dict(bc.dit.bsa_params or {}, sparsity=0.5)
                if ctx.quick:
                    bsa.update(chunk_3d_shape_q=QUICK_REFINE_CHUNK, chunk_3d_shape_k=QUICK_REFINE_CHUNK)
                bc = dataclasses.replace(bc, dit=dataclasses.replace(bc.dit, bsa_params=bsa))
        params = dict(grid=str(bc.grid), mode_name=mode, steps=len(timesteps), guidance=guidance, batch=B,
                      cond_frames=cond_frames, cond_latents=c, depth=bc.dit.depth, config=bc.name, bsa=refine)
        skip = None
        if not 0 < c < bc.grid.t:
            skip = f"{c} cond latents leave no noisy latent on grid {bc.grid}"
        elif refine:
            skip = bsa_empty_selection(bc, c)
        key = ("pipe-check", str(bc.grid), mode)

        def check(bc=bc, timesteps=timesteps, sigmas=sigmas, guidance=guidance, key=key, c=c, refine=refine):
            if key not in ctx.shared:
                model = dc.build_model(ctx, bc)
                s = dc.make_inputs(ctx, bc, c, 1, offset=21)[0]
                with torch.no_grad():
                    off = _denoise(model, s, c, timesteps, sigmas, guidance, False, ctx.dtype, refine)
                    on = _denoise(model, s, c, timesteps, sigmas, guidance, True, ctx.dtype, refine)
                ctx.shared[key] = (rel_l2(on, off), dc.depth_scaled_bound(TOL.get(ctx.dtype, 3e-2), ctx.dtype,
                                                                            bc.dit.depth))
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

            name = f"{prefix}{mode}/{'on' if use_cache else 'off'}"
            out.append(Case(NAME, name, bc.dit.attn_backend, dict(params, cache="on" if use_cache else "off"), prep,
                            skip=skip))
    # the other values --cond-frames names (not the default list, of which it runs 13 by design): dropped
    # without a row, while the results' config listed them
    named = () if tuple(ctx.cond_frames) == COND_FRAMES else ctx.cond_frames
    for other in dict.fromkeys(f for f in named if f != frames):
        params = dict(grid=str(base.grid), mode_name="distill", cond_frames=other, cond_latents=cond_latents(other),
                      depth=base.dit.depth, config=base.name, bsa=False)
        out.append(Case(NAME, f"{prefix}distill/c{other}", base.dit.attn_backend, params, lambda: None,
                        skip=f"the pipeline suite runs one conditioning ({frames} frames: 13 when --cond-frames "
                             f"names it, else the first); run --cond-frames {other} on its own for this one"))
    return out


def finish(ctx, rows: list[dict]) -> list[dict]:
    by = {(r.get("grid"), r.get("mode_name"), r.get("cache")): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["ms_per_step"] = r["ms"] / r["steps"]
        off = by.get((r.get("grid"), r.get("mode_name"), "off"))
        if r.get("cache") == "on" and off is not None:
            r["speedup"] = off["ms"] / r["ms"]
    return rows


def table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        body.append([r.get("grid", "-"), r.get("mode_name", "-"), fmt(r.get("steps")), fmt(r.get("batch")), fmt(r.get("cond_frames")),
                     r.get("cache", "-"), ms_cell(r, ".0f") if ok else r.get("status", "-").upper(),
                     ms_cell(r, ".1f", "ms_per_step"), fmt(r.get("speedup"), ".2f"), fmt(r.get("rel_l2"), ".1e"),
                     "" if ok else str(r.get("reason", ""))[:60]])
    return render_table(["grid", "mode", "steps", "batch", "cond fr.", "cache", "total ms", "ms/step", "speedup",
                         "rel.L2", "note"], body)
