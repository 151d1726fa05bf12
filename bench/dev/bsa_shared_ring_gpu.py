"""Issue 18: the sm90_ws BSA forward with the shared ring (csrc/bsa_fwd_sm90_ws.cu, NOTES.md v9).

HISTORICAL (kept for its numbers, not runnable; bench/dev/README.md): the shared ring, the pair
reorder op ``bsa_pair_common_cuda``, ``pair_common_first`` and the ``common`` argument of
``bsa_fwd_cuda`` were removed after an A/B against the v8 kernel showed the shared ring slower
(bench/results/h200/bsa-shared-ring-vs-v8_20261204_cfd2754.log). To re-run, check out cfd2754.

The two query blocks of a CTA load the key blocks their selections share once (a shared ring
read by both consumers) and only their private tails into their own rings; the selection lists
are reordered per pair by ``pair_common_first`` in the op wrapper. Per case (24x44x80, B1 H32
D128 bf16, chunk 4x4x4; video-like and random inputs; sparsity 0.9375 and 0.875; and the refine
step's two-segment call):

- checks: shared ring vs private rings only (the v7/v8 kernel: the raw op without pair-common
  counts) vs Triton, rel. L2 and lse;
- the share: fraction of tiles served from the shared ring, K/V tile loads per pair vs before;
- times, interleaved rounds, medians: the kernel alone on pre-reordered lists, the kernel without
  sharing (lists in gating order, and ascending: is a gain the sharing or the order?), the csrc
  reorder alone and its torch reference, the wrapper (reorder + kernel, what ``auto`` runs),
  Triton, the public op with gating, and upstream's gating + forward when ``--upstream`` is given.

    PYTHONPATH=$PWD python bench/dev/bsa_shared_ring_gpu.py --out $OUT [--upstream .gpu_carry/upstream]
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
try:  # removed with the shared ring (HISTORICAL above)
    from longcat_kernels.ops.block_sparse_attn.cuda import (
        bsa_forward_cuda,
        bsa_forward_segments_cuda,
        kernel_selection_args,
        ops,
        pair_common_first,
        selection_args,
    )
except ImportError:  # pragma: no cover - today's tree
    kernel_selection_args = pair_common_first = None
from longcat_kernels.testing import make_qkv, make_video_qkv, selection_overlap

B, H, D = 1, 32, 128
DT = torch.bfloat16
GRID = (24, 44, 80)
CHUNK = (4, 4, 4)


def _inputs(kind, grid, seed, grid_k=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "random":
        return make_qkv(B, grid[0] * grid[1] * grid[2], H, D, dtype=DT, device="cuda", generator=g)
    return make_video_qkv(B, grid, H, D, grid_k=grid_k, dtype=DT, device="cuda", generator=g)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _share(sel) -> dict:
    (idx, cnt, *_), common = kernel_selection_args(sel, "sm90_ws")
    c = cnt.long()
    nc = common.long()
    tiles = int(c.sum())
    shared = int(nc.sum())
    # K/V tile loads: before = every list in full; now = per pair the union (common loaded once)
    loads_now = tiles - int(nc[..., 0::2].sum())
    return {"tiles": tiles, "shared_tile_fraction": shared / max(tiles, 1),
            "loads_vs_private_rings": loads_now / max(tiles, 1)}


def _interleaved(fns: dict, rounds: int, budget: float) -> dict:
    pol = TimingPolicy(warmup=2, min_reps=3, max_reps=50, budget_s=budget)
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (fn, inputs) in fns.items():
            try:
                per[k].append(measure(fn, inputs, "cuda", pol).median_ms)
            except Exception as e:  # noqa: BLE001 - keep the others
                per[k].append(float("nan"))
                print(f"    {k}: {type(e).__name__}: {e}"[:300], flush=True)
    return {k: {"median_ms": statistics.median(v), "rounds_ms": v} for k, v in per.items()}


def case_plain(kind, sparsity, args, up) -> dict:
    res = {"case": "plain", "inputs": kind, "grid": list(GRID), "chunk": list(CHUNK), "sparsity": sparsity,
           "csrc_source": args.csrc_tag}
    sets = [_inputs(kind, GRID, seed) for seed in (1, 2)]
    scale = D ** -0.5
    sels = [lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=sparsity) for q, k, _ in sets]
    res["overlap"] = selection_overlap(sels[0])
    res["share"] = _share(sels[0])
    print(f"[{kind} s={sparsity}] pair_load_ratio {res['overlap']['pair_load_ratio']:.3f} share {res['share']}",
          flush=True)
    q, k, v = sets[0]
    tri = impl_fn("block_sparse_attn_fwd", "triton")
    ref_out, ref_lse = tri(q, k, v, sels[0], scale)
    pre = [kernel_selection_args(s, "sm90_ws") for s in sels]
    plain = [selection_args(s) for s in sels]

    def ascending(sel):
        # each list sorted ascending (invalid slots last): the shared ring's order without sharing
        a = selection_args(sel)
        w = a[0].shape[-1]
        valid = torch.arange(w, device=a[0].device) < a[1][..., None]
        srt = torch.where(valid, a[0], torch.iinfo(torch.int32).max).sort(dim=-1).values
        return (torch.where(srt == torch.iinfo(torch.int32).max, -1, srt),) + a[1:]

    asc = [ascending(s) for s in sels]
    raw = ops().bsa_fwd_cuda
    checks = {}
    o1, l1 = raw(q, k, v, None, None, *pre[0][0], scale, "sm90_ws", True, pre[0][1])
    o0, l0 = raw(q, k, v, None, None, *plain[0], scale, "sm90_ws", True, None)
    torch.cuda.synchronize()
    fin = torch.isfinite(ref_lse)
    for name, o, lse in (("shared_ring", o1, l1), ("private_rings", o0, l0)):
        checks[name] = {"rel_l2_vs_triton": _rel(o, ref_out), "nan": bool(o.isnan().any()),
                        "lse_max_abs": float((lse[fin] - ref_lse[fin]).abs().max()),
                        "ok": (not bool(o.isnan().any())) and _rel(o, ref_out) < 1e-2}
    checks["shared_vs_private_rel_l2"] = _rel(o1, o0)
    res["check"] = checks
    print(f"    check {checks}", flush=True)
    del o1, o0, l1, l0, ref_out, ref_lse
    fwd_args = [(q_, k_, v_) for q_, k_, v_ in sets]
    fns = {
        "kernel_shared_ring": (lambda i: raw(*fwd_args[i], None, None, *pre[i][0], scale, "sm90_ws", False, pre[i][1]),
                               [(0,), (1,)]),
        "kernel_private_rings": (lambda i: raw(*fwd_args[i], None, None, *plain[i], scale, "sm90_ws", False, None),
                                 [(0,), (1,)]),
        "kernel_private_rings_ascending": (
            lambda i: raw(*fwd_args[i], None, None, *asc[i], scale, "sm90_ws", False, None), [(0,), (1,)]),
        "reorder_csrc_only": (lambda i: ops().bsa_pair_common_cuda(sels[i].indices, sels[i].counts,
                                                                   sels[i].num_k_blocks), [(0,), (1,)]),
        "reorder_torch_reference_only": (lambda i: pair_common_first(sels[i].indices, sels[i].counts), [(0,), (1,)]),
        "wrapper_reorder_plus_kernel": (lambda i: bsa_forward_cuda(*fwd_args[i], sels[i], scale, kernel="sm90_ws"),
                                        [(0,), (1,)]),
        "triton_fwd": (lambda i: tri(*fwd_args[i], sels[i], scale), [(0,), (1,)]),
        "op_auto_gating_plus_fwd": (lambda i: lk.block_sparse_attn(*fwd_args[i], grid_q=GRID, chunk_q=CHUNK,
                                                                   sparsity=sparsity), [(0,), (1,)]),
    }
    if up is not None:
        bhsd = [tuple(x.transpose(1, 2).contiguous() for x in s) for s in sets]
        fns["upstream_gating_plus_fwd"] = (
            lambda i: up(*bhsd[i], GRID, GRID, sparsity=sparsity, cdf_threshold=None, chunk_3d_shape_q=list(CHUNK),
                         chunk_3d_shape_k=list(CHUNK)), [(0,), (1,)])
    if args.ab:
        fns = {k: fns[k] for k in ("kernel_shared_ring", "triton_fwd")}
    res["fwd"] = _interleaved(fns, args.rounds, args.budget)
    t = {k: v["median_ms"] for k, v in res["fwd"].items()}
    print("    ms: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)
    if "upstream_gating_plus_fwd" in t:
        res["speedup_vs_upstream_op"] = t["upstream_gating_plus_fwd"] / t["op_auto_gating_plus_fwd"]
        print(f"    op vs upstream: {res['speedup_vs_upstream_op']:.3f}x", flush=True)
    return res


def case_refine(args) -> dict:
    """40 fresh frames vs [8 cached; 40 fresh], 44x80, video, 0.9375: the refine step's call."""
    c, T, Hf, Wf = 8, 40, 44, 80
    res = {"case": "refine_attention", "inputs": "video", "cache_frames": c, "fresh_frames": T, "hw": [Hf, Wf]}
    q, k_all, v_all = _inputs("video", (T, Hf, Wf), 3, grid_k=(c + T, Hf, Wf))
    Sc = c * Hf * Wf
    kc, vc, k, v = k_all[:, :Sc], v_all[:, :Sc], k_all[:, Sc:], v_all[:, Sc:]
    scale = D ** -0.5
    sel = lk.select_blocks(q, k_all, grid_q=(T, Hf, Wf), grid_k=(c + T, Hf, Wf), chunk_q=CHUNK, sparsity=0.9375)
    res["share"] = _share(sel)
    ref = lk.block_sparse_attn(q, k_all, v_all, selection=sel, backend="triton")
    del k_all, v_all
    out, _ = bsa_forward_segments_cuda(q, kc, vc, k, v, sel, scale, kernel="sm90_ws")
    res["check"] = {"rel_l2_vs_triton": _rel(out, ref), "nan": bool(out.isnan().any())}
    print(f"[refine] share {res['share']} check {res['check']}", flush=True)
    plain = selection_args(sel)
    raw = ops().bsa_fwd_cuda
    pre = kernel_selection_args(sel, "sm90_ws")
    fns = {
        "kernel_shared_ring": (lambda: raw(q, kc, vc, k, v, *pre[0], scale, "sm90_ws", False, pre[1]), [()]),
        "wrapper_shared_ring": (lambda: bsa_forward_segments_cuda(q, kc, vc, k, v, sel, scale, kernel="sm90_ws",
                                                                  return_lse=False), [()]),
        "kernel_private_rings": (lambda: raw(q, kc, vc, k, v, *plain, scale, "sm90_ws", False, None), [()]),
    }
    res["fwd"] = _interleaved(fns, args.rounds, args.budget)
    print("    ms: " + ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in res["fwd"].items()), flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--upstream", default=None, help="a LongCat-Video checkout (its longcat_video package)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timed calls per implementation and round")
    p.add_argument("--no-refine", action="store_true", help="skip the refine step's two-segment call")
    p.add_argument("--ab", action="store_true",
                   help="A/B mode: only the kernel with the shared ring and Triton, video and random at 0.9375 "
                        "(run it from two checkouts in turn to compare two builds of the kernel)")
    p.add_argument("--ncu-target", action="store_true",
                   help="run the kernel once with the shared ring and once without (video, 0.9375) and exit: "
                        "the target of `ncu -k regex:bsa_fwd_sm90ws -c 2 ...`")
    p.add_argument("--no-upstream-timing", action="store_true", help="time ours only (the upstream checks stay off)")
    p.add_argument("--csrc-tag", default="", help="a label of the kernel build, written into the results")
    args = p.parse_args(argv)
    if kernel_selection_args is None:
        print("historical: the shared ring was removed (csrc/NOTES.md v9); check out cfd2754 to re-run", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from bench.machine import machine_header

    if args.ncu_target:
        q, k, v = _inputs("video", GRID, 1)
        sel = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=0.9375)
        pre = kernel_selection_args(sel, "sm90_ws")
        plain = selection_args(sel)
        torch.cuda.synchronize()
        ops().bsa_fwd_cuda(q, k, v, None, None, *pre[0], D ** -0.5, "sm90_ws", False, pre[1])
        ops().bsa_fwd_cuda(q, k, v, None, None, *plain, D ** -0.5, "sm90_ws", False, None)
        torch.cuda.synchronize()
        print("ncu target: shared ring, then private rings", flush=True)
        return 0
    up, up_note = upstream_bsa(args.upstream)
    print(f"upstream: {up_note}", flush=True)
    if args.no_upstream_timing:
        up, up_note = None, "not timed (--no-upstream-timing)"
    plan = [("plain", kind, s) for s in (0.9375, 0.875) for kind in ("video", "random")]
    if args.ab:
        plan = [("plain", kind, 0.9375) for kind in ("video", "random")]
        args.no_refine = True
    if not args.no_refine:
        plan.append(("refine",))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bsa_shared_ring{'_' + args.csrc_tag if args.csrc_tag else ''}.json")
    results = []
    for item in plan:
        try:
            results.append(case_refine(args) if item[0] == "refine" else case_plain(item[1], item[2], args, up))
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
