"""Block-sparse attention vs dense SDPA over sparsity levels and grids, every available backend.

Per grid (GPU: 24x44x80 = 84,480 tokens and the non-divisible 480p 24x30x52; B1 H32 D128):
dense SDPA (cuDNN and flash on GPU) as the baseline, then for each sparsity and backend the
block-sparse forward with gating included; at 0.875/0.9375 also the forward with a reused
selection, the gating alone, forward+backward (backends with autograd) and 128-token chunks
(4x4x8). Speedups are dense-equivalent: dense time / block-sparse time, same run, same grid.
TFLOP/s of sparse cases count the visited blocks only ("effective").
"""

from __future__ import annotations

import dataclasses

import torch

from bench import flops as F
from bench.shapes import GRIDS, SPARSITIES
from bench.suites import Case, Prepared, fmt, rel_l2, render_table
from bench.suites import kernels_common as kc
from bench.timing import ms_cell

NAME = "bsa"
CHUNK = (4, 4, 4)
CHUNK_128 = (4, 4, 8)


def _dims(ctx):
    """(batch, heads, head_dim) and default grids for this device."""
    if ctx.quick:
        return (1, 2, 32), [GRIDS["bsa-tiny"]]
    if ctx.is_cuda:
        return (1, 32, 128), [GRIDS["720p"], GRIDS["480p"]]
    return (1, 2, 64), [GRIDS["bsa-cpu"]]


def _slice_heads(sel, h: int):
    return dataclasses.replace(sel, indices=sel.indices[:, :h].contiguous(), counts=sel.counts[:, :h].contiguous())


def _inputs(ctx, grid, bhd, n_sets, requires_grad=False, offset=0):
    B, H, D = bhd
    gen = ctx.generator(offset)
    return [tuple(kc.randn_bshd(ctx, B, grid.tokens, H, D, gen, requires_grad) for _ in range(3))
            for _ in range(n_sets)]


def _ref_bsa(q, k, v, sel, hs):
    """fp32 torch-reference output on the first ``hs`` heads (parity oracle of every sparse case)."""
    import longcat_kernels as lk

    # fp64 on CPU (an independent precision), fp32 on GPU
    rd = torch.float32 if q.is_cuda else torch.float64
    qs, ks, vs = (x[:, :, :hs].detach().to(rd) for x in (q, k, v))
    return lk.block_sparse_attn(qs, ks, vs, selection=_slice_heads(sel, hs), backend="torch")


def _gating_backend(ctx, backend: str) -> str:
    """The backend block_sparse_attn uses for the gating: the attention backend when it implements
    select_blocks, else "auto" (as ``block_sparse_attn`` itself does)."""
    from longcat_kernels import available_backends

    if backend in ("auto", "torch"):
        return backend
    return backend if available_backends("select_blocks", ctx.device.type).get(backend) is None else "auto"


