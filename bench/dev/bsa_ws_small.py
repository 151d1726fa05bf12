"""Small-shape run of the sm90_ws BSA forward (one key segment, two key segments) for
compute-sanitizer: every path once, on shapes that finish in seconds under memcheck and racecheck,
each result checked against the torch reference (prints OK / FAIL per path).

    compute-sanitizer --tool memcheck  python bench/dev/bsa_ws_small.py
    compute-sanitizer --tool racecheck python bench/dev/bsa_ws_small.py
"""

from __future__ import annotations

import sys

import torch

import longcat_kernels as lk
from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda, bsa_forward_segments_cuda


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def main() -> int:
    torch.manual_seed(0)
    dev, dt, D, H = "cuda", torch.bfloat16, 128, 2
    bad = 0
    # forward: a partial grid with an odd number of query blocks
    grid = (5, 6, 10)
    q, k, v = (torch.randn(2, 300, H, D, device=dev, dtype=dt) for _ in range(3))
    sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=(4, 4, 4), sparsity=0.5, backend="torch")
    ref = lk.block_sparse_attn(q, k, v, selection=sel, backend="torch")
    for kern in ("sm90_ws",):
        out, _ = bsa_forward_cuda(q, k, v, sel, D ** -0.5, kernel=kern)
        torch.cuda.synchronize()
        r = rel(out, ref)
        ok = r < 1e-2 and not out.isnan().any()
        bad += not ok
        print(f"{'OK' if ok else 'FAIL'} fwd {kern}: rel L2 {r:.2e}", flush=True)
    # two key segments: a batch-1 cache of 4 frames + 5 fresh frames
    Hf, Wf, c, T = 6, 10, 4, 5
    qf = torch.randn(2, T * Hf * Wf, H, D, device=dev, dtype=dt)
    kc, vc = (torch.randn(1, c * Hf * Wf, H, D, device=dev, dtype=dt) for _ in range(2))
    kf, vf = (torch.randn(2, T * Hf * Wf, H, D, device=dev, dtype=dt) for _ in range(2))
    k_all, v_all = torch.cat([kc.expand(2, -1, -1, -1), kf], 1), torch.cat([vc.expand(2, -1, -1, -1), vf], 1)
    sel2 = lk.select_blocks(qf, k_all, grid_q=(T, Hf, Wf), grid_k=(c + T, Hf, Wf), chunk_q=(4, 4, 4), sparsity=0.5,
                            backend="torch")
    ref2 = lk.block_sparse_attn(qf, k_all, v_all, selection=sel2, backend="torch")
    for kern in ("sm90_ws",):
        out, _ = bsa_forward_segments_cuda(qf, kc, vc, kf, vf, sel2, D ** -0.5, kernel=kern)
        torch.cuda.synchronize()
        r = rel(out, ref2)
        ok = r < 1e-2 and not out.isnan().any()
        bad += not ok
        print(f"{'OK' if ok else 'FAIL'} two segments {kern}: rel L2 {r:.2e}", flush=True)
    print("ALL OK" if bad == 0 else f"{bad} FAILED", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
