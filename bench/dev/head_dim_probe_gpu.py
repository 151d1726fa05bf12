"""GPU question (session 20, from the fifth audit): which head_dims does each op run on CUDA, per backend,
and does a head_dim a kernel cannot take end in a named error (``BackendUnavailableError`` /
``ValueError``) for an explicit backend and in a working fallback under ``"auto"``, never in a Triton
``OutOfResources`` / compile error or a wrong answer?

For each head_dim and op (block-sparse forward, forward + backward, select_blocks, dense cached-KV
attention, prefix attention, qk_norm_rope), bf16 inputs on tiny shapes, every backend: the outcome
(ok + rel. L2 against the torch reference in fp32, or the exception's type and first line). A line
per case on stdout, all of them in ``head-dim-probe.json`` under ``--out``.

    PYTHONPATH=$PWD python bench/dev/head_dim_probe_gpu.py --out $OUT
    python bench/dev/head_dim_probe_gpu.py --smoke     # CPU: torch backend only, checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os

import torch

HEAD_DIMS = (8, 36, 60, 64, 72, 80, 96, 100, 128, 160, 192, 256, 320, 512)
GRID = (4, 8, 8)  # 256 tokens, 4 key blocks of 4x4x4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _cases(D: int, dev: torch.device, dt: torch.dtype, upcast: bool = False):
    """The ops on inputs drawn in fp32 and rounded to ``dt`` (``upcast``: then back to fp32, the
    reference's inputs)."""
    import longcat_kernels as lk

    g = torch.Generator(device=dev).manual_seed(D)
    S, H = GRID[0] * GRID[1] * GRID[2], 2

    def r(*shape):
        x = torch.randn(*shape, device=dev, dtype=torch.float32, generator=g).to(dt)
        return x.float() if upcast else x

    q, k, v = r(1, S, H, D), r(1, S, H, D), r(1, S, H, D)
    kc, vc = r(1, 128, H, D), r(1, 128, H, D)
    wq, wk = r(D) * 0.1 + 1, r(D) * 0.1 + 1
    bsa = dict(grid_q=GRID, sparsity=0.5)

    def fwd(b):
        return lk.block_sparse_attn(q, k, v, backend=b, **bsa)

    def fwd_bwd(b):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = lk.block_sparse_attn(qq, kk, vv, backend=b, **bsa)
        out.float().square().sum().backward()
        return torch.cat([x.grad.flatten() for x in (qq, kk, vv)])

    def sel(b):
        return lk.select_blocks(q, k, backend=b, **bsa).counts.float()

    def cached(b):
        return lk.attn_with_kv_cache(q, k, v, kc, vc, backend=b)

    def prefix(b):
        return lk.prefix_attn(q, k, v, 64, backend=b)

    def norm(b):
        a, c = lk.qk_norm_rope(q, k, wq, wk, backend=b)
        return torch.cat([a.flatten(), c.flatten()])

    return {"bsa_fwd": fwd, "bsa_fwd_bwd": fwd_bwd, "select_blocks": sel, "attn_with_kv_cache": cached,
            "prefix_attn": prefix, "qk_norm_rope": norm}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="CPU, torch backend only, three head_dims")
    p.add_argument("--head-dims", default=None, help="comma-separated head_dims (default: all of HEAD_DIMS)")
    args = p.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    from bench.machine import machine_header

    machine = machine_header(dev)  # first: a bad LONGCAT_KERNELS_BENCH_COMMIT stops the probe before it runs
    dt = torch.float32 if args.smoke else torch.bfloat16
    backends = ("torch",) if args.smoke else ("auto", "triton", "cuda")
    rows = []
    dims = tuple(int(d) for d in args.head_dims.split(",")) if args.head_dims else HEAD_DIMS
    for D in (dims[:3] if args.smoke else dims):
        refs = _cases(D, dev, dt, upcast=True)  # the torch reference in fp32 on the same rounded inputs
        for op, fn in _cases(D, dev, dt).items():
            try:
                ref = refs[op]("torch").float()
            except Exception as e:  # noqa: BLE001 - the reference refusing is a finding too
                ref, ref_err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            for b in backends:
                row = {"head_dim": D, "op": op, "backend": b}
                try:
                    got = fn(b).float()
                    row["status"] = "ok"
                    row["finite"] = bool(torch.isfinite(got).all())
                    if ref is not None and got.shape == ref.shape:
                        row["rel_l2"] = _rel(got, ref)
                except Exception as e:  # noqa: BLE001 - recorded, the probe goes on
                    row["status"] = type(e).__name__
                    row["error"] = str(e).splitlines()[0][:240] if str(e) else ""
                if ref is None:
                    row["reference"] = ref_err
                rows.append(row)
                print(json.dumps(row), flush=True)
    bad = [r for r in rows if (r["backend"] == "auto" and r["status"] != "ok")
           or r["status"] not in ("ok", "BackendUnavailableError", "ValueError")
           or (r["status"] == "ok" and (not r["finite"] or r.get("rel_l2", 0) > 3e-2))]
    info = {"machine": machine, "rows": rows, "bad": bad}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "head-dim-probe.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"{len(rows)} cases, {len(bad)} bad (auto failing, an unnamed error, non-finite or rel. L2 > 3e-2)")
    for r in bad:
        print("BAD", json.dumps(r))


if __name__ == "__main__":
    main()