def _dense_case(ctx, grid, bhd, impl: str, backward: bool) -> Case:
    from longcat_kernels.testing import baselines as BL

    B, H, D = bhd
    mode = "fwd+bwd" if backward else "fwd"
    params = dict(grid=str(grid), tokens=grid.tokens, sparsity=0.0, chunk="-", mode=mode, kind="dense",
                  batch=B, heads=H, head_dim=D)

    def prep():
        nbytes = 3 * B * grid.tokens * H * D * ctx.dtype.itemsize
        sets = _inputs(ctx, grid, bhd, kc.n_input_sets(nbytes), requires_grad=backward, offset=1)
        hs = kc.heads_for_check(ctx, H)
        do = torch.randn_like(sets[0][0]) if backward else None

        def check():
            q, k, v = sets[0]
            rows = min(grid.tokens, 2048)  # fp32 math SDPA materialises [rows, S] scores
            if backward:
                # the gradients too (they were never compared: a wrong SDPA backward was the fwd+bwd baseline);
                # the timed impl on the first hs heads, every key, the first `rows` query rows' output and grads
                qs, ks, vs = (x[:, :, :hs].detach().clone().requires_grad_(True) for x in (q, k, v))
                g = do[:, :rows, :hs]
                out = BL.sdpa_bshd(qs, ks, vs, impl=impl)[:, :rows]
                grads = torch.autograd.grad(out, (qs, ks, vs), g)
                qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (qs[:, :rows], ks, vs))
                ref = BL.sdpa_bshd(qf, kf, vf, impl="math")
                refs = torch.autograd.grad(ref, (qf, kf, vf), g.float())
                errs = [rel_l2(out, ref), rel_l2(grads[0][:, :rows], refs[0])]
                errs += [rel_l2(a, b) for a, b in zip(grads[1:], refs[1:])]
                return max(errs), 2 * kc.tol(ctx.dtype)
            with torch.no_grad():
                out = BL.sdpa_bshd(q, k, v, impl=impl)[:, :rows, :hs]
                ref = BL.sdpa_bshd(q[:, :rows, :hs].float(), k[:, :, :hs].float(), v[:, :, :hs].float(),
                                   impl="math")
            return rel_l2(out, ref), kc.tol(ctx.dtype)

        if backward:
            def fn(q, k, v):
                # gradients returned, not accumulated: .backward() added each call's gradients into
                # q/k/v.grad, an extra read-modify-write of three [B, S, H, D] tensors per timed call
                torch.autograd.grad(BL.sdpa_bshd(q, k, v, impl=impl), (q, k, v), do)
        else:
            def fn(q, k, v):
                with torch.no_grad():
                    BL.sdpa_bshd(q, k, v, impl=impl)

        return Prepared(fn=fn, inputs=sets, check=check, flops=F.attn_flops(B, H, grid.tokens, grid.tokens, D,
                        backward=backward), policy=ctx.policy(warmup=1, min_reps=3, max_reps=20, budget_s=3.0))

    return Case(NAME, f"{grid.name}/dense/{mode}", f"sdpa-{impl}", params, prep)


