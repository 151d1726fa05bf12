"""Block-sparse attention in diffusers' Wan transformer, in three lines.

CPU (no arguments): a tiny random ``WanTransformer3DModel``; prints the difference to the untouched
model at sparsity 0 and at 0.875. GPU: Wan2.1-T2V-14B's config with random weights (``--layers`` of
its 40 blocks, default 4; 720p 81 frames), or real weights with ``--model-id Wan-AI/Wan2.1-T2V-14B-Diffusers``
(all of its blocks: ``--layers`` is refused with it). On the CPU ``--layers`` sets the tiny model's
blocks (default 2).

    PYTHONPATH=$PWD python examples/wan_diffusers_bsa.py
    PYTHONPATH=$PWD python examples/wan_diffusers_bsa.py --layers 4          # on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import WanTransformer3DModel

import longcat_kernels as lk
from longcat_kernels.integrations.diffusers import apply_block_sparse_attention, remove_block_sparse_attention


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


def build(args, device, dtype):
    if args.model_id:
        return WanTransformer3DModel.from_pretrained(args.model_id, subfolder="transformer", torch_dtype=dtype).to(device)
    if device.type == "cuda":  # Wan2.1-T2V-14B dims, fewer blocks, random weights
        cfg = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096,
                   num_layers=4 if args.layers is None else args.layers)
    else:  # --layers counts here too (it was ignored: always 2 blocks)
        cfg = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, text_dim=32,
                   num_layers=2 if args.layers is None else args.layers)
    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, **cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return to_dtype_like_diffusers(m, device, dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--layers", type=int, default=None,
                    help="blocks of the random-weight model (default: GPU 4 of Wan2.1-14B's 40, CPU 2)")
    ap.add_argument("--sparsity", type=float, default=0.875)
    args = ap.parse_args()
    # before building anything: --layers 0 built a GPU model without blocks (rel L2 0, same step time,
    # nothing tested) and a bad --sparsity failed only after the dense and sparsity-0 runs
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers: expected a positive number of blocks, got {args.layers}")
    if args.layers is not None and args.model_id:  # was ignored: from_pretrained loads every block
        ap.error(f"--layers {args.layers}: applies to the random-weight model only; --model-id loads all of "
                 "the model's blocks")
    if not 0.0 <= args.sparsity < 1.0:  # NaN too
        ap.error(f"--sparsity: expected a float in [0, 1), got {args.sparsity}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = build(args, device, dtype).eval()
    # latent video [B, 16, F, H, W]: 720p 81 frames on GPU (grid 21x45x80 after the 1x2x2 patch)
    fhw = (21, 90, 160) if device.type == "cuda" else (5, 16, 16)
    x = torch.randn(1, 16, *fhw, device=device, dtype=dtype)
    txt = torch.randn(1, 512, m.config.text_dim, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)

    def step():
        with torch.no_grad():
            out = m(x, t, txt, return_dict=False)[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    ref = step()
    t0 = time.perf_counter(); ref = step(); t_ref = time.perf_counter() - t0
    for sp in (0.0, args.sparsity):
        apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=sp, chunk_q=(4, 4, 4)))
        out = step()
        t0 = time.perf_counter(); out = step(); t_ours = time.perf_counter() - t0
        remove_block_sparse_attention(m)
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"sparsity {sp}: rel L2 vs diffusers {rel:.2e}, step {t_ours * 1e3:.0f} ms vs {t_ref * 1e3:.0f} ms")
    assert torch.equal(step(), ref), "remove_block_sparse_attention must restore the model exactly"
    print("removed: model output identical to the original")


if __name__ == "__main__":
    main()
