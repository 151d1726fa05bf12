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
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"--measured: cannot read {path} ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--measured: {path} is not JSON ({e})") from None
    table = data.get("stage_table_gib") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"--measured: {path} has no 'stage_table_gib' (not a bench/memory_modes_gpu.py result)")
    for mode, row in table.items():
        if not isinstance(row, dict) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in row.values()):
            raise ValueError(f"--measured: {path}: stage_table_gib[{mode!r}] must map stages to numbers or null, "
                             f"got {row!r}")
    return table


def _size(resolution: str):
    from .stages import BUCKETS, bucket_size

    if resolution in BUCKETS:
        # the bucket the pipeline picks for a 16:9 video (480x832, 704x1312; 704x1280 is the refine's)
        return bucket_size(9, 16, resolution)
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
    p.add_argument("--resolution", default="480p", help="480p or 720p (the bucket of a 16:9 video) or HxW")
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--cond-frames", type=int, default=13)
    p.add_argument("--batch", type=int, default=None, help="DiT batch (default 2: with CFG; 1 without; --refine: 1)")
    # 1 byte was offered and halved every component's estimate: no model dtype has it (fp8 quantises only
    # the blocks' large linears: --fp8)
    p.add_argument("--dtype-bytes", type=int, default=2, choices=(2, 4),
                   help="bytes per weight and activation: 2 (bf16/fp16, default) or 4 (fp32)")
    p.add_argument("--fp8", action="store_true",
                   help="the DiT blocks' large linears in fp8 (1 byte per weight), as the CLI's --fp8")
    p.add_argument("--refine", action="store_true",
                   help="the 720p refinement of the clip instead (2x frames, 2x cond frames, batch 1, the refinement "
                        "LoRA: the checkpoint's file, else rank 128)")
    p.add_argument("--measured", default=None, metavar="JSON", help="print the table measured by the GPU bench")
    args = p.parse_args(argv)
    try:
        return _report(p, args)
    except (ValueError, OSError) as e:  # bad files and values: one line, no traceback
        p.error(str(e))


# the flags of the estimate (argparse dests), none of which the --measured table reads
_ESTIMATE_FLAGS = ("checkpoint", "depth", "resolution", "frames", "cond_frames", "batch", "dtype_bytes", "fp8", "refine")


def _report(p, args) -> int:
    for flag, path in (("--checkpoint", args.checkpoint), ("--measured", args.measured)):
        if path is not None and not path.strip():
            # read as "not given": the released model's estimate was printed for either
            p.error(f"{flag}: expected a path, got {path!r}")
    if args.measured is not None:
        # the measured table is the bench file's: an estimate flag beside it was ignored without a word
        given = [f"--{d.replace('_', '-')}" for d in _ESTIMATE_FLAGS if getattr(args, d) != p.get_default(d)]
        if given:
            p.error(f"--measured prints the table of its file; {', '.join(given)} only shape the estimate: "
                    "drop them (or --measured)")
        table = measured_table(args.measured)
        print(f"measured peak GiB per stage ({args.measured}):")
        print(_fmt_table(table, list(STAGES) + ["s_per_step"]))
        return 0
    from .config import DiTConfig

    dit_dir = None
    if args.checkpoint is not None:
        from .loading import resolve_dit_dir

        dit_dir = resolve_dit_dir(args.checkpoint)
        cfg = DiTConfig.from_json(os.path.join(dit_dir, "config.json"))
    else:
        cfg = DiTConfig.longcat_video()
    if args.depth is not None:
        if args.depth < 1:
            p.error(f"--depth must be >= 1, got {args.depth}")
        import dataclasses

        cfg = dataclasses.replace(cfg, depth=args.depth)
    if args.refine and args.batch not in (None, 1):
        # the refinement runs batch 1 (guidance 1): a given --batch was replaced by 1 without a word
        p.error(f"--batch {args.batch}: the refinement runs batch 1 (no CFG); drop --batch with --refine")
    if args.batch is None:
        args.batch = 1 if args.refine else 2
    if args.frames < 2 or args.cond_frames < 1 or args.batch < 1:
        p.error("--frames >= 2, --cond-frames >= 1 and --batch >= 1 are required")
    if 1 + (args.cond_frames - 1) // 4 >= (args.frames - 1) // 4 + 1:
        # no noisy latent left: the denoise estimate went negative
        p.error(f"--cond-frames {args.cond_frames} leaves no frame to generate in --frames {args.frames} "
                "(the cond latents must be fewer than the clip's latents)")
    h, w = _size(args.resolution)
    shape = dict(height=h, width=w, num_frames=args.frames, num_cond_frames=args.cond_frames, batch=args.batch,
                 dtype_bytes=args.dtype_bytes, fp8=args.fp8)
    if args.refine:
        from .refine import REFINEMENT_LORA_FILE, _lora_rank_equivalent, refine_bucket, refine_estimate_shape

        rh, rw = refine_bucket(h, w)
        # the checkpoint root, also when --checkpoint names its dit/ folder
        roots = [] if dit_dir is None else [args.checkpoint, os.path.dirname(os.path.abspath(dit_dir))]
        lora = next((f for f in (os.path.join(r, REFINEMENT_LORA_FILE) for r in roots) if os.path.isfile(f)), None)
        rank = _lora_rank_equivalent(lora, cfg) if lora else 128
        if dit_dir is not None and lora is None:
            print(f"no {REFINEMENT_LORA_FILE} next to {args.checkpoint}: LoRA rank 128 assumed")
        shape, t_lat, c = refine_estimate_shape((rh, rw), 2 * args.frames, 2 * args.cond_frames,
                                                dtype_bytes=args.dtype_bytes, lora_rank=rank, fp8=args.fp8)
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
