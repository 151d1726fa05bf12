"""The csrc sm90_ws dense forward (csrc/attn_fwd_sm90_ws.cu) as the raw kernel, checked and timed.

Cases at the 480p VC shapes (B2 H32 D128 bf16, 24x30x52 = 37,440 tokens, 1,560 per latent frame):
``kv-c<c>``: the cached-KV call without RoPE (fresh queries ``(24 - c) * 1560`` vs keys [cache of
``c`` latents broadcast over the batch; fresh]), ``c`` in 4 and 16; ``self``: all 37,440 tokens
attend all (the cache-off step's attention). Each is checked against cuDNN SDPA on the same inputs
(rel. L2 vs an fp32 SDPA on the first heads and query rows, NaN; ok while within 2x cuDNN's) and timed beside cuDNN SDPA on pre-built inputs
(K/V concatenated and repeated outside the timing), two input sets, interleaved rounds, medians.
To compare two builds of the kernel, run it from two checkouts in turn (processes alternating:
new, old, new, old); each prints one line per case.

    PYTHONPATH=$PWD python bench/dev/dense_ws_ab_gpu.py --out $OUT/new1.json [--rounds 3] [--no-cudnn]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from bench.timing import TimingPolicy, ab_parser, ab_results, interleaved
from longcat_kernels.ops.block_sparse_attn.cuda import ops

B, H, D = 2, 32, 128
T, HW = 24, 30 * 52
DT = torch.bfloat16


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _sdpa(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _inputs(c, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(b, s):
        return torch.randn(b, s, H, D, device="cuda", dtype=DT, generator=g)

    if c == 0:
        return rnd(B, T * HW), rnd(B, T * HW), rnd(B, T * HW), None, None
    return rnd(B, (T - c) * HW), rnd(B, (T - c) * HW), rnd(B, (T - c) * HW), rnd(1, c * HW), rnd(1, c * HW)


def case(c, rounds, budget, cudnn_timed=True) -> dict:
    sets = [_inputs(c, seed) for seed in (1, 2)]
    scale = D ** -0.5
    raw = ops().kv_cache_attn_fwd_cuda

    def ours(i):
        q, k, v, kc, vc = sets[i]
        return raw(q, k, v, kc, vc, *([None] * 6), 0, 0, scale, "sm90_ws", False)[0]

    def full_kv(i):
        q, k, v, kc, vc = sets[i]
        if kc is None:
            return k, v
        return torch.cat([kc.expand(B, -1, -1, -1), k], 1), torch.cat([vc.expand(B, -1, -1, -1), v], 1)

    pre = [full_kv(i) for i in range(2)]
    from torch.nn.attention import SDPBackend

    q = sets[0][0]
    out = ours(0)
    cud = _sdpa(q, *pre[0], SDPBackend.CUDNN_ATTENTION)
    hs, rows = 2, 4096  # the fp32 oracle on the first heads and query rows (its score matrix is materialised)
    ref = _sdpa(q[:, :rows, :hs].float(), pre[0][0][:, :, :hs].float(), pre[0][1][:, :, :hs].float(), SDPBackend.MATH)
    torch.cuda.synchronize()
    check = {"rel_l2_vs_fp32": _rel(out[:, :rows, :hs], ref), "cudnn_rel_l2_vs_fp32": _rel(cud[:, :rows, :hs], ref),
             "rel_l2_vs_cudnn": _rel(out, cud), "nan": bool(out.isnan().any())}
    check["ok"] = (not check["nan"]) and check["rel_l2_vs_fp32"] < 2 * check["cudnn_rel_l2_vs_fp32"] + 1e-4
    del out, cud, ref
    fns = {"kernel_sm90_ws": ours,
           "cudnn_prebuilt": lambda i: _sdpa(sets[i][0], *pre[i], SDPBackend.CUDNN_ATTENTION)}
    if not cudnn_timed:
        del fns["cudnn_prebuilt"]
    pol = TimingPolicy(warmup=2, min_reps=3, max_reps=50, budget_s=budget)
    ms, per = interleaved(fns, [(0,), (1,)], "cuda", pol, rounds)
    name = "self" if c == 0 else f"kv-c{c}"
    res = {"case": name, "cond_latents": c, "sq": q.shape[1], "sk": pre[0][0].shape[1], "check": check, "ms": ms,
           "rounds_ms": per}
    print(f"[{name}] check ok={check['ok']} rel={check['rel_l2_vs_fp32']:.2e} (cudnn {check['cudnn_rel_l2_vs_fp32']:.2e}) "
          f"| kernel {ms['kernel_sm90_ws']:.2f} ms, cudnn {ms.get('cudnn_prebuilt', float('nan')):.2f} ms", flush=True)
    return res


def main() -> int:
    p = ab_parser(__doc__, budget=0.4, cases="4,16,0", cases_help="cond latents per case (0: self-attention, no cache)")
    p.add_argument("--no-cudnn", action="store_true", help="time the csrc kernel only")
    args = p.parse_args()
    res = ab_results({"B": B, "H": H, "D": D, "grid": [T, 30, 52], "dtype": "bf16"})
    if res is None:
        return 2
    bad = 0
    for c in (int(x) for x in args.cases.split(",")):
        r = case(c, args.rounds, args.budget, not args.no_cudnn)
        bad += not r["check"]["ok"]
        res["cases"].append(r)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
