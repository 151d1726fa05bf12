"""GPU check-then-time (issues 15 and 18): the warp-specialised BSA forward (``csrc/bsa_fwd_sm90_ws.cu``)
and the training path against the Triton kernels and upstream's BSA, in one run.

History: written for the v8 union walk (``sm90_ws_union``) and a csrc backward, both removed after
this script measured them slower (b6a71a2, csrc/NOTES.md v8); since then it times the kernels that
ship. Today (v10, pair tiles) ``auto`` trains through the sm90_ws forward + the Triton backward
(``csrc_sm90_ws_triton_bwd``), timed beside the all-Triton path (``backend="triton"``).

Cases (B1 H32 D128 bf16, top-k gating of ``select_blocks``):

1. 24x44x80, chunk 4x4x4, sparsity 0.9375 / 0.875, ``random`` (independent normal q/k/v) and
   ``video`` (``testing.make_video_qkv``) inputs: check csrc ``sm90_ws`` against the Triton
   forward on the same selection (rel L2 < 1e-2, lse max abs < 1e-2, the same -inf rows), then
   time, interleaved over rounds: Triton / sm90_ws forward on the selection, the public op under
   ``auto`` (gating + forward), upstream's ``flash_attn_bsa_3d`` (gating + forward, its own layout
   changes) with ``--upstream``; forward+backward of ours under ``auto`` (its gradients checked
   against the all-Triton path's first), under ``backend="triton"``, and upstream's.
2. 24x44x80, chunk 4x4x8 (128-token blocks: Triton), both sparsities: ours vs upstream, forward
   and forward+backward.
3. the refine step's attention call: 40 fresh frames against [8 cached; 40 fresh], 44x80, video
   inputs, 0.9375, 4x4x4: ``attn_with_kv_cache(block_sparse=)`` on the Triton two-segment kernel
   vs csrc ``sm90_ws`` over the two segments (checked against Triton first).

    PYTHONPATH=$PWD python bench/dev/bsa_ws_union_gpu_dev.py --out $OUT [--upstream .gpu_carry/upstream]
        [--rounds 3] [--budget 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback

import torch

import longcat_kernels as lk
from bench.timing import TimingPolicy, measure
from bench.upstream import upstream_bsa
from longcat_kernels.dispatch import impl_fn
from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda, bsa_forward_segments_cuda
from longcat_kernels.testing import make_qkv, make_video_qkv, selection_overlap

B, H, D = 1, 32, 128
DT = torch.bfloat16
GRID = (24, 44, 80)


def _inputs(kind, grid, seed, grid_k=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "random":
        gk = grid if grid_k is None else grid_k
        Sq, Sk = grid[0] * grid[1] * grid[2], gk[0] * gk[1] * gk[2]
        if Sq == Sk:
            return make_qkv(B, Sq, H, D, dtype=DT, device="cuda", generator=g)
        q = make_qkv(B, Sq, H, D, dtype=DT, device="cuda", generator=g)[0]
        _, k, v = make_qkv(B, Sk, H, D, dtype=DT, device="cuda", generator=g)
        return q, k, v
    return make_video_qkv(B, grid, H, D, grid_k=grid_k, dtype=DT, device="cuda", generator=g)


def _check(name, out, lse, ref_out, ref_lse) -> dict:
    d = out.float() - ref_out.float()
    rel = float(d.norm() / ref_out.float().norm().clamp_min(1e-12))
    fin = torch.isfinite(ref_lse)
    lse_d = float((lse[fin] - ref_lse[fin]).abs().max()) if fin.any() else 0.0
    ok = (not bool(out.isnan().any())) and rel < 1e-2 and lse_d < 1e-2 and torch.equal(torch.isfinite(lse), fin)
    r = {"ok": bool(ok), "rel_l2_vs_triton": rel, "max_abs": float(d.abs().max()), "lse_max_abs": lse_d}
    print(f"    check {name}: {r}", flush=True)
    return r


def _interleaved(fns: dict, inputs: dict, rounds: int, budget: float) -> dict:
    """Median of per-round medians; every implementation timed once per round, in turn."""
    pol = TimingPolicy(warmup=2, min_reps=3, max_reps=50, budget_s=budget)
    per = {k: [] for k in fns}
    spreads = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            try:
                t = measure(fn, inputs[k], "cuda", pol)
                per[k].append(t.median_ms)
                spreads[k].append(t.spread)
            except Exception as e:  # noqa: BLE001 - keep the others
                per[k].append(float("nan"))
                spreads[k].append(f"{type(e).__name__}: {e}"[:200])
    return {k: {"median_ms": statistics.median(v) if v else None, "rounds_ms": v, "spreads": spreads[k]}
            for k, v in per.items()}


def case_plain(kind, chunk, sparsity, args, up):
    res = {"case": "plain", "inputs": kind, "grid": list(GRID), "chunk": list(chunk), "sparsity": sparsity}
    sets = [_inputs(kind, GRID, seed) for seed in (1, 2)]
    scale = D ** -0.5
    sels = [lk.select_blocks(q, k, grid_q=GRID, chunk_q=chunk, sparsity=sparsity) for q, k, _ in sets]
    res["overlap"] = selection_overlap(sels[0])
    print(f"[plain {kind} chunk {chunk} s={sparsity}] overlap "
          f"{ {k: round(v, 3) for k, v in res['overlap'].items()} }", flush=True)
    ws = chunk[0] * chunk[1] * chunk[2] == 64
    tri = impl_fn("block_sparse_attn_fwd", "triton")
    fns, inputs = {}, {}
    fwd_args = [(q, k, v, s, scale) for (q, k, v), s in zip(sets, sels)]
    fns["fwd_triton"] = tri
    inputs["fwd_triton"] = fwd_args
    checks = {}
    if ws:
        q, k, v = sets[0]
        ref_out, ref_lse = tri(q, k, v, sels[0], scale)
        for kern in ("sm90_ws",):
            try:
                out, lse = bsa_forward_cuda(q, k, v, sels[0], scale, kernel=kern)
                torch.cuda.synchronize()
                checks[kern] = _check(kern, out, lse, ref_out, ref_lse)
            except Exception as e:  # noqa: BLE001
                checks[kern] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
                print(f"    check {kern}: {checks[kern]}", flush=True)
            if checks[kern]["ok"]:
                fns[f"fwd_{kern}"] = (lambda kk: (lambda q, k, v, s, sc: bsa_forward_cuda(q, k, v, s, sc, kernel=kk)))(kern)
                inputs[f"fwd_{kern}"] = fwd_args
        del ref_out, ref_lse
    res["check"] = checks
    fns["op_auto_gating_plus_fwd"] = lambda q, k, v: lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=chunk,
                                                                          sparsity=sparsity)
    inputs["op_auto_gating_plus_fwd"] = [s for s in sets]
    bhsd = None
    if up is not None:
        bhsd = [tuple(x.transpose(1, 2).contiguous() for x in s) for s in sets]
        fns["upstream_gating_plus_fwd"] = lambda q, k, v: up(q, k, v, GRID, GRID, sparsity=sparsity, cdf_threshold=None,
                                                             chunk_3d_shape_q=list(chunk), chunk_3d_shape_k=list(chunk))
        inputs["upstream_gating_plus_fwd"] = bhsd
    res["fwd"] = _interleaved(fns, inputs, args.rounds, args.budget)
    # forward + backward (training path)
    grads = [tuple(x.detach().clone().requires_grad_(True) for x in s) for s in sets[:1]]
    do = torch.randn_like(sets[0][0])

    def ours_fb(q, k, v):
        o = lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=chunk, sparsity=sparsity)
        o.backward(do)
        q.grad = k.grad = v.grad = None

    fb_fns, fb_in = {"fwd_bwd_ours_auto": ours_fb}, {"fwd_bwd_ours_auto": grads}
    # auto's gradients (on Hopper: the sm90_ws forward + the Triton backward) against the
    # all-Triton path's, then both timed
    sel0 = sels[0]
    try:
        from longcat_kernels.dispatch import record_choices

        gt = torch.autograd.grad(lk.block_sparse_attn(*grads[0], selection=sel0, backend="triton"), grads[0], do)
        with record_choices() as got:
            ga = torch.autograd.grad(lk.block_sparse_attn(*grads[0], selection=sel0), grads[0], do)
        rels = {n: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
                for n, a, b in zip(("dq", "dk", "dv"), ga, gt)}
        ok = all(r < 2e-2 for r in rels.values()) and not any(bool(g.isnan().any()) for g in ga)
        res["check_backward_auto_vs_triton"] = {"ok": ok, "rel_l2": rels,
                                                "auto_impl": [c.impl for c in got if c.op == "block_sparse_attn"]}
    except Exception as e:  # noqa: BLE001
        ok = False
        res["check_backward_auto_vs_triton"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    print(f"    check backward auto vs triton: {res['check_backward_auto_vs_triton']}", flush=True)
    if not ok:
        del fb_fns["fwd_bwd_ours_auto"], fb_in["fwd_bwd_ours_auto"]

    def triton_fb(q, k, v):
        o = lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=chunk, sparsity=sparsity, backend="triton")
        o.backward(do)
        q.grad = k.grad = v.grad = None

    fb_fns["fwd_bwd_ours_triton"] = triton_fb
    fb_in["fwd_bwd_ours_triton"] = grads
    if up is not None:
        ug = [tuple(x.detach().clone().requires_grad_(True) for x in bhsd[0])]
        do_u = do.transpose(1, 2).contiguous()

        def up_fb(q, k, v):
            o = up(q, k, v, GRID, GRID, sparsity=sparsity, cdf_threshold=None, chunk_3d_shape_q=list(chunk),
                   chunk_3d_shape_k=list(chunk))
            o.backward(do_u)
            q.grad = k.grad = v.grad = None

        fb_fns["fwd_bwd_upstream"] = up_fb
        fb_in["fwd_bwd_upstream"] = ug
    res["fwd_bwd"] = _interleaved(fb_fns, fb_in, args.rounds, args.budget)
    _print_times(res)
    return res


def case_refine_attention(args):
    """40 fresh frames vs [8 cached; 40 fresh], 44x80: the refine step's self-attention call."""
    c, T, Hf, Wf = 8, 40, 44, 80
    chunk, sparsity = (4, 4, 4), 0.9375
    res = {"case": "refine_attention", "inputs": "video", "cache_frames": c, "fresh_frames": T, "hw": [Hf, Wf],
           "chunk": list(chunk), "sparsity": sparsity}
    q, k_all, v_all = _inputs("video", (T, Hf, Wf), 3, grid_k=(c + T, Hf, Wf))
    Sc = c * Hf * Wf
    kc, vc, k, v = k_all[:, :Sc], v_all[:, :Sc], k_all[:, Sc:], v_all[:, Sc:]
    scale = D ** -0.5
    sel = lk.select_blocks(q, k_all, grid_q=(T, Hf, Wf), grid_k=(c + T, Hf, Wf), chunk_q=chunk, sparsity=sparsity)
    res["overlap"] = selection_overlap(sel)
    del k_all, v_all
    bs = lk.BlockSparseParams(frame_hw=(Hf, Wf), chunk_q=chunk, selection=sel)
    ref_out, ref_lse = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="triton", return_lse=True)
    fns = {"triton_two_segment": lambda: lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="triton")}
    checks = {}
    for kern in ("sm90_ws",):
        try:
            out, lse = bsa_forward_segments_cuda(q, kc, vc, k, v, sel, scale, kernel=kern)
            torch.cuda.synchronize()
            checks[kern] = _check(f"refine {kern}", out, lse, ref_out, ref_lse)
        except Exception as e:  # noqa: BLE001
            checks[kern] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            print(f"    check refine {kern}: {checks[kern]}", flush=True)
        if checks[kern]["ok"]:
            fns[kern] = (lambda kk: (lambda: bsa_forward_segments_cuda(q, kc, vc, k, v, sel, scale, kernel=kk,
                                                                       return_lse=False)))(kern)
    res["check"] = checks
    res["fwd"] = _interleaved(fns, {kk: [()] for kk in fns}, args.rounds, args.budget)
    _print_times(res)
    return res


