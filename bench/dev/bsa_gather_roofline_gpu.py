"""Dev script (GPU): the memory roofline of the block-sparse forward's gathers, measured.

The BSA forward (grid 24x44x80, chunk 4x4x4, B1 H32 D128, bf16) visits, per (query block, head),
its selected key blocks: every visit fetches a 64-row K tile and a 64-row V tile (32 KB) for 2.1
MFLOP of tensor work, i.e. 64 FLOP per byte. This script times, side by side in one run:

  fwd            the real Triton forward (``bsa_fwd``) on a real top-k selection;
  gather_kv      the same grid, walk and K/V loads with no math (tiles summed into registers):
                 the time the forward's loads alone take;
  gather_k       K loads alone (half the bytes);
  l2_stream      every program re-reads 32 KB tiles of a 16 MB L2-resident buffer (ceiling of
                 L2 -> SM read bandwidth with whole-line coalesced loads);
  dram_copy      a 4 GB device copy (read + write bytes).

and reports bytes, TB/s, and the forward time implied by each bandwidth at the 13x target.

    PYTHONPATH=$PWD python bench/dev/bsa_gather_roofline_gpu.py --out $OUT/roofline.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from bench.machine import machine_header
from longcat_kernels import select_blocks
from longcat_kernels.ops.block_sparse_attn import _triton_kernels as K
from longcat_kernels.ops.block_sparse_attn.triton import _fwd_cfg, _geom


@triton.jit(do_not_specialize=["Tk", "HH", "WW", "nHk", "nWk", "NQ", "MAX_SEL"])
def gather_kernel(k, v, out, idx, cnt, s_ks, s_kh, s_vs, s_vh, Tk, HH, WW, nHk, nWk, NQ, MAX_SEL, NH,
                  CKT: tl.constexpr, CKH: tl.constexpr, CKW: tl.constexpr, KBLK: tl.constexpr,
                  D: tl.constexpr, LOAD_V: tl.constexpr):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_h = i_bh % NH
    o_d = tl.arange(0, D)
    o_rk = tl.arange(0, KBLK)
    o_slot = o_rk * 0
    row = i_bh.to(tl.int64) * NQ + i_m
    n_sel = tl.load(cnt + row)
    p_idx = idx + row * MAX_SEL
    k_base = k + i_h.to(tl.int64) * s_kh
    v_base = v + i_h.to(tl.int64) * s_vh
    acc = tl.zeros([KBLK, D], dtype=tl.float32)
    for j in range(0, n_sel):
        seq_k, m_k = K._selected_key_rows(p_idx, j, n_sel, o_slot, o_rk, Tk, HH, WW, nHk, nWk,
                                          CKT, CKH, CKW, 1)
        acc += tl.load(k_base + seq_k[:, None] * s_ks + o_d[None, :]).to(tl.float32)
        if LOAD_V:
            acc += tl.load(v_base + seq_k[:, None] * s_vs + o_d[None, :]).to(tl.float32)
    tl.store(out + row, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def l2_stream_kernel(buf, out, n_tiles, ITERS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    o = tl.arange(0, ROWS)[:, None] * D + tl.arange(0, D)[None, :]
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    for it in range(ITERS):
        t = (pid * 7 + it * 13) % n_tiles
        acc += tl.load(buf + t.to(tl.int64) * (ROWS * D) + o).to(tl.float32)
    tl.store(out + pid, tl.sum(tl.sum(acc, 1), 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sparsity", default="0.9375,0.875")
    args = ap.parse_args()
    dev = torch.device("cuda")
    grid, chunk, B, H, D = (24, 44, 80), (4, 4, 4), 1, 32, 128
    S = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(B, S, 3, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.unbind(2)
    res = {"machine": machine_header(dev), "shape": dict(grid=grid, chunk=chunk, B=B, H=H, D=D), "cases": {}}
    print(json.dumps(res["machine"]), flush=True)
    (nT, nH, nW), bn, even = _geom(grid, chunk)
    NQ = nT * nH * nW
    for sp in [float(x) for x in args.sparsity.split(",")]:
        sel = select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=sp, backend="triton")
        visits = int(sel.counts.sum())
        kv_bytes = visits * bn * D * 2 * 2
        flops = 4 * visits * bn * bn * D
        outp = torch.empty(B * H * NQ, device=dev, dtype=torch.float32)
        cfg = _fwd_cfg(bn)

        def gather(load_v: bool):
            gather_kernel[(NQ, B * H)](k, v, outp, sel.indices, sel.counts, k.stride(1), k.stride(2),
                                       v.stride(1), v.stride(2), grid[0], grid[1], grid[2], nH, nW, NQ,
                                       sel.indices.shape[-1], H, CKT=4, CKH=4, CKW=4, KBLK=bn, D=D,
                                       LOAD_V=load_v, num_warps=cfg[1], num_stages=cfg[2])

        def fwd():
            return torch.ops.longcat_kernels.bsa_fwd(q, k, v, sel.indices, sel.counts, list(grid), list(grid),
                                                    list(chunk), list(chunk), D ** -0.5)

        row = {"visits": visits, "kv_bytes_GB": kv_bytes / 1e9, "tflop_effective": flops / 1e12}
        for name, fn, nbytes in (("fwd", fwd, kv_bytes), ("gather_kv", lambda: gather(True), kv_bytes),
                                 ("gather_k", lambda: gather(False), kv_bytes / 2)):
            fn()
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=100, rep=1500, return_mode="median")
            row[f"{name}_ms"] = ms
            row[f"{name}_TBps"] = nbytes / ms / 1e9
            print(f"sparsity {sp}: {name:10s} {ms:7.2f} ms  {nbytes / ms / 1e9:5.2f} TB/s of K/V tiles"
                  + (f"  {flops / ms / 1e9:5.0f} TFLOP/s eff" if name == "fwd" else ""), flush=True)
        res["cases"][str(sp)] = row
    # L2 ceiling: 16 MB buffer (L2 is 50 MB), 32 KB tiles, whole lines
    ROWS, ITERS = 128, 512
    buf = torch.randn(16 * 2**20 // 2, device=dev, dtype=torch.bfloat16, generator=g)
    n_tiles = buf.numel() // (ROWS * D)
    nprog = 132 * 16
    o2 = torch.empty(nprog, device=dev, dtype=torch.float32)
    l2 = lambda: l2_stream_kernel[(nprog,)](buf, o2, n_tiles, ITERS=ITERS, ROWS=ROWS, D=D, num_warps=4, num_stages=3)  # noqa: E731
    l2()
    ms = do_bench(l2, warmup=100, rep=1000, return_mode="median")
    res["l2_stream_TBps"] = nprog * ITERS * ROWS * D * 2 / ms / 1e9
    print(f"l2_stream  {ms:7.3f} ms  {res['l2_stream_TBps']:5.2f} TB/s (L2-resident reads)", flush=True)
    a = torch.empty(2 * 2**30 // 2, device=dev, dtype=torch.bfloat16)
    bcp = torch.empty_like(a)
    ms = do_bench(lambda: bcp.copy_(a), warmup=20, rep=500, return_mode="median")
    res["dram_copy_TBps"] = 2 * a.numel() * 2 / ms / 1e9
    print(f"dram_copy  {ms:7.3f} ms  {res['dram_copy_TBps']:5.2f} TB/s (read + write)", flush=True)
    res["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bsa_gather_roofline.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
