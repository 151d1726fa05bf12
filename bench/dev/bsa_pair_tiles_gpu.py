"""Issue 18: the sm90_ws BSA forward with pair tiles (csrc/bsa_fwd_sm90_ws.cu, NOTES.md v10).

Checks the csrc sm90_ws forward against Triton's (rel. L2, lse, NaN) and times it beside Triton's
forward on pre-computed selections: 24x44x80, B1 H32 D128 bf16, chunk 4x4x4, video-like
(``testing.make_video_qkv``) and random inputs, sparsity 0.9375 and 0.875, two input sets each,
interleaved rounds, medians. To compare two builds of the kernel, run it from two checkouts in turn
(processes alternating: new, old, new, old); each prints one line per case.

    PYTHONPATH=$PWD python bench/dev/bsa_pair_tiles_gpu.py --out $OUT/new1.json [--rounds 3]
"""

from __future__ import annotations

import json
import sys

import torch

import longcat_kernels as lk
from bench.timing import TimingPolicy, ab_parser, ab_results, interleaved
from longcat_kernels.dispatch import impl_fn
from longcat_kernels.ops.block_sparse_attn.cuda import ops, selection_args
from longcat_kernels.testing import make_qkv, make_video_qkv

B, H, D = 1, 32, 128
DT = torch.bfloat16
GRID = (24, 44, 80)
CHUNK = (4, 4, 4)


def _inputs(kind, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "random":
        return make_qkv(B, GRID[0] * GRID[1] * GRID[2], H, D, dtype=DT, device="cuda", generator=g)
    return make_video_qkv(B, GRID, H, D, dtype=DT, device="cuda", generator=g)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def case(kind, sparsity, rounds, budget, triton_timed=True) -> dict:
    sets = [_inputs(kind, seed) for seed in (1, 2)]
    scale = D ** -0.5
    sels = [lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=sparsity) for q, k, _ in sets]
    args = [selection_args(s) for s in sels]
    raw = ops().bsa_fwd_cuda
    tri = impl_fn("block_sparse_attn_fwd", "triton")
    q, k, v = sets[0]
    ref_out, ref_lse = tri(q, k, v, sels[0], scale)
    out, lse = raw(q, k, v, None, None, *args[0], scale, "sm90_ws", True)
    torch.cuda.synchronize()
    fin = torch.isfinite(ref_lse)
    check = {"rel_l2_vs_triton": _rel(out, ref_out), "nan": bool(out.isnan().any()),
             "lse_max_abs": float((lse[fin] - ref_lse[fin]).abs().max()),
             "lse_inf_match": bool(torch.equal(torch.isfinite(lse), fin))}
    check["ok"] = (not check["nan"]) and check["rel_l2_vs_triton"] < 1e-2 and check["lse_inf_match"]
    del out, lse, ref_out, ref_lse
    fns = {
        "kernel_sm90_ws": lambda i: raw(*sets[i], None, None, *args[i], scale, "sm90_ws", False),
        "triton_fwd": lambda i: tri(*sets[i], sels[i], scale),
    }
    if not triton_timed:
        del fns["triton_fwd"]
    pol = TimingPolicy(warmup=2, min_reps=3, max_reps=50, budget_s=budget)
    ms, per = interleaved(fns, [(0,), (1,)], "cuda", pol, rounds)
    res = {"inputs": kind, "sparsity": sparsity, "check": check, "ms": ms, "rounds_ms": per}
    print(f"[{kind} s={sparsity}] check ok={check['ok']} rel={check['rel_l2_vs_triton']:.2e} "
          f"lse={check['lse_max_abs']:.1e} | kernel {ms['kernel_sm90_ws']:.2f} ms, triton {ms.get('triton_fwd', float('nan')):.2f} ms",
          flush=True)
    return res


def main() -> int:
    p = ab_parser(__doc__, budget=0.4, cases="video:0.9375,random:0.9375,video:0.875,random:0.875")
    p.add_argument("--no-triton", action="store_true", help="time the csrc kernel only")
    args = p.parse_args()
    res = ab_results({"B": B, "H": H, "D": D, "grid": GRID, "chunk": CHUNK, "dtype": "bf16"})
    if res is None:
        return 2
    bad = 0
    for spec in args.cases.split(","):
        kind, s = spec.split(":")
        r = case(kind, float(s), args.rounds, args.budget, not args.no_triton)
        bad += not r["check"]["ok"]
        res["cases"].append(r)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
