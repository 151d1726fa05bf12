"""GPU check-then-time: diffusers' Wan2.1-14B-shaped transformer step with LongCat BSA vs diffusers'
default attention, in one run.

1. Check (small config, bf16): our processor at sparsity 0 (dense op, and the block-sparse kernel
   with every block kept) vs the untouched model; refuses to time on a mismatch.
2. Time (Wan2.1-T2V-14B dims from its diffusers config: 40 heads x 128, hidden 5120, ffn 13824,
   text_dim 4096, patch 1x2x2; depth reduced to ``--layers``; random bf16 weights): one transformer
   forward at 720p 81 frames (latent 21x90x160 -> grid 21x45x80 = 75,600 tokens), batch 1, for
   diffusers' default attention, ours at sparsity 0 (dense path) and ours at 0.875 (chunk 4x4x4).
   Median of ``--reps`` CUDA-event timings after a warm-up.
3. lse cost: block_sparse_attn and the dense cached-KV op with and without ``return_lse`` at
   40 heads, D128, grid 21x45x80 (sparsity 0.875), per backend that runs here.

    PYTHONPATH=$PWD LONGCAT_KERNELS_JIT=1 python bench/wan_step_gpu.py --out $OUT/wan_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _events_ms(fn, reps: int, warmup: int = 1):
    """Median CUDA-event ms of ``fn()`` over ``reps`` runs after ``warmup`` (``bench.timing.measure``),
    and the run's statistics (min, p20/p80, spread)."""
    from bench.timing import TimingPolicy, measure

    t = measure(fn, [()], "cuda", TimingPolicy(warmup=warmup, min_reps=reps, max_reps=reps, budget_s=0.0))
    return t.median_ms, t.as_dict()


def to_dtype_like_diffusers(m, device, dtype):
    """``from_pretrained(torch_dtype=dtype)``'s casting for a model built from a config: parameters
    to ``dtype`` except the modules diffusers keeps in fp32 (``_keep_in_fp32_modules``); buffers
    (the fp64 RoPE tables) keep their dtype."""
    keep = set(getattr(m, "_keep_in_fp32_modules", None) or [])
    m.to(device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.is_floating_point() and not keep.intersection(name.split(".")):
                p.data = p.data.to(dtype)
    return m


def _model(WanTransformer3DModel, layers, heads, head_dim, ffn, text_dim, seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )
    with torch.no_grad():
        for p in m.parameters():  # random weights at a scale that keeps activations O(1)
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return to_dtype_like_diffusers(m, "cuda", dtype).eval()


def _inputs(latent_fhw, text_dim, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    F, H, W = latent_fhw
    x = torch.randn(1, 16, F, H, W, device="cuda", dtype=torch.bfloat16, generator=g)
    txt = torch.randn(1, 512, text_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([500], device="cuda"), encoder_hidden_states=txt,
                return_dict=False)


def check(WanTransformer3DModel, lk, integ) -> dict:
    """Self-calibrating (FlashAttention's rule): against the same model in fp32, our bf16 step's error
    must be at most 2x diffusers' own bf16 error (+1e-3)."""
    inp = _inputs((9, 32, 48), 64)
    with torch.no_grad():
        m32 = _model(WanTransformer3DModel, 2, 4, 128, 512, 64, dtype=torch.float32)
        inp32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inp.items()}
        ref32 = m32(**inp32)[0].float()
        del m32
        m = _model(WanTransformer3DModel, 2, 4, 128, 512, 64)
        ref = m(**inp)[0].float()
        rel = lambda a: ((a - ref32).norm() / ref32.norm()).item()  # noqa: E731
        base = rel(ref)
        res = {"diffusers_bf16_rel_l2": base}
        for name, dz in (("dense_op", True), ("bsa_all_blocks", False)):
            integ.apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0), dense_at_zero=dz)
            out = m(**inp)[0].float()
            integ.remove_block_sparse_attention(m)
            res[name] = {"rel_l2": rel(out), "finite": bool(torch.isfinite(out).all())}
        back = m(**inp)[0].float()
    res["removed_bitwise_equal"] = bool(torch.equal(back, ref))
    res["ok"] = all(r["finite"] and r["rel_l2"] <= 2 * base + 1e-3 for r in res.values() if isinstance(r, dict)) \
        and res["removed_bitwise_equal"]
    del m
    torch.cuda.empty_cache()
    return res


