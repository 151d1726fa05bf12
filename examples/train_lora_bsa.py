"""Fine-tune a LoRA on the LongCat-Video DiT with peft, block-sparse attention in the loop.

Runs a short rectified-flow training (``longcat_vc.training``) with the DiT's attention
block-sparse (BSA, LongCat's 0.9375 / 4x4x4 by default) and, for comparison, dense, then saves
each adapter in LongCat's LoRA format and reloads it with ``LongCatDiT.load_lora`` (an error exit
when the reloaded model's output differs from the trained one's by more than 1e-4 relative in fp32,
5e-2 in bf16). Prints per step the loss, and per mode the median step time and the peak memory.

    # CPU: tiny config (hidden 64, depth 2), fp32, torch backend; loss goes down, reload is exact
    python examples/train_lora_bsa.py --tiny
    # GPU: real width (hidden 4096, 32 heads), depth reduced to fit, bf16, 720p latent grid
    python examples/train_lora_bsa.py --depth 2 --grid 24 44 80 --steps 4 --json lora_train.json

Weights are random (this measures the training path, not a fine-tune of the released model);
data is one random batch (``--overfit``: also fixed noise and noise levels, so the loss must fall).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from longcat_vc import training as tr  # noqa: E402
from longcat_vc.config import DiTConfig  # noqa: E402
from longcat_vc.dit import LongCatDiT  # noqa: E402


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int) -> None:
    """W ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), 1-D scales ~ 1 + N(0, 0.1^2): unit-scale
    activations at any width, nothing zero (so no branch is trivially off)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        buf = torch.empty(p.shape, dtype=torch.float32)
        if p.dim() >= 2:
            buf.normal_(0.0, p[0].numel() ** -0.5, generator=g)
        elif name.endswith("bias"):
            buf.normal_(0.0, 0.02, generator=g)
        else:
            buf.normal_(1.0, 0.1, generator=g)
        p.copy_(buf)