def _sparse_case(ctx, grid, bhd, sparsity, backend, *, chunk=CHUNK, variant="gated", backward=False) -> Case:
    """variant: "gated" (select_blocks + attention, as a model step calls it), "reused" (attention
    with a precomputed selection), "gating" (select_blocks alone)."""
    import longcat_kernels as lk

    B, H, D = bhd
    mode = "fwd+bwd" if backward else "fwd"
    cs = "x".join(map(str, chunk))
    params = dict(grid=str(grid), tokens=grid.tokens, sparsity=sparsity, chunk=cs, mode=mode, kind=variant,
                  batch=B, heads=H, head_dim=D)
    name = f"{grid.name}/s{sparsity:g}/{cs}/{variant}/{mode}"

    gate = _gating_backend(ctx, backend)
    from longcat_kernels.grid import total_blocks

    if any(c > g for c, g in zip(chunk, grid.shape)):
        # block_sparse_attn refuses it (the model caps its chunk at the grid: another chunk than the label says)
        return kc.skipped(NAME, name, backend, params, f"chunk {cs} is longer than grid {grid} along an axis")
    if int((1 - sparsity) * total_blocks(grid.shape, chunk)) < 1:
        return kc.skipped(NAME, name, backend, params, f"sparsity {sparsity:g} keeps no key block of "
                          f"{total_blocks(grid.shape, chunk)} on grid {grid} with chunk {cs}")

    def prep():
        nbytes = 3 * B * grid.tokens * H * D * ctx.dtype.itemsize
        sets = _inputs(ctx, grid, bhd, kc.n_input_sets(nbytes), requires_grad=backward, offset=2)
        kw = dict(grid_q=grid.shape, chunk_q=chunk, sparsity=sparsity)
        with torch.no_grad():
            sels = [lk.select_blocks(q, k, backend=gate, **kw) for q, k, _ in sets]
        hs = kc.heads_for_check(ctx, H)
        sel0 = sels[0]
        # the mean over the rotated sets, whose median time it divides: on a grid the chunk does not divide,
        # each set's selection visits another number of tokens (edge blocks), the first set's was off by ~5%
        eff = sum(F.bsa_effective_flops(s, D, grid.shape, chunk, backward=backward) for s in sels) / len(sels)
        extra = dict(density=sel0.density(), gflop_dense=F.attn_flops(B, H, grid.tokens, grid.tokens, D,
                                                                      backward=backward) / 1e9)

        def check():
            q, k, v = sets[0]
            # the gating: every query block keeps exactly int((1 - s) * Nk) key blocks
            n_keep = int((1 - sparsity) * sel0.num_k_blocks)
            if not bool((sel0.counts == n_keep).all()):
                raise RuntimeError(f"gating kept {sel0.counts.min().item()}..{sel0.counts.max().item()} "
                                   f"blocks per query block, expected {n_keep}")
            if variant == "gating":
                # same dtype as the kernel (pooled means are rounded to the input dtype, SPEC 3)
                ref_sel = lk.select_blocks(*(x[:, :, :hs].detach() for x in (q, k)), backend="torch", **kw)
                # kept sets may differ on exact near-ties only: the fraction of kept blocks that differ (of the
                # whole mask's entries, the bound let 6% of the kept blocks be wrong at sparsity 0.9375)
                a = _slice_heads(sel0, hs).to_mask()
                b = ref_sel.to_mask()
                kept = int(a.sum()) + int(b.sum())
                return (float((a != b).sum()) / kept if kept else 0.0), 0.01
            if backward:
                qs, ks, vs = (x[:, :, :hs].detach().clone().requires_grad_(True) for x in (q, k, v))
                out = lk.block_sparse_attn(qs, ks, vs, selection=_slice_heads(sel0, hs), backend=backend)
                g = torch.randn_like(out)
                out.backward(g)
                rd = torch.float32 if q.is_cuda else torch.float64
                qf, kf, vf = (x.detach().to(rd).requires_grad_(True) for x in (qs, ks, vs))
                ref = lk.block_sparse_attn(qf, kf, vf, selection=_slice_heads(sel0, hs), backend="torch")
                ref.backward(g.to(rd))
                errs = [rel_l2(out, ref)] + [rel_l2(a.grad, b.grad) for a, b in ((qs, qf), (ks, kf), (vs, vf))]
                return max(errs), 2 * kc.tol(ctx.dtype)
            with torch.no_grad():
                out = lk.block_sparse_attn(q, k, v, selection=sel0, backend=backend)[:, :, :hs]
                return rel_l2(out, _ref_bsa(q, k, v, sel0, hs)), kc.tol(ctx.dtype)

        if variant == "gating":
            def fn(q, k, v, sel):
                with torch.no_grad():
                    lk.select_blocks(q, k, backend=gate, **kw)
            f = None
        elif variant == "reused":
            def fn(q, k, v, sel):
                with torch.no_grad():
                    lk.block_sparse_attn(q, k, v, selection=sel, backend=backend)
            f = eff
        elif backward:
            do = torch.randn_like(sets[0][0])

            def fn(q, k, v, sel):
                # returned, not accumulated into .grad (see _dense_case)
                torch.autograd.grad(lk.block_sparse_attn(q, k, v, backend=backend, **kw), (q, k, v), do)
            f = eff
        else:
            def fn(q, k, v, sel):
                with torch.no_grad():
                    lk.block_sparse_attn(q, k, v, backend=backend, **kw)
            f = eff
        inputs = [(q, k, v, s) for (q, k, v), s in zip(sets, sels)]
        return Prepared(fn=fn, inputs=inputs, check=check, flops=f, extra=extra,
                        policy=ctx.policy(warmup=2, min_reps=5, max_reps=50, budget_s=1.0))

    return Case(NAME, name, backend, params, prep)