def time_step(WanTransformer3DModel, lk, integ, layers, reps) -> dict:
    m = _model(WanTransformer3DModel, layers, 40, 128, 13824, 4096)
    inp = _inputs((21, 90, 160), 4096)
    res = {"config": {"layers": layers, "heads": 40, "head_dim": 128, "hidden": 5120, "ffn": 13824,
                      "grid": [21, 45, 80], "tokens": 75600, "dtype": "bf16", "batch": 1}}

    def fwd():
        with torch.no_grad():
            m(**inp)

    ms, timing = _events_ms(fwd, reps)
    res["diffusers_default"] = {"ms": ms, "timing": timing}
    for name, sp in (("ours_sparsity_0", 0.0), ("ours_sparsity_0.875", 0.875)):
        integ.apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=sp, chunk_q=(4, 4, 4)))
        ms, timing = _events_ms(fwd, reps)
        integ.remove_block_sparse_attention(m)
        res[name] = {"ms": ms, "timing": timing, "speedup_vs_diffusers": res["diffusers_default"]["ms"] / ms}
    res["targets"] = {
        "sparse_0.875_speedup_ge_2.0": res["ours_sparsity_0.875"]["speedup_vs_diffusers"] >= 2.0,
        "dense_ratio_le_1.02": res["diffusers_default"]["ms"] and
        res["ours_sparsity_0"]["ms"] / res["diffusers_default"]["ms"] <= 1.02,
    }
    del m
    torch.cuda.empty_cache()
    return res


def lse_cost(lk, reps) -> dict:
    from triton.testing import do_bench

    torch.manual_seed(0)
    grid = (21, 45, 80)
    S = 21 * 45 * 80
    q, k, v = (torch.randn(1, S, 40, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sel = lk.select_blocks(q, k, grid_q=grid, sparsity=0.875)
    out = {}
    for backend in ("triton", "cuda"):
        try:
            lk.block_sparse_attn(q, k, v, selection=sel, backend=backend)
        except Exception as e:  # noqa: BLE001 - report which backend cannot run here, keep going
            out[f"bsa_{backend}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        a = do_bench(lambda: lk.block_sparse_attn(q, k, v, selection=sel, backend=backend), rep=max(200, 60 * reps))
        b = do_bench(lambda: lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True),
                     rep=max(200, 60 * reps))
        out[f"bsa_{backend}"] = {"ms": a, "ms_lse": b, "lse_overhead": b / a - 1.0}
    kc, vc = k[:, : 4 * 45 * 80], v[:, : 4 * 45 * 80]
    qn, kn, vn = q[:, : 17 * 45 * 80], k[:, : 17 * 45 * 80], v[:, : 17 * 45 * 80]
    for backend in ("auto", "triton", "cuda"):
        try:
            lk.flash_attn_with_kvcache(qn, kc, vc, kn, vn, backend=backend)
        except Exception as e:  # noqa: BLE001
            out[f"kvcache_{backend}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        a = do_bench(lambda: lk.flash_attn_with_kvcache(qn, kc, vc, kn, vn, backend=backend), rep=max(200, 60 * reps))
        b = do_bench(lambda: lk.flash_attn_with_kvcache(qn, kc, vc, kn, vn, backend=backend, return_softmax_lse=True),
                     rep=max(200, 60 * reps))
        out[f"kvcache_{backend}"] = {"ms": a, "ms_lse": b, "lse_overhead": b / a - 1.0}
    out["target_le_2pct"] = all(r.get("lse_overhead", 0.0) <= 0.02 for r in out.values() if isinstance(r, dict))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.layers < 1 or args.reps < 1:
        raise SystemExit(f"--layers/--reps: expected >= 1, got {args.layers}/{args.reps}")
    # the JSON is written after minutes of timing: a missing --out folder was a FileNotFoundError then,
    # with every number lost (so were "" and a folder, IsADirectoryError)
    import os  # noqa: PLC0415

    from bench.machine import check_script_args

    check_script_args(ap, args, out="file")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from diffusers import WanTransformer3DModel

    import longcat_kernels as lk
    from longcat_kernels.integrations import diffusers as integ

    from bench.machine import machine_header
    from bench.writer import write_json

    t0 = time.time()
    res = {"machine": machine_header(torch.device("cuda")), "backends": lk.available_backends()}
    res["check"] = check(WanTransformer3DModel, lk, integ)
    print("check:", json.dumps(res["check"]), flush=True)
    if not res["check"]["ok"]:
        write_json(args.out, res, default=str)
        print("parity check FAILED: not timing", file=sys.stderr)
        return 1
    res["step"] = time_step(WanTransformer3DModel, lk, integ, args.layers, args.reps)
    print("step:", json.dumps({k: v.get("ms") if isinstance(v, dict) else v for k, v in res["step"].items()
                               if k != "config"}), flush=True)
    res["lse"] = lse_cost(lk, args.reps)
    print("lse:", json.dumps(res["lse"]), flush=True)
    res["wall_s"] = time.time() - t0
    write_json(args.out, res, default=str)
    print(f"wrote {args.out} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
