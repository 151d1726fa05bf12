"""What the registered op ``longcat_kernels::fp8_quantize_rows`` and its per-call argument checks cost.

Since audit round 39 the fp8 quantisation kernel runs inside a ``torch.library.custom_op`` that checks
its arguments on every call (``ops/fp8_quant/triton.py``: ``_check_op_args``); before, the public
function launched the kernel from plain Python. This script times, side by side in one run, three
ways of doing the same quantisation:

- ``api``: the public function (``longcat_kernels.fp8_quantize_rows`` / ``fp8_modulate_quantize`` /
  ``fp8_silu_mul_quantize``, ``backend="triton"``): public checks, dispatch, the registered op;
- ``op``: ``torch.ops.longcat_kernels.fp8_quantize_rows`` called directly (the op's dispatch and checks);
- ``raw``: the Triton kernel launched directly with the same arguments (what the path was before).

Two measures per case: device time per call (CUDA events around each call, host gaps included:
``bench.timing.measure``) and host time per call (``perf_counter`` over 200 back-to-back calls with
no synchronisation in between, divided by 200: what the CPU spends issuing one call). The shapes are
the 480p VC step's (M = 62,400 rows; C = 4,096, SwiGLU 11,008) and a small launch-bound one
(M = 256). Outputs of the three ways are compared bit for bit first.

Run: ``PYTHONPATH=$PWD python bench/dev/fp8_op_overhead_gpu.py --out $OUT/fp8_op_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402

import longcat_kernels as lk  # noqa: E402
from bench.timing import TimingPolicy, measure  # noqa: E402
from longcat_kernels.ops.fp8_quant import triton as fq  # noqa: E402


def raw_launch(prologue, x, x2=None, shift=None, scale=None, eps=1e-6):
    """The kernel launched as the pre-op path did (no custom op, no checks)."""
    M, C = x.shape
    q = torch.empty((M, C), device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    rows_per_frame, frames, sh_b, sh_t, sc_b, sc_t = 1, 1, 0, 0, 0, 0
    if prologue == "modulate":
        B, F_, _ = shift.shape
        rows_per_frame, frames = M // (B * F_), F_
        sh_b, sh_t, sc_b, sc_t = shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1)
    block = triton.next_power_of_2(C)
    d = x
    fq.fp8_rows_kernel[(M,)](
        x, x2 if x2 is not None else d, shift if shift is not None else d, scale if scale is not None else d,
        d, d, q, s, d, C, x.stride(0), x2.stride(0) if x2 is not None else 0, q.stride(0), 0,
        rows_per_frame, frames, sh_b, sh_t, sc_b, sc_t, float(eps),
        PROLOGUE=fq.PROLOGUES[prologue], HAS_AFFINE=False, WRITE_Y=False, BLOCK=block, num_warps=fq._num_warps(block))
    return q, s


def cases(device):
    dt = torch.bfloat16
    out = []
    for M in (62400, 256):
        x = torch.randn(M, 4096, device=device, dtype=dt)
        out.append((f"none M{M} C4096", "none", dict(x=x)))
        x1 = torch.randn(M, 11008, device=device, dtype=dt)
        x2 = torch.randn(M, 11008, device=device, dtype=dt)
        out.append((f"silu_mul M{M} C11008", "silu_mul", dict(x=x1, x2=x2)))
        B, F_ = 2, (16 if M % 32 == 0 else 1)
        sh = torch.randn(B, F_, 4096, device=device, dtype=torch.float32) * 0.1
        sc = torch.randn(B, F_, 4096, device=device, dtype=torch.float32) * 0.1
        out.append((f"modulate M{M} C4096", "modulate", dict(x=x, shift=sh, scale=sc)))
    return out


def api_fn(prologue, a):
    if prologue == "none":
        return lambda: lk.fp8_quantize_rows(a["x"], backend="triton")
    if prologue == "silu_mul":
        return lambda: lk.fp8_silu_mul_quantize(a["x"], a["x2"], backend="triton")
    B, F_, C = a["shift"].shape
    x4 = a["x"].view(B, F_, -1, C)
    sh4, sc4 = a["shift"].unsqueeze(2), a["scale"].unsqueeze(2)
    return lambda: lk.fp8_modulate_quantize(x4, sh4, sc4, backend="triton")


def op_fn(prologue, a):
    args = (a["x"], a.get("x2"), a.get("shift"), a.get("scale"), None, None, prologue, 1e-6, False)
    return lambda: torch.ops.longcat_kernels.fp8_quantize_rows(*args)


def host_us(fn, n=200):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    pol = TimingPolicy(warmup=3, min_reps=20, max_reps=200, budget_s=0.5)
    for name, prologue, a in cases(dev):
        fns = {"api": api_fn(prologue, a), "op": op_fn(prologue, a),
               "raw": lambda a=a, prologue=prologue: raw_launch(prologue, a["x"], a.get("x2"), a.get("shift"),
                                                               a.get("scale"))}
        res = {k: f() for k, f in fns.items()}
        ref_q, ref_s = res["raw"][0], res["raw"][1]
        same = {}
        for k in ("api", "op"):
            q, s = res[k][0].reshape(ref_q.shape), res[k][1].reshape(ref_s.shape)
            same[k] = bool(torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s))
        dev_ms = {k: [] for k in fns}
        hst_us = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                dev_ms[k].append(measure(f, [()], dev, pol).median_ms)
                hst_us[k].append(host_us(f))
        row = {"case": name, "bit_equal_to_raw": same,
               "device_ms": {k: statistics.median(v) for k, v in dev_ms.items()},
               "host_us_per_call": {k: statistics.median(v) for k, v in hst_us.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