def cases(ctx) -> list[Case]:
    bhd, grids = _dims(ctx)
    grids = ctx.grids or grids
    levels = tuple(ctx.sparsities)
    if ctx.quick and levels == SPARSITIES:  # smoke run: LongCat's level only (levels --sparsity names all run)
        levels = tuple(s for s in levels if s == 0.9375) or levels[-1:]
    ctx.log(f"bsa: B{bhd[0]} H{bhd[1]} D{bhd[2]}, {ctx.dtype}, grids {', '.join(map(str, grids))}, "
            f"sparsity {levels}")
    backends = kc.kernel_backends(ctx, "block_sparse_attn")
    sdpa_impls = ["cudnn", "flash"] if ctx.is_cuda else ["default"]
    out: list[Case] = []
    for gi, grid in enumerate(grids):
        for impl in sdpa_impls:
            # flash (FlashAttention-2 class) is a second opinion; at 84k tokens it alone costs ~15 s
            if impl == "flash" and grid.tokens > 50_000:
                continue
            out.append(_dense_case(ctx, grid, bhd, impl, backward=False))
        key_levels = [s for s in levels if s in (0.875, 0.9375)] or list(levels[-1:])
        for s in levels:
            for b, skip in backends:
                params = dict(grid=str(grid), tokens=grid.tokens, sparsity=s, chunk="4x4x4", mode="fwd", kind="gated")
                if skip:
                    out.append(kc.skipped(NAME, f"{grid.name}/s{s:g}/4x4x4/gated/fwd", b, params, skip))
                    continue
                out.append(_sparse_case(ctx, grid, bhd, s, b))
                if s in key_levels:
                    out.append(_sparse_case(ctx, grid, bhd, s, b, variant="reused"))
                    if _gating_backend(ctx, b) == b:  # a backend without its own gating borrows another's
                        out.append(_sparse_case(ctx, grid, bhd, s, b, variant="gating"))
        # 128-token chunks and training (fwd+bwd) on the first (largest) grid only
        if gi == 0:
            fits = all(c <= g for c, g in zip(CHUNK_128, grid.shape))
            for s in key_levels:
                for b, skip in backends:
                    if not skip and fits:
                        out.append(_sparse_case(ctx, grid, bhd, s, b, chunk=CHUNK_128))
            out.append(_dense_case(ctx, grid, bhd, sdpa_impls[0], backward=True))
            for s in key_levels[-1:]:
                for b, skip in backends:
                    if not skip and b != "cuda":  # the cuda backend is forward-only
                        out.append(_sparse_case(ctx, grid, bhd, s, b, backward=True))
                if any(b == "cuda" and not skip for b, skip in backends):
                    # what training runs under auto where the csrc kernels are: on Hopper the csrc
                    # forward with the Triton backward (dispatch: csrc_sm90_ws_triton_bwd)
                    out.append(_sparse_case(ctx, grid, bhd, s, "auto", backward=True))
    return out


def finish(ctx, rows: list[dict]) -> list[dict]:
    dense = {}
    for r in rows:
        if r.get("kind") == "dense" and r.get("status") == "ok":
            key = (r["grid"], r["mode"])
            # the fastest dense SDPA of this grid/mode is the baseline (cuDNN on H100)
            if key not in dense or r["ms"] < dense[key]["ms"]:
                dense[key] = r
    for r in rows:
        if r.get("status") != "ok":
            continue
        if ctx.peak_tflops and r.get("tflops"):
            r["mfu"] = r["tflops"] / ctx.peak_tflops
        base = dense.get((r.get("grid"), r.get("mode")))
        if base is not None and r.get("kind") != "dense":
            r["baseline"] = f"{base['backend']} {base['ms']:.2f} ms"
            if r.get("kind") != "gating":
                r["speedup"] = base["ms"] / r["ms"]
    # gating share of the gated forward of the same grid / sparsity / backend
    gated = {(r["grid"], r["sparsity"], r["chunk"], r["backend"]): r for r in rows
             if r.get("kind") == "gated" and r.get("mode") == "fwd" and r.get("status") == "ok"}
    for r in rows:
        if r.get("kind") == "gating" and r.get("status") == "ok":
            g = gated.get((r["grid"], r["sparsity"], r["chunk"], r["backend"]))
            if g is not None:
                r["share_of_fwd"] = r["ms"] / g["ms"]
    return rows


def table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        note = "" if ok else (r.get("status", "").upper() + ": " + str(r.get("reason", ""))[:60])
        if ok and r.get("kind") == "gating" and r.get("share_of_fwd") is not None:
            note = f"{100 * r['share_of_fwd']:.1f}% of the gated fwd"
        body.append([
            r.get("grid", "-"), r.get("mode", "-"), r.get("kind", "-"), fmt(r.get("sparsity"), "g"),
            r.get("chunk", "-"), r.get("backend", "-"), ms_cell(r, ".3f") if ok else "-",
            fmt(r.get("tflops"), ".3g") if ok else "-", fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
            fmt(r.get("rel_l2"), ".1e"), note,
        ])
    return render_table(["grid", "mode", "kind", "sparsity", "chunk", "backend", "ms", "TFLOP/s eff",
                         "vs dense", "rel.L2", "note"], body)
