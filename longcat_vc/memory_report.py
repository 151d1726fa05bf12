"""Peak accelerator memory per stage (text, VAE encode, cache build, denoise, decode) for each memory mode.

    python -m longcat_vc.memory_report                          # estimate, released model, 480p 93 frames
    python -m longcat_vc.memory_report --checkpoint DIR --resolution 720p --frames 185 --cond-frames 25 --batch 1
    python -m longcat_vc.memory_report --refine                 # the 720p refinement of that clip (SPEC 11)
    python -m longcat_vc.memory_report --measured bench_out.json  # the table measured by bench/memory_modes_gpu.py

The estimate is ``longcat_vc.memory.estimate_peak_bytes`` (the numbers the fit check of
``from_pretrained(memory=...)`` uses); the measured table comes from the GPU bench, which runs
every stage under a memory cap and records ``torch.cuda.max_memory_allocated``. On a CUDA machine
the estimate also says which modes fit the free memory now.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

__all__ = ["estimate_table", "measured_table", "main"]

STAGES = ("text", "vae_encode", "cache_build", "denoise", "decode", "peak")
GiB = float(2**30)


def _fmt_table(rows: Dict[str, Dict[str, Optional[float]]], cols: Sequence[str]) -> str:
    head = f"{'':22s}" + "".join(f"{c:>13s}" for c in cols)
    lines = [head]
    for name, row in rows.items():
        cells = "".join(f"{'-' if row.get(c) is None else format(row[c], '.2f'):>13s}" for c in cols)
        lines.append(f"{name:22s}{cells}")
    return "\n".join(lines)


def estimate_table(config, **shape) -> Dict[str, Dict[str, float]]:
    """``{mode: {stage: GiB}}`` from ``estimate_peak_bytes``."""
    from .memory import MEMORY_MODES, estimate_peak_bytes

    return {m: {k: v / GiB for k, v in estimate_peak_bytes(config, m, **shape).items()} for m in MEMORY_MODES}


def measured_table(path: str) -> Dict[str, Dict[str, Optional[float]]]:
    """The ``stage_table_gib`` of a ``bench/memory_modes_gpu.py`` JSON."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "stage_table_gib" not in data:
        raise ValueError(f"--measured: {path} has no 'stage_table_gib' (not a bench/memory_modes_gpu.py result)")
    return data["stage_table_gib"]


def _size(resolution: str):
    from .pipeline import BUCKETS

    if resolution in BUCKETS:
        return {"480p": (480, 832), "720p": (704, 1280)}[resolution]
    try:
        h, w = (int(v) for v in resolution.lower().split("x"))
    except ValueError:
        raise ValueError(f"--resolution: expected 480p, 720p or HxW, got {resolution!r}") from None
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f"--resolution: height and width must be positive multiples of 16, got {resolution!r}")
    return h, w


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcat_vc.memory_report", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint root or dit/ folder (default: released config)")
    p.add_argument("--depth", type=int, default=None, help="override the DiT depth")
    p.add_argument("--resolution", default="480p", help="480p, 720p or HxW")
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--cond-frames", type=int, default=13)
    p.add_argument("--batch", type=int, default=2, help="DiT batch (2 with CFG, 1 without)")
    p.add_argument("--dtype-bytes", type=int, default=2, choices=(1, 2, 4))
    p.add_argument("--refine", action="store_true",
                   help="the 720p refinement of the clip instead (2x frames, 2x cond frames, batch 1, the refinement "
                        "LoRA: the checkpoint's file, else rank 128)")
    p.add_argument("--measured", default=None, metavar="JSON", help="print the table measured by the GPU bench")
    args = p.parse_args(argv)
    if args.measured:
        print(f"measured peak GiB per stage ({args.measured}):")
        print(_fmt_table(measured_table(args.measured), list(STAGES) + ["s_per_step"]))
        return 0
    from .config import DiTConfig

    if args.checkpoint:
        from .loading import resolve_dit_dir

        cfg = DiTConfig.from_json(os.path.join(resolve_dit_dir(args.checkpoint), "config.json"))
    else:
        cfg = DiTConfig.longcat_video()
    if args.depth is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, depth=args.depth)
    if args.frames < 2 or args.cond_frames < 1 or args.batch < 1:
        p.error("--frames >= 2, --cond-frames >= 1 and --batch >= 1 are required")
    h, w = _size(args.resolution)
    shape = dict(height=h, width=w, num_frames=args.frames, num_cond_frames=args.cond_frames, batch=args.batch,
                 dtype_bytes=args.dtype_bytes)
    if args.refine:
        from .refine import REFINEMENT_LORA_FILE, _lora_rank_equivalent, refine_bucket, refine_estimate_shape

        rh, rw = refine_bucket(h, w)
        lora = os.path.join(args.checkpoint, REFINEMENT_LORA_FILE) if args.checkpoint else None
        rank = _lora_rank_equivalent(lora, cfg) if lora and os.path.isfile(lora) else 128
        shape, t_lat, c = refine_estimate_shape((rh, rw), 2 * args.frames, 2 * args.cond_frames,
                                                dtype_bytes=args.dtype_bytes, lora_rank=rank)
        print(f"estimated peak GiB per stage of the refinement: depth {cfg.depth}, {rh}x{rw}, "
              f"{2 * args.frames} frames ({t_lat} latents, {c} cond), batch 1, LoRA rank ~{rank}")
    else:
        print(f"estimated peak GiB per stage: depth {cfg.depth}, {h}x{w}, {args.frames} frames, "
              f"{args.cond_frames} cond frames, batch {args.batch}")
    print(_fmt_table(estimate_table(cfg, **shape), STAGES))
    import torch

    if torch.cuda.is_available():
        from .memory import MEMORY_MODES, MemoryModeError, check_memory_fits

        dev = torch.device("cuda")
        for m in MEMORY_MODES:
            try:
                check_memory_fits(cfg, m, dev, **shape)
                print(f"{m}: fits {torch.cuda.get_device_name(dev)} now")
            except MemoryModeError as e:
                print(f"{m}: {e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