def build_config(args, bsa: bool) -> DiTConfig:
    bsa_params = {"sparsity": args.sparsity, "cdf_threshold": None,
                  "chunk_3d_shape_q": list(args.chunk), "chunk_3d_shape_k": list(args.chunk)}
    if args.tiny:
        return DiTConfig.tiny(depth=args.depth, enable_bsa=bsa, bsa_params=bsa_params, attn_backend=args.backend)
    return DiTConfig.longcat_video(depth=args.depth, enable_bsa=bsa, bsa_params=bsa_params, attn_backend=args.backend)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(args, mode: str, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = build_config(args, bsa=(mode == "bsa"))
    dit = LongCatDiT(cfg, device=device, dtype=dtype)
    init_random_(dit, seed=1234)
    dit.requires_grad_(False)
    weights_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())
    model = tr.add_lora(dit, tr.lora_config(rank=args.rank, alpha=args.alpha), fp32_adapters=not args.lowp_adapters)
    model.train()
    if not args.no_checkpointing:
        tr.enable_activation_checkpointing(model)

    T, Nh, Nw = args.grid
    ph, pw = cfg.patch_size[1:]
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(args.batch, cfg.in_channels, T, Nh * ph, Nw * pw, generator=g).to(device)
    text = torch.randn(args.batch, 1, args.text_len, cfg.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(args.batch, args.text_len, dtype=torch.long, device=device)
    fixed = dict(noise=torch.randn(x0.shape, generator=g), sigmas=tr.sample_sigmas(args.batch, generator=g))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n_train = sum(p.numel() for p in params)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for step in range(args.steps):
        kw = fixed if args.overfit else dict(generator=g)
        _sync(device)
        t0 = time.perf_counter()
        loss = tr.flow_matching_loss(model, x0, text, mask, **kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"  [{mode}] step {step}: loss {losses[-1]:.5f}  {times[-1] * 1e3:.1f} ms", flush=True)
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"[{mode}] step {step}: the loss is {losses[-1]}: training diverged (lower --lr?); "
                             "nothing saved")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    # Save in LongCat's format, reload through load_lora, compare with the peft model.
    model.eval()
    out_dir = args.out or tempfile.mkdtemp(prefix="longcat_lora_")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"lora_{mode}.safetensors")
    tr.save_longcat_lora(model, path, overwrite=True)  # a rerun with the same --out replaces it
    with torch.no_grad():
        s = fixed["sigmas"].to(device)
        x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * fixed["noise"].to(device)
        want = model(x_s, s * 1000, text, mask)
        base = model.unload()
        tr.disable_activation_checkpointing(base)
        base.load_lora(path, "trained")
        base.enable_loras(["trained"])
        got = base(x_s, s * 1000, text, mask)
    reload_rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    # loud, not just printed: a save or load_lora that loses (part of) the adapter exited 0.
    # Observed: ~3e-7 in fp32 (CPU tiny), ~6e-3 in bf16 (H100, real width)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if not reload_rel <= tol:  # NaN too
        raise SystemExit(f"[{mode}] the reloaded adapter's output differs from the trained model's: max rel diff "
                         f"{reload_rel:.2e} > {tol:.0e} ({path}): the saved file or load_lora is wrong")

    timed = times[1:] if len(times) > 1 else times  # the first step compiles kernels
    res = {
        "mode": mode, "attn_backend": cfg.attn_backend, "enable_bsa": cfg.enable_bsa,
        "bsa": cfg.bsa_settings() if cfg.enable_bsa else None,
        "hidden": cfg.hidden_size, "depth": cfg.depth, "heads": cfg.num_heads, "grid": list(args.grid),
        "batch": args.batch, "text_len": args.text_len, "dtype": str(dtype).replace("torch.", ""),
        "rank": args.rank, "alpha": args.alpha, "lr": args.lr, "trainable_params": n_train,
        "activation_checkpointing": not args.no_checkpointing, "fp32_adapters": not args.lowp_adapters,
        "step_ms_median": statistics.median(timed) * 1e3, "step_ms_all": [t * 1e3 for t in times],
        "peak_mem_gib": None if peak is None else peak / 2**30, "weights_gib": weights_bytes / 2**30,
        "losses": losses, "lora_file": path, "reload_max_rel_diff": reload_rel,
    }
    del model, base, opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (fp32, torch backend)")
    p.add_argument("--depth", type=int, default=None, help="blocks (default: 2)")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="latent token grid after the 1x2x2 patch (default: tiny 4 4 4, GPU 24 44 80)")
    p.add_argument("--chunk", type=int, nargs=3, default=None, help="BSA chunk (default: tiny 2 2 2, GPU 4 4 4)")
    p.add_argument("--sparsity", type=float, default=None, help="BSA sparsity (default: tiny 0.5, GPU 0.9375)")
    p.add_argument("--attn", choices=("bsa", "dense", "both"), default="both")
    p.add_argument("--steps", type=int, default=None, help="training steps per mode (default: tiny 6, GPU 4)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: tiny 7, GPU 512)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: tiny 4, GPU 128)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank / 2)")
    p.add_argument("--lr", type=float, default=None, help="AdamW lr (default: tiny 3e-3, GPU 1e-4)")
    p.add_argument("--backend", default=None, help="attn_backend (default: tiny torch, GPU auto)")
    p.add_argument("--overfit", action="store_true", help="fixed noise and sigmas (default with --tiny)")
    p.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations")
    p.add_argument("--lowp-adapters", action="store_true",
                   help="adapters in the weight dtype (bf16) instead of fp32 (peft's default)")
    p.add_argument("--out", default=None, help="folder for the saved adapters (default: a temp folder)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            p.error("real width needs a CUDA device; use --tiny on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    t = args.tiny
    def default(v, d):  # None only: "--steps 0" is a value to refuse, not the default's cue
        return d if v is None else v

    args.depth = default(args.depth, 2)
    args.grid = tuple(default(args.grid, (4, 4, 4) if t else (24, 44, 80)))
    args.chunk = tuple(default(args.chunk, (2, 2, 2) if t else (4, 4, 4)))
    args.sparsity = default(args.sparsity, 0.5 if t else 0.9375)
    args.steps = default(args.steps, 6 if t else 4)
    args.text_len = default(args.text_len, 7 if t else 512)
    args.rank = default(args.rank, 4 if t else 128)
    args.alpha = default(args.alpha, args.rank / 2)
    args.lr = default(args.lr, 3e-3 if t else 1e-4)
    args.backend = default(args.backend, "torch" if t else "auto")
    args.overfit = args.overfit or t
    if min(args.depth, args.steps, args.batch, args.rank, args.text_len, *args.grid, *args.chunk) <= 0:
        p.error("--depth, --steps, --batch, --rank, --text-len, --grid and --chunk must be positive")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite positive number, got {args.lr}")
    if not 0.0 <= args.sparsity < 1.0:  # (a traceback from deep in the first BSA call, not a usage error)
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    # the outputs, before any training: a bad path used to fail after every mode had trained
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} exists and is not a folder")
    if args.out is not None:  # made now: a missing or read-only parent failed after the training
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            p.error(f"--out {args.out}: cannot create the folder ({e.strerror or e})")
        if not os.access(args.out, os.W_OK | os.X_OK):
            p.error(f"--out {args.out}: the folder is not writable")
    if args.json is not None:
        jdir = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(jdir) or os.path.isdir(args.json):
            p.error(f"--json {args.json}: its folder does not exist or it is a folder")

    modes = ("bsa", "dense") if args.attn == "both" else (args.attn,)
    results = []
    for mode in modes:
        print(f"== {mode}: depth {args.depth}, grid {args.grid}, batch {args.batch}, {dtype}, {device}", flush=True)
        results.append(run_mode(args, mode, device, dtype))
    print(f"\n{'mode':6} {'step ms':>10} {'peak GiB':>9} {'weights GiB':>11} {'loss first':>10} "
          f"{'loss last':>10} {'reload rel':>10}")
    for r in results:
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"{r['mode']:6} {r['step_ms_median']:10.1f} {peak:>9} {r['weights_gib']:11.3f} "
              f"{r['losses'][0]:10.5f} {r['losses'][-1]:10.5f} {r['reload_max_rel_diff']:10.2e}")
    if len(results) == 2:
        print(f"BSA / dense step time: {results[0]['step_ms_median'] / results[1]['step_ms_median']:.3f}")
    if args.json:
        header = {"argv": list(sys.argv[1:] if argv is None else argv), "torch": torch.__version__,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
