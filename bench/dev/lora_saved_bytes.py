"""Bytes one DiT block saves for backward in LoRA training, per video token (CPU, real width).

Issue 18's LoRA training step at real width peaked at 42 GiB on the GPU at depth 4 with BSA and
with dense attention alike (`bench/results/h100/train-lora-bsa_20261205_e9f67b6.json`). With
activation checkpointing the peak is one block's recomputed activations plus the backward's
temporaries; this counts the first part, device-independently: one block (hidden 4096, 32 heads)
in bf16 on two small token grids (their difference is the per-token part), the tensors autograd saves (a ``saved_tensors_hooks`` census;
parameters and the torch reference path's attention matrix excluded, since the GPU runs flash /
BSA kernels), with fp32 adapters (the default) and with ``fp32_adapters=False``, scaled to a token
count. Random weights; nothing is downloaded.

    python bench/dev/lora_saved_bytes.py [--tokens 84480] [--text-len 64]

Session 12 (fp32 adapters / bf16 adapters): 353 / 274 KiB per video token, i.e. ~28.4 / ~22.1 GiB
for one block at 84,480 tokens (24x44x80). Largest: peft's fp32 copies of the adapted layers'
inputs (fp32 adapters only), the FFN's 11008-wide activations, q/k/v in [B, H, N, D] bf16 (the
torch path's SDPA layout; the GPU kernels take BSHD and save their own inputs, so this part may
differ there), fp32 q/k/v (qk-norm and RoPE in fp32, as upstream) and the fp32 residual. An
estimate for the torch path, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from longcat_vc import training as tr  # noqa: E402
from longcat_vc.config import DiTConfig  # noqa: E402
from longcat_vc.dit import LongCatDiT  # noqa: E402


def lora_block(fp32_adapters: bool):
    """One real-width block (random weights, bf16) with rank-128 adapters, in training mode."""
    cfg = DiTConfig.longcat_video(depth=1, enable_bsa=False, attn_backend="torch")
    dit = LongCatDiT(cfg, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.02)
    dit.requires_grad_(False)
    model = tr.add_lora(dit, tr.lora_config(rank=128, alpha=64), fp32_adapters=fp32_adapters)
    model.train()
    return cfg, model


def census(cfg, model, grid, text_len: int):
    """Bytes saved for backward by one loss evaluation, per (dtype, shape)."""
    T, Nh, Nw = grid
    ph, pw = cfg.patch_size[1:]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, cfg.in_channels, T, Nh * ph, Nw * pw, generator=g)
    text = torch.randn(1, 1, text_len, cfg.caption_channels, generator=g).to(torch.bfloat16)
    mask = torch.ones(1, text_len, dtype=torch.long)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    heads = cfg.num_heads
    head_dim = cfg.hidden_size // heads
    seen, by = set(), collections.Counter()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        # [B, heads, N, N or text] probabilities of the torch path (flash / BSA on the GPU save none)
        attn_matrix = t.dim() == 4 and t.shape[1] == heads and t.shape[-1] != head_dim
        if ptr in params or attn_matrix or (ptr, t.dtype) in seen:
            return t
        seen.add((ptr, t.dtype))
        by[(str(t.dtype).replace("torch.", ""), tuple(t.shape))] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tr.flow_matching_loss(model, x0, text, mask, generator=g)
    return by


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=84480, help="video tokens to scale to (24x44x80)")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args(argv)
    # two grids: the difference is what grows with the video tokens (text-sized tensors cancel)
    g1, g2 = (2, 8, 12), (2, 8, 24)  # token counts unlike the head dim (128), see pack()
    n1, n2 = math.prod(g1), math.prod(g2)
    for fp32 in (True, False):
        cfg, model = lora_block(fp32)
        b1, b2 = census(cfg, model, g1, a.text_len), census(cfg, model, g2, a.text_len)
        t1, t2 = sum(b1.values()), sum(b2.values())
        per_tok = (t2 - t1) / (n2 - n1)
        fixed = t1 - n1 * per_tok
        print(f"fp32_adapters={fp32}: {per_tok / 1024:.0f} KiB per video token + {fixed / 2**20:.1f} MiB "
              f"({a.text_len} text tokens) -> ~{(per_tok * a.tokens + fixed) / 2**30:.1f} GiB for one block "
              f"at {a.tokens} tokens; largest at {n2} tokens:")
        for (dt, shape), b in b2.most_common(a.top):
            print(f"    {dt:9s} {str(shape):24s} {b / 2**20:8.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