def _print_times(res):
    for part in ("fwd", "fwd_bwd"):
        if part in res:
            row = ", ".join(f"{k} {v['median_ms']:.2f}" if isinstance(v["median_ms"], float) else f"{k} -"
                            for k, v in res[part].items())
            print(f"    {part} ms: {row}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--upstream", default=None, help="a LongCat-Video checkout (its longcat_video package)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per implementation and round")
    p.add_argument("--skip", default="", help="comma list of: plain, chunk8, refine")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from bench.machine import machine_header

    up, up_note = upstream_bsa(args.upstream)
    print(f"upstream: {up_note}", flush=True)
    skip = set(filter(None, args.skip.split(",")))
    results = []
    plan = []
    if "plain" not in skip:
        plan += [("plain", kind, (4, 4, 4), s) for s in (0.9375, 0.875) for kind in ("video", "random")]
    if "chunk8" not in skip:
        plan += [("plain", "random", (4, 4, 8), s) for s in (0.9375, 0.875)]
    if "refine" not in skip:
        plan += [("refine",)]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bsa_ws_union.json")
    for item in plan:
        try:
            results.append(case_refine_attention(args) if item[0] == "refine" else case_plain(*item[1:], args, up))
        except Exception:  # noqa: BLE001 - keep the other cases
            traceback.print_exc()
            results.append({"case": list(map(str, item)), "error": traceback.format_exc()[-3000:]})
        torch.cuda.empty_cache()
        with open(path, "w") as f:  # after every case: a time-out keeps what ran
            json.dump({"header": machine_header("cuda"), "upstream": up_note, "results": results}, f, indent=2,
                      default=str)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
