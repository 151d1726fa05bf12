"""GPU check-then-time: the experimental pair-of-query-blocks BSA forward (``triton_pairs.py``)
against the dispatched Triton forward, on random and on video-like inputs, in one run.

For each input class (``random``: independent normal q/k/v, selections of neighbouring query
blocks unrelated; ``video``: ``testing.make_video_qkv``, smooth (t, h, w) fields + per-head noise)
and each (chunk, sparsity) case at the LongCat shape (grid 24x44x80, B1 H32 D128 bf16):

1. gating once (Triton ``select_blocks``) and the neighbour overlap of that selection
   (``testing.selection_overlap``: Jaccard per axis, pair load ratio = key-block loads left);
2. check: pairs output and lse vs the Triton forward's (bf16; max abs diff, relative L2; a case
   whose check fails is reported and not timed);
3. time (``triton.testing.do_bench``, median, L2 flushed between reps): Triton forward, pairs
   forward (``split`` variant) including its union build, the union build alone, the pairs kernel
   alone for both variants (``split``: per-block matmuls, union loads; ``masked``: one 2-block tile)
   and a few (num_warps, num_stages), and the Triton forward+backward (the training path) on the
   same inputs.

Upstream's BSA is not installed on the device machine, so it is not timed here (issue 18 quotes
H200 upstream: 27.82 ms forward, 95.23 ms forward+backward at 24x44x80, 0.9375).

    PYTHONPATH=$PWD python bench/bsa_pairs_gpu_dev.py --out $OUT [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bsa_pairs_triton as P  # noqa: E402 - the experimental kernel lives next to this script

from longcat_kernels import select_blocks
from longcat_kernels.ops.block_sparse_attn import triton as T
from longcat_kernels.testing import make_qkv, make_video_qkv, selection_overlap

# (chunk, sparsity, run the pairs kernel): with 128-token query blocks a pair is a 256-row tile,
# too large for registers at D=128, so 4x4x8 times only the dispatched Triton path
CASES = [((4, 4, 4), 0.9375, True), ((4, 4, 4), 0.875, True), ((4, 4, 8), 0.9375, False), ((4, 4, 8), 0.875, False)]
PAIR_CONFIGS = [(4, 2), (8, 2), (8, 3), (4, 3)]
VARIANTS = ("split", "masked")


def _ms(fn, quick: bool) -> float:
    return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 150, return_mode="median"))


def _inputs(kind: str, grid, B, H, D, dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    S = grid[0] * grid[1] * grid[2]
    if kind == "random":
        return make_qkv(B, S, H, D, dtype=dtype, device="cuda", generator=g)
    return make_video_qkv(B, grid, H, D, dtype=dtype, device="cuda", generator=g)


def run_case(kind: str, chunk, sparsity, args, pairs: bool = True) -> dict:
    grid, B, H, D, dtype = tuple(args.grid), 1, args.heads, 128, torch.bfloat16
    q, k, v = _inputs(kind, grid, B, H, D, dtype, seed=1)
    scale = D ** -0.5
    sel = select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=sparsity, backend="triton")
    res = {"inputs": kind, "grid": list(grid), "chunk": list(chunk), "sparsity": sparsity, "B": B, "H": H, "D": D,
           "overlap": selection_overlap(sel)}
    # ---- check
    ref_out, ref_lse = T.bsa_forward_triton(q, k, v, sel, scale)
    checks, ok = {}, True
    for variant in VARIANTS if pairs else ():
        out, lse = P.bsa_forward_pairs(q, k, v, sel, scale, variant=variant)
        torch.cuda.synchronize()
        diff = (out.float() - ref_out.float())
        rel = float(diff.norm() / ref_out.float().norm().clamp_min(1e-12))
        fin = torch.isfinite(ref_lse)
        lse_diff = float((lse[fin] - ref_lse[fin]).abs().max()) if fin.any() else 0.0
        v_ok = (not out.isnan().any().item()) and rel < 1e-2 and lse_diff < 1e-2
        v_ok = v_ok and torch.equal(torch.isfinite(lse), fin)
        checks[variant] = {"ok": bool(v_ok), "out_rel_l2": rel, "out_max_abs": float(diff.abs().max()),
                           "lse_max_abs": lse_diff}
        ok = ok and v_ok
    res["check"] = {"ok": bool(ok), "pairs_run": pairs, "variants": checks}
    print(f"[{kind} chunk {chunk} s={sparsity}] overlap "
          f"{ {k_: round(v_, 3) for k_, v_ in res['overlap'].items()} } check {res['check']}", flush=True)
    if not ok:
        return res
    # ---- time
    t = {}
    t["select_blocks_triton"] = _ms(lambda: select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=sparsity,
                                                          backend="triton"), args.quick)
    t["fwd_triton"] = _ms(lambda: T.bsa_forward_triton(q, k, v, sel, scale), args.quick)
    t["fwd_pairs_incl_union"] = _ms(lambda: P.bsa_forward_pairs(q, k, v, sel, scale), args.quick) if pairs else None
    t["pair_union_build"] = _ms(lambda: P.pair_union(sel), args.quick) if pairs else None
    union = P.pair_union(sel) if pairs else None
    per_cfg = {}
    for variant in VARIANTS if pairs else ():
        for nw, ns in PAIR_CONFIGS:
            try:
                per_cfg[f"{variant}_w{nw}s{ns}"] = _ms(
                    lambda: P.bsa_forward_pairs(q, k, v, sel, scale, union=union, variant=variant, num_warps=nw,
                                                num_stages=ns), args.quick)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a config
                per_cfg[f"{variant}_w{nw}s{ns}"] = f"failed: {type(e).__name__}: {e}"[:200]
    t["fwd_pairs_kernel_by_config"] = per_cfg
    for variant in VARIANTS:
        good = [x for key, x in per_cfg.items() if key.startswith(variant + "_") and isinstance(x, float)]
        t[f"fwd_pairs_kernel_best_{variant}"] = min(good) if good else None
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(q)

    def fwd_bwd():
        o = T.block_sparse_attn_triton(qg, kg, vg, sel, scale)
        o.backward(do)
        qg.grad = kg.grad = vg.grad = None

    t["fwd_bwd_triton"] = _ms(fwd_bwd, args.quick)
    res["ms"] = t
    print(f"    ms: fwd triton {t['fwd_triton']:.2f} | pairs incl union {t['fwd_pairs_incl_union']} "
          f"(union {t['pair_union_build']}, kernel best split {t['fwd_pairs_kernel_best_split']} / masked "
          f"{t['fwd_pairs_kernel_best_masked']}) | "
          f"fwd+bwd triton {t['fwd_bwd_triton']:.2f} | gating {t['select_blocks_triton']:.2f}", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--grid", type=int, nargs=3, default=(24, 44, 80))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from bench.machine import machine_header

    results = []
    for chunk, sparsity, pairs in CASES:
        for kind in ("random", "video"):
            try:
                results.append(run_case(kind, chunk, sparsity, args, pairs))
            except Exception:  # noqa: BLE001 - keep the other cases
                traceback.print_exc()
                results.append({"inputs": kind, "chunk": list(chunk), "sparsity": sparsity,
                                "error": traceback.format_exc()[-2000:]})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bsa_pairs.json")
    with open(path, "w") as f:
        json.dump({"header": machine_header("cuda"), "results": results}, f, indent=2, default=str)
    print(f"\n{'inputs':7} {'chunk':8} {'sparsity':>8} {'pairload':>8} {'jacc':>6} {'fwd':>8} {'pairs':>8} "
          f"{'k.split':>8} {'k.masked':>8} {'fwd+bwd':>8}  check")
    for r in results:
        if "error" in r:
            print(f"{r['inputs']:7} {str(r['chunk']):8} {r['sparsity']:8} ERROR")
            continue
        ov, ms = r["overlap"], r.get("ms", {})

        def f(x):
            return f"{x:8.2f}" if isinstance(x, float) else f"{'-':>8}"

        print(f"{r['inputs']:7} {'x'.join(map(str, r['chunk'])):8} {r['sparsity']:8} {ov['pair_load_ratio']:8.3f} "
              f"{ov['jaccard_mean']:6.3f} {f(ms.get('fwd_triton'))} {f(ms.get('fwd_pairs_incl_union'))} "
              f"{f(ms.get('fwd_pairs_kernel_best_split'))} {f(ms.get('fwd_pairs_kernel_best_masked'))} "
              f"{f(ms.get('fwd_bwd_triton'))}  {r['check']['ok']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
