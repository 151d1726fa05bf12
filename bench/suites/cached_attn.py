"""Cached-KV attention (the VC hot path) vs cuDNN on pre-built inputs vs the unfused path.

Shapes (GPU): 480p 93 frames, B2 (CFG), H32 D128; for c cond latents the fresh queries are the
``(24 - c) * 1560`` noisy tokens and the keys the whole 37,440 tokens (cache + fresh).
- ``sdpa-<impl>-prebuilt``: SDPA on inputs built outside the timing (rotated q, [cache; fresh] K/V
  already concatenated and repeated to the batch): the attention alone, the floor to beat.
- ``unfused``: what a plain implementation does every step: repeat the batch-1 cache, concatenate,
  rotate q and k in fp32 (eager RoPE), SDPA.
- ours: ``attn_with_kv_cache(q, k, v, k_cache, v_cache, rope=rope)`` per backend, all work included
  (plus the Triton prologue + cuDNN route, when the triton backend ships it).
- cache off in one call: ``prefix_attn`` vs two SDPA calls + concatenation.
"""

from __future__ import annotations

import torch

from bench import flops as F
from bench.shapes import COND_FRAMES, GRIDS, cond_frames_left_out, cond_latents_for
from bench.suites import Case, Prepared, fmt, rel_l2, render_table
from bench.suites import kernels_common as kc
from bench.timing import ms_cell

NAME = "cached-attn"


def _dims(ctx):
    """(batch, heads, head_dim) and the grid."""
    if ctx.quick:
        return (2, 2, 32), GRIDS["tiny"]
    if ctx.is_cuda:
        return (2, 32, 128), GRIDS["480p"]
    return (2, 2, 64), GRIDS["cpu"]


def _make(ctx, grid, bhd, c, n_sets, offset):
    """Fresh q, k, v [B,Sn,H,D] (normalised, not rotated), rotated cache [1,Sc,H,D], Rope3D."""
    import longcat_kernels as lk

    B, H, D = bhd
    hw = grid.frame_tokens
    Sc, Sn = c * hw, (grid.t - c) * hw
    gen = ctx.generator(offset)
    rope = lk.Rope3D(grid.shape, D, device=ctx.device)
    sets = []
    for _ in range(n_sets):
        q, k, v = (kc.randn_bshd(ctx, B, Sn, H, D, gen) for _ in range(3))
        kc_raw = kc.randn_bshd(ctx, 1, Sc, H, D, gen)
        k_cache = lk.apply_rope_3d(kc_raw, rope, frame_offset=0)  # cached K is stored rotated
        v_cache = kc.randn_bshd(ctx, 1, Sc, H, D, gen)
        sets.append((q, k, v, k_cache, v_cache, kc_raw))
    return sets, rope


def _reference(ctx, s, rope, hs):
    """fp32 torch-reference output of the first ``hs`` heads (the oracle of every case)."""
    import longcat_kernels as lk

    rd = torch.float32 if s[0].is_cuda else torch.float64  # fp64 on CPU: an independent precision
    q, k, v, k_cache, v_cache = (x[:, :, :hs].to(rd) for x in s[:5])
    return lk.attn_with_kv_cache(q, k, v, k_cache, v_cache, rope=rope, backend="torch")


def _case(ctx, grid, bhd, frames, c, impl: str, label: str, prefix: str = "") -> Case:
    import longcat_kernels as lk
    from longcat_kernels.testing import baselines as BL

    B, H, D = bhd
    hw = grid.frame_tokens
    Sc, Sn = c * hw, (grid.t - c) * hw
    params = dict(grid=str(grid), cond_frames=frames, cond_latents=c, seq_q=Sn, seq_k=Sc + Sn, op="kv-cache",
                  batch=B, heads=H, head_dim=D)

    def prep():
        nbytes = (4 * B * Sn + 3 * Sc) * H * D * ctx.dtype.itemsize
        dense_impl = "cudnn" if ctx.is_cuda else "default"
        sets, rope = _make(ctx, grid, bhd, c, kc.n_input_sets(nbytes), offset=10 + c)
        hs = kc.heads_for_check(ctx, H)
        if impl.startswith("prebuilt"):
            sdpa_impl = impl.split(":", 1)[1]
            # everything but the attention happens here, outside the timing
            built = [BL.prebuilt_kv_inputs(*s[:5], rope=rope) for s in sets]

            def fn(q, k, v):
                return BL.sdpa_bshd(q, k, v, impl=sdpa_impl)

            inputs = built
        elif impl == "unfused":
            # upstream keeps the cache unrotated and rotates all keys every step
            def fn(q, k, v, k_cache, v_cache, k_cache_raw):
                return BL.unfused_kv_cache_attn(q, k, v, k_cache_raw, v_cache, rope=rope, impl=dense_impl)

            inputs = sets
        elif impl == "triton+cudnn":
            from longcat_kernels.ops.kv_cache_attn.cudnn import attn_with_kv_cache_cudnn

            def fn(q, k, v, k_cache, v_cache, k_cache_raw):
                return attn_with_kv_cache_cudnn(q, k, v, k_cache, v_cache, rope=rope)

            inputs = sets
        else:
            def fn(q, k, v, k_cache, v_cache, k_cache_raw):
                return lk.attn_with_kv_cache(q, k, v, k_cache, v_cache, rope=rope, backend=impl)

            inputs = sets

        def check():
            with torch.no_grad():
                out = fn(*inputs[0])[:, :, :hs]
                return rel_l2(out, _reference(ctx, sets[0], rope, hs)), kc.tol(ctx.dtype)

        def timed(*a):
            with torch.no_grad():
                fn(*a)

        return Prepared(fn=timed, inputs=inputs, check=check, flops=F.attn_flops(B, H, Sn, Sc + Sn, D),
                        policy=ctx.policy(warmup=2, min_reps=5, max_reps=50, budget_s=1.0))

    return Case(NAME, f"{prefix}c{c}/kv-cache", label, params, prep)


def _prefix_case(ctx, grid, bhd, frames, c, impl: str, label: str, prefix: str = "") -> Case:
    import longcat_kernels as lk
    from longcat_kernels.testing import baselines as BL

    B, H, D = bhd
    S, P = grid.tokens, c * grid.frame_tokens
    params = dict(grid=str(grid), cond_frames=frames, cond_latents=c, seq_q=S, seq_k=S, op="prefix",
                  batch=B, heads=H, head_dim=D)

    def prep():
        gen = ctx.generator(50 + c)
        n = kc.n_input_sets(3 * B * S * H * D * ctx.dtype.itemsize)
        sets = [tuple(kc.randn_bshd(ctx, B, S, H, D, gen) for _ in range(3)) for _ in range(n)]
        hs = kc.heads_for_check(ctx, H)
        if impl.startswith("sdpa:"):
            sdpa_impl = impl.split(":", 1)[1]

            def fn(q, k, v):
                return BL.prefix_attn_two_calls(q, k, v, P, impl=sdpa_impl)
        else:
            def fn(q, k, v):
                return lk.prefix_attn(q, k, v, P, backend=impl)

        def check():
            q, k, v = sets[0]
            with torch.no_grad():
                out = fn(q, k, v)[:, :, :hs]
                rd = torch.float32 if q.is_cuda else torch.float64
                ref = lk.prefix_attn(*(x[:, :, :hs].to(rd) for x in (q, k, v)), P, backend="torch")
            return rel_l2(out, ref), kc.tol(ctx.dtype)

        def timed(*a):
            with torch.no_grad():
                fn(*a)

        return Prepared(fn=timed, inputs=sets, check=check, flops=F.prefix_attn_flops(B, H, S, P, D),
                        policy=ctx.policy(warmup=2, min_reps=5, max_reps=50, budget_s=1.0))

    return Case(NAME, f"{prefix}c{c}/prefix", label, params, prep)


def cases(ctx) -> list[Case]:
    bhd, grid = _dims(ctx)
    grids = ctx.grids or [grid]
    out: list[Case] = []
    for grid in grids:  # case names carry the grid when there are several
        out += _grid_cases(ctx, grid, bhd, f"{grid}/" if len(grids) > 1 else "")
    return out


def _grid_cases(ctx, grid, bhd, prefix: str) -> list[Case]:
    pairs = cond_latents_for(grid, ctx.cond_frames)
    if not pairs:  # every value skipped with its reason; the other grids still run
        return [kc.skipped(NAME, f"{prefix}c{c}/kv-cache", "-", dict(grid=str(grid), cond_frames=frames, cond_latents=c,
                                                                    op="kv-cache"), reason)
                for frames, c, reason in cond_frames_left_out(grid, ctx.cond_frames)]
    if ctx.quick and len(pairs) > 2 and tuple(ctx.cond_frames) == COND_FRAMES:
        # smoke run: shortest and longest conditioning (the values --cond-frames names all run)
        pairs = [pairs[0], pairs[-1]]
    ctx.log(f"cached-attn: B{bhd[0]} H{bhd[1]} D{bhd[2]}, {ctx.dtype}, grid {grid}, cond latents "
            f"{[c for _, c in pairs]}")
    backends = kc.kernel_backends(ctx, "attn_with_kv_cache")
    prefix_backends = kc.kernel_backends(ctx, "prefix_attn")
    sdpa = ["cudnn", "flash"] if ctx.is_cuda else ["default"]
    has_cudnn_route = False
    if ctx.is_cuda and any(b == "triton" and s is None for b, s in backends):
        try:
            from longcat_kernels.ops.kv_cache_attn import cudnn as _t

            has_cudnn_route = hasattr(_t, "attn_with_kv_cache_cudnn")
        except Exception:
            has_cudnn_route = False
    out: list[Case] = []
    for frames, c in pairs:
        for impl in sdpa:
            out.append(_case(ctx, grid, bhd, frames, c, f"prebuilt:{impl}", f"sdpa-{impl}-prebuilt", prefix))
        out.append(_case(ctx, grid, bhd, frames, c, "unfused", "unfused", prefix))
        for b, skip in backends:
            if skip:
                out.append(kc.skipped(NAME, f"{prefix}c{c}/kv-cache", b, dict(grid=str(grid), cond_frames=frames,
                                                                        cond_latents=c, op="kv-cache"), skip))
            else:
                out.append(_case(ctx, grid, bhd, frames, c, b, b, prefix))
        if has_cudnn_route:
            out.append(_case(ctx, grid, bhd, frames, c, "triton+cudnn", "triton+cudnn", prefix))
    for frames, c, reason in cond_frames_left_out(grid, ctx.cond_frames):
        out.append(kc.skipped(NAME, f"{prefix}c{c}/kv-cache", "-", dict(grid=str(grid), cond_frames=frames,
                                                                       cond_latents=c, op="kv-cache"), reason))
    # the cache-off rule in one call, at the shortest and a long conditioning
    long_ = [p for p in pairs if p[1] == 16] or pairs[-1:]
    for frames, c in sorted({pairs[0], long_[0]}):
        out.append(_prefix_case(ctx, grid, bhd, frames, c, f"sdpa:{sdpa[0]}", f"sdpa-{sdpa[0]}-2call", prefix))
        for b, skip in prefix_backends:
            if skip:  # a backend --backends names: reported, as its kv-cache cases are
                out.append(kc.skipped(NAME, f"{prefix}c{c}/prefix", b, dict(grid=str(grid), cond_frames=frames,
                                                                      cond_latents=c, op="prefix"), skip))
            else:
                out.append(_prefix_case(ctx, grid, bhd, frames, c, b, b, prefix))
    return out


def finish(ctx, rows: list[dict]) -> list[dict]:
    base = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("backend", "").endswith("-prebuilt"):
            key = (r.get("grid"), r["cond_latents"])
            if key not in base or r["ms"] < base[key]["ms"]:
                base[key] = r
    unf = {(r.get("grid"), r["cond_latents"]): r for r in rows
           if r.get("backend") == "unfused" and r.get("status") == "ok"}
    two = {(r.get("grid"), r["cond_latents"]): r for r in rows if r.get("op") == "prefix" and r.get("backend", "").endswith("2call")
           and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        if ctx.peak_tflops and r.get("tflops"):
            r["mfu"] = r["tflops"] / ctx.peak_tflops
        if is_baseline(r.get("backend", "")):
            continue
        c = (r.get("grid"), r.get("cond_latents"))
        if r.get("op") == "prefix":
            if c in two:
                r["speedup"] = two[c]["ms"] / r["ms"]
                r["baseline"] = two[c]["backend"]
            continue
        if c in base:
            r["vs_prebuilt"] = base[c]["ms"] / r["ms"]
        if c in unf:
            r["speedup"] = unf[c]["ms"] / r["ms"]
            r["baseline"] = "unfused"
    return rows


def is_baseline(impl: str) -> bool:
    return impl == "unfused" or impl.endswith("-prebuilt") or impl.endswith("-2call")


def table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        body.append([
            r.get("grid", "-"), r.get("op", "-"), fmt(r.get("cond_frames")), fmt(r.get("cond_latents")),
            f"{r.get('seq_q', '-')} x {r.get('seq_k', '-')}", r.get("backend", "-"),
            ms_cell(r, ".2f") if ok else r.get("status", "-").upper(), fmt(r.get("tflops"), ".3g"),
            fmt(r.get("speedup"), ".2f"), fmt(r.get("vs_prebuilt"), ".2f"), fmt(r.get("rel_l2"), ".1e"),
            "" if ok else str(r.get("reason", ""))[:60],
        ])
    return render_table(["grid", "op", "cond fr.", "cond lat.", "q x kv", "impl", "ms", "TFLOP/s", "vs unfused / 2call",
                         "vs prebuilt", "rel.L2", "note"], body)
