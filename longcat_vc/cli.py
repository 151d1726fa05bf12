"""``longcat-vc``: continue a video with LongCat-Video from the command line.

    longcat-vc continue INPUT --prompt TEXT --checkpoint DIR --out OUT.mp4 [--mode basic|distill]
        [--steps N] [--guidance G] [--frames 93] [--cond-frames 13] [--resolution 480p|720p|HxW]
        [--no-kv-cache] [--offload-kv-cache] [--bsa] [--seed S]
        [--memory resident|balanced|low] [--fp8] [--vae-tiling]
        [--context-parallel N [--cfg-parallel]]   (under torchrun --nproc-per-node N)
    longcat-vc extend INPUT --prompt TEXT [--prompt TEXT ...] [--segments N] --checkpoint DIR
        --out OUT.mp4 [same options] [--refine [--spatial-only] [--t-thresh 0.5]]
        (--refine: the long video refined to 720p by sliding windows, SPEC 11)
    longcat-vc continue ... --refine [--spatial-only] [--t-thresh 0.5]
        (480p continuation, then 720p refinement: 30 fps output; SPEC 11)
    longcat-vc continue ... --stage1-out STAGE1.mp4   (also write the generated clip for `refine`)
    longcat-vc refine STAGE1.mp4 --video INPUT --prompt TEXT --checkpoint DIR --out OUT.mp4
        [--spatial-only] [--t-thresh 0.5] [--no-kv-cache] [--seed S]
        [--memory resident|balanced|low] [--offload-kv-cache] [--fp8] [--vae-tiling]

INPUT is a video file (mp4, webm, mov, ...), a GIF, a folder of image frames or a pipe (- or /dev/stdin, read once). The output is an
H.264 mp4 at 15 fps holding the input frames (subsampled to about 15 fps) followed by the new
ones, at the input's size (after a refinement: 30 fps, the input at about 30 fps followed by the
refined new frames; 15 fps with --spatial-only). It is written under a temporary name and renamed when complete, so a
failed or interrupted run never leaves a file that looks finished. An existing --out (--stage1-out,
--timings-json; through a symlink: its target) is replaced once the new one is written in full, and kept as it was when the run
fails before that; an input is never overwritten (refused). Nothing is printed on stdout: messages, progress and the timing
summary go to stderr (--timings-json for a machine-readable summary; ``--timings-json -`` prints it on stdout,
and a FIFO or terminal, e.g. /dev/stdout, is written into, not replaced).

On CUDA the command starts torch's caching allocator with expandable segments
(``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) unless that variable (or
``PYTORCH_ALLOC_CONF``) is already set: offloading runs fragment the default allocator.

Bad input gives one line on stderr and a non-zero exit status (2 for bad arguments, 1 for other
errors, 130 when interrupted); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import stat
import sys
import time
from typing import List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser"]

PROG = "longcat-vc"
STAGE1_TAG = "longcat-vc stage1 cond_frames="  # the mp4 comment of a --stage1-out clip: its cond frame count


class UsageError(ValueError):
    """Bad command-line arguments (exit status 2)."""


def _resolution(text: str):
    if text in ("480p", "720p"):
        return text
    parts = text.lower().split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return (int(parts[0]), int(parts[1]))  # range checked by _check_args_before_load (exit 2)
    raise argparse.ArgumentTypeError(f"expected 480p, 720p or HEIGHTxWIDTH (e.g. 480x832), got {text!r}")


def _refine_resolution(text: str):
    """``refine --resolution``: 720p or HEIGHTxWIDTH; 480p (continue's, shared parser type) was taken and
    refused after the parse with "resolution must be '720p' ...", naming no flag."""
    if text != "480p":
        try:
            return _resolution(text)
        except argparse.ArgumentTypeError:
            pass
    raise argparse.ArgumentTypeError(f"refine runs at 720p: expected 720p or HEIGHTxWIDTH (multiples of 64, "
                                     f"e.g. 704x1280), got {text!r}")


class _Once(argparse.Action):
    """A flag that may be given once: ``extend`` takes --prompt once per segment, and a repeated --prompt to
    ``continue`` / ``refine`` kept the last one without a word (argparse's default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in seen:
            raise argparse.ArgumentError(self, "given more than once: this command takes one "
                                               "(`extend` takes one per segment)")
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def _add_memory_flags(p: argparse.ArgumentParser) -> None:
    """GPU memory and precision flags, shared by continue / extend and refine."""
    p.add_argument("--offload-kv-cache", action="store_true",
                   help="keep the KV cache in CPU memory (on by default with --memory low)")
    p.add_argument("--memory", choices=("resident", "balanced", "low"), default="resident",
                   help="resident: all on the GPU (480p needs ~45 GiB); balanced: DiT blocks streamed from "
                        "pinned CPU memory, text encoder streamed while encoding; low: balanced + KV cache "
                        "offloaded (same results in every mode)")
    p.add_argument("--fp8", action="store_true",
                   help="fp8 (e4m3) DiT block weights and GEMMs (sm89+: Ada, Hopper; faster, not exact)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="tiled VAE encode and decode (less memory at 720p; pixels differ slightly)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """--attn-backend and --dtype, the same for every command that loads the model."""
    p.add_argument("--attn-backend", choices=("auto", "torch", "triton", "cuda"), default=None,
                   help="attention kernels of the DiT (default: auto)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")


def _add_report_flags(p: argparse.ArgumentParser) -> None:
    """--timings-json, --no-progress and --debug, the same for every command that runs the model."""
    p.add_argument("--timings-json", default=None, metavar="PATH", help="also write the timings as JSON (- for stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input video file (mp4, webm, mov, gif, ...), folder of image frames, or - (stdin)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="LongCat-Video checkpoint folder (dit/, vae/, text_encoder/, tokenizer/, scheduler/, lora/)")
    p.add_argument("--out", required=True, metavar="OUT.mp4",
                   help="output mp4 (H.264); an existing file is replaced when the run completes")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="negative prompt when guidance > 1 (default: LongCat-Video's demo negative prompt)")
    p.add_argument("--mode", choices=("basic", "distill"), default="basic",
                   help="basic: 50 steps, guidance 4.0; distill: cfg-step LoRA, 16 steps, guidance 1.0")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="denoising steps (default per mode; basic runs more DiT steps, its enhance_hf schedule: 56 for "
                        "50); with --refine stage 1's only: the refinement runs its own 50-step schedule from "
                        "--t-thresh (5 DiT steps at 0.5), which `longcat-vc refine --steps` sets")
    p.add_argument("--guidance", type=float, default=None, metavar="G", help="guidance scale >= 1 (default per mode)")
    p.add_argument("--frames", type=int, default=93, metavar="F",
                   help="frames per generated clip incl. the cond frames (4k+1, default 93)")
    p.add_argument("--cond-frames", type=int, default=13, metavar="C",
                   help="last input frames used as the condition (4k+1, default 13)")
    p.add_argument("--resolution", type=_resolution, default="480p",
                   help="480p, 720p (LongCat's aspect-ratio buckets) or HEIGHTxWIDTH (multiples of 16)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the cond tokens every step")
    _add_memory_flags(p)
    p.add_argument("--bsa", action="store_true", help="block-sparse self-attention")
    p.add_argument("--fuse-lora", action="store_true", help="distill: merge the LoRA into the weights (faster)")
    _add_model_flags(p)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--input-fps", type=float, default=None, metavar="FPS",
                   help="frame rate of the input (overrides the file's; frame folders have none: taken as 15)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available; with "
                   "--context-parallel no index: each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--crf", type=int, default=None,
                   help="x264 quality (lower is better; default 18, and 10 for the 720p output of --refine as "
                        "upstream's demo and `refine` write it; --stage1-out keeps 18 unless --crf is given)")
    _add_report_flags(p)
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="run the DiT across N processes (sequence parallel, Ulysses); launch with "
                        "torchrun --nproc-per-node N -m longcat_vc.cli ... (NCCL on CUDA, gloo on CPU)")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="with --context-parallel N (even): the two CFG branches on two groups of N/2 processes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Continue a video with LongCat-Video (KV cache on by default)."
    )
    sub = parser.add_subparsers(dest="command", metavar="{continue,extend,refine}")
    sub.required = True
    pc = sub.add_parser("continue", help="generate one continuation clip",
                        description="Continue INPUT by one clip of --frames frames.")
    pc.add_argument("--prompt", required=True, action=_Once, metavar="TEXT", help="what happens next")
    _add_common(pc)
    pc.add_argument("--stage1-out", default=None, metavar="STAGE1.mp4",
                    help="also write the generated clip as the model decoded it (its --frames frames, cond "
                         "frames included, at the model's size): the STAGE1 that `longcat-vc refine` takes")
    _add_refine_flags(pc, with_switch=True)
    pe = sub.add_parser("extend", help="long video: chain several continuation clips",
                        description="Chain --segments continuations, each conditioned on the last "
                                    "--cond-frames frames of the clip before it (the input's for the first).")
    pe.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                    help="prompt for all segments, or repeat once per segment")
    pe.add_argument("--segments", type=int, default=None, metavar="N",
                    help="number of segments (default: number of --prompt)")
    _add_common(pe)
    _add_refine_flags(pe, with_switch=True)
    _add_refine_parser(sub)
    return parser


# ------------------------------------------------------------------------------ refinement (SPEC 11)


def _add_refine_flags(p: argparse.ArgumentParser, *, with_switch: bool) -> None:
    if with_switch:
        p.add_argument("--refine", action="store_true",
                       help="then refine the clip to 720p / 30 fps (refinement LoRA + BSA, lora/refinement_lora.safetensors)")
    p.add_argument("--spatial-only", action="store_true", help="refinement: keep the frame rate (15 fps output)")
    p.add_argument("--t-thresh", type=float, default=None, metavar="T",
                   help="refinement: noise level in (0, 1] the stage-1 latents are re-noised to (default 0.5)")


def _add_refine_parser(sub) -> None:
    pr = sub.add_parser("refine", help="refine a 480p continuation to 720p / 30 fps",
                        description="Refine STAGE1 (every frame of a 480p continuation, cond frames included, "
                                    "as `longcat-vc continue --stage1-out` writes it) to 720p with the refinement "
                                    "LoRA and block-sparse attention; the cond frames come from --video, the "
                                    "original input, at about 30 fps.")
    pr.add_argument("stage1", metavar="STAGE1.mp4",
                    help="the stage-1 clip (video file or frame folder), used as it is: `continue --stage1-out`, "
                         "not `continue --out` (which holds the whole input before the new frames)")
    pr.add_argument("--video", default=None, metavar="INPUT",
                    help="the original input video (cond frames); omitted: refine without cond frames")
    pr.add_argument("--prompt", default="", action=_Once, metavar="TEXT", help="prompt (default empty, as upstream's long-video refine)")
    pr.add_argument("--checkpoint", required=True, metavar="DIR", help="LongCat-Video checkpoint folder")
    pr.add_argument("--out", required=True, metavar="OUT.mp4",
                    help="output mp4 (H.264); an existing file is replaced when the run completes")
    pr.add_argument("--cond-frames", type=int, default=None, metavar="C",
                    help="the refinement's cond frames (default: twice the stage-1 clip's, once with --spatial-only, "
                         "as `continue --stage1-out` records them in the file; 26 (13) for another clip)")
    pr.add_argument("--steps", type=int, default=50, metavar="N",
                    help="steps of the base (shifted) schedule the refinement enters at --t-thresh: it runs the "
                         "first step at --t-thresh and those below it (default 50: 5 DiT steps at --t-thresh 0.5, "
                         "as upstream)")
    pr.add_argument("--resolution", type=_refine_resolution, default="720p",
                    help="720p (LongCat's F64 buckets: 16:9 -> 704x1280) or HEIGHTxWIDTH (multiples of 64)")
    pr.add_argument("--no-kv-cache", action="store_true", help="recompute the cond tokens every step")
    _add_memory_flags(pr)
    _add_model_flags(pr)
    pr.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    pr.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    pr.add_argument("--crf", type=int, default=10, help="x264 quality (default 10, as upstream's refine demo)")
    _add_report_flags(pr)
    _add_refine_flags(pr, with_switch=False)


def _check_refine_args(args) -> None:
    """Cheap checks of the refinement flags, before any model load."""
    import math

    from .loading import CheckpointError
    from .refine import REFINEMENT_LORA_FILE

    if args.t_thresh is None:
        args.t_thresh = 0.5  # default None only so that continue can tell it was given without --refine
    if not (math.isfinite(args.t_thresh) and 0.0 < args.t_thresh <= 1.0):
        raise UsageError(f"--t-thresh must be in (0, 1], got {args.t_thresh}")
    if args.command == "refine" and args.cond_frames is not None:
        if args.video is None:
            raise UsageError(f"--cond-frames {args.cond_frames} needs --video (the cond frames); "
                             "without --video the refinement has no cond frames")
        if args.cond_frames < 1:
            raise UsageError(f"--cond-frames must be >= 1, got {args.cond_frames}")
    lora = os.path.join(args.checkpoint, REFINEMENT_LORA_FILE)
    if os.path.isdir(args.checkpoint) and not os.path.isfile(lora):
        raise CheckpointError(f"checkpoint folder {args.checkpoint} is missing: {REFINEMENT_LORA_FILE} (refinement LoRA)")


def _setup(args):
    import torch

    device = _device(args)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    return device, dtype, seed


def _write_out(args, out, load_s: float, seed: int, log, label: str, extra: Optional[dict] = None) -> None:
    from .video_io import write_video

    t1 = time.perf_counter()
    write_video(_output_target(args.out), out.frames, out.fps, crf=args.crf)
    args.out_written = True
    write_s = time.perf_counter() - t1
    shown = out.timings
    if isinstance(shown.get("stage1"), dict):
        # continue --refine: the total is the run's (load + stage 1 + refinement + write), on the line and in
        # --timings-json alike; it was the refinement's alone, the 480p stage (most of the run) left out (the
        # JSON kept that after the line was fixed)
        shown = dict(shown, total=shown.get("total", 0.0) + shown["stage1"].get("total", 0.0))
    timings = dict(shown)
    timings.update(load=load_s, write=write_s)
    if args.timings_json:
        from .video_io import atomic_output

        doc = {"seed": seed, "size": list(out.size), "timings": timings, **(extra or {})}
        if args.timings_json == "-":
            json.dump(doc, sys.stdout, indent=2)
            print(file=sys.stdout, flush=True)
        elif _is_stream(args.timings_json):
            # a FIFO, a terminal: written into; a file renamed over it replaced it and its reader got nothing
            with open(args.timings_json, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
        else:
            with atomic_output(_output_target(args.timings_json)) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
        args.timings_written = True
    h, w = out.frames.shape[1:3]
    print((f"{label} " if label else "") + _summary(shown, load_s, write_s), file=log)
    print(f"{PROG}: wrote {args.out}: {out.frames.shape[0]} frames ({out.num_input_frames} input + "
          f"{out.num_new_frames} new), {w}x{h}, {out.fps:g} fps (model ran at {out.size[1]}x{out.size[0]})",
          file=log, flush=True)


def _run_refine(args) -> int:
    """``longcat-vc refine``: stage-1 frames (+ the original video) -> 720p refinement."""
    _check_refine_args(args)
    _check_args_before_load(args)  # paths (out is no input), --crf, --resolution, --timings-json
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    import torch

    from .pipeline import VideoContinuationPipeline, check_checkpoint
    from .video_io import read_video

    from .refine import resolve_refine_args

    stage1 = read_video(args.stage1).frames
    nc1 = _stage1_cond_frames(args.stage1)
    if nc1 is not None and args.cond_frames is None and args.video is not None:
        # the refinement's default was 2 x 13 whatever stage 1 used: with another --cond-frames its cond frames
        # covered generated frames, which were dropped from the output
        args.cond_frames = nc1 if args.spatial_only else 2 * nc1
        print(f"{PROG}: STAGE1 {args.stage1} was generated with {nc1} cond frames: refining with --cond-frames "
              f"{args.cond_frames}", file=sys.stderr, flush=True)
    _check_resolution_aspect(args.resolution, stage1.shape[1], stage1.shape[2], f"STAGE1 {args.stage1}")
    video = None if args.video is None else read_video(args.video, target_fps=30.0)
    if video is not None and video.fps is None:
        video = video.frames
    try:  # frame counts, the bucket pairing: exit 2 before the weights load, not 1 after
        resolve_refine_args(None, stage1, video, args.cond_frames, args.resolution, args.spatial_only,
                            args.t_thresh, args.steps, "np")
    except (TypeError, ValueError) as e:
        flags = (("num_cond_frames", "--cond-frames"), ("stage1", "STAGE1"), ("video", "--video"))
        msg = str(e)
        for k, v in flags:
            msg = msg.replace(k, v)
        raise UsageError(msg) from None
    check_checkpoint(args.checkpoint, "basic")
    device, dtype, seed = _setup(args)
    print(f"{PROG}: stage 1 {stage1.shape[0]} frames {stage1.shape[2]}x{stage1.shape[1]}; seed {seed}",
          file=sys.stderr, flush=True)
    _quiet_loaders()
    t0 = time.perf_counter()
    pipe = VideoContinuationPipeline.from_pretrained(args.checkpoint, dtype=dtype, device=device,
                                                     attn_backend=args.attn_backend, memory=args.memory,
                                                     fp8=args.fp8, vae_tiling=args.vae_tiling,
                                                     progress=not args.no_progress)
    load_s = time.perf_counter() - t0
    nc = args.cond_frames if video is not None else None
    out = pipe.refine(stage1, args.prompt, video=video, num_cond_frames=nc, resolution=args.resolution,
                      spatial_refine_only=args.spatial_only,
                      t_thresh=args.t_thresh, num_inference_steps=args.steps,
                      generator=torch.Generator(device=device).manual_seed(seed),
                      use_kv_cache=not args.no_kv_cache,
                      offload_kv_cache=True if args.offload_kv_cache else None,  # None: as --memory says
                      progress=not args.no_progress)
    _write_out(args, out, load_s, seed, sys.stderr, "refine")
    return 0


def _is_stream(path: str) -> bool:
    """``-`` (stdout) or an existing path that is neither a regular file nor a folder (a FIFO, ``/dev/stdin`` or
    ``/dev/stdout`` of a pipe or a terminal, ``>(jq .)``'s ``/dev/fd/N``): ``--timings-json`` is written into it in
    place, never through a temporary file renamed over it; an input is read once."""
    if path == "-":
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _output_target(path: str) -> str:
    """The file an output (``--out``, ``--stage1-out``, ``--timings-json``) replaces: a symlink's target
    (``/dev/stdout`` redirected to a file), not the link, which the atomic rename replaced (as root,
    ``/dev/stdout`` itself; for --out, the link became the new video and its target kept the old one)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _stage1_cond_frames(path: str) -> Optional[int]:
    """The stage-1 cond frame count ``continue --stage1-out`` records in its clip, None for another clip."""
    from .video_io import read_video_tags

    comment = str(read_video_tags(path).get("comment", ""))
    if comment.startswith(STAGE1_TAG) and comment[len(STAGE1_TAG):].isdecimal():
        n = int(comment[len(STAGE1_TAG):])
        return n if n >= 1 else None
    return None


def _same_path(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _check_out_path(out: str, inputs: Sequence[str] = (), *, flag: str = "--out", suffix: Optional[str] = ".mp4") -> None:
    """An output path that can be written and destroys nothing: not an input (nor inside an input
    folder of frames), not a folder, its folder exists and is writable (probed by creating and
    removing a file there), the right extension. Raises UsageError / FileNotFoundError naming it."""
    if suffix == ".mp4" and _is_stream(out):  # "-": was "must be an .mp4 file, got -", as if a suffix were missing
        raise UsageError(f"{flag} {out}: an mp4 cannot be written to stdout or a pipe (it is finished by seeking "
                         "back); give a file path")
    if suffix is not None and not out.lower().endswith(suffix):
        raise UsageError(f"{flag} must be an {suffix} file, got {out}")
    if os.path.isdir(out):
        raise UsageError(f"{flag} is a folder: {out}")
    for inp in inputs:
        if _same_path(out, inp):
            raise UsageError(f"{flag} {out} is the input {inp}: it would be overwritten; choose another path")
        if os.path.isdir(inp) and os.path.abspath(out).startswith(os.path.abspath(inp) + os.sep):
            raise UsageError(f"{flag} {out} is inside the input folder {inp}; choose another path")
    out_dir = os.path.dirname(os.path.abspath(out))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # "in.mp4/out.mp4": it exists, as a file
        raise UsageError(f"{flag}: {out_dir} is a file, not a folder, so {out} cannot be written there")
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{flag}: output folder does not exist: {out_dir}")
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise UsageError(f"{flag}: {out} exists and is not writable")
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".longcat-vc-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag}: cannot write in {out_dir} ({e.strerror or e})") from None


def _input_paths(args) -> List[Tuple[str, str]]:
    """``(name, path)`` of what the command reads: the output may be none of them."""
    if args.command == "refine":
        return [(n, p) for n, p in (("STAGE1", args.stage1), ("--video", args.video)) if p is not None]
    return [("input", args.input)]  # continue / extend (--refine re-reads the same input at ~30 fps)


def _device(args):
    """``--device`` (default: cuda when available) as a torch.device; UsageError naming the flag."""
    import torch

    try:  # "" is refused (torch: "must not be empty"): it ran on the default device as if --device were left out
        device = (torch.device(args.device) if args.device is not None
                  else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UsageError(f"--device: expected cuda, cuda:N or cpu, got {args.device!r} ({e})") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps, ...: taken, then failed after the weights load
        raise UsageError(f"--device: expected cuda, cuda:N or cpu, got {args.device!r}")
    cp = getattr(args, "context_parallel", 1)  # refine has no --context-parallel
    if device.type == "cuda" and device.index is not None and cp > 1:
        # torchrun gives every rank the same argv, and init_distributed keeps an explicit index: all the
        # ranks landed on that one GPU (NCCL refuses two ranks on one device: "Duplicate GPU detected")
        raise UsageError(f"--device {args.device} with --context-parallel {cp} puts every rank on {device}: pass "
                         "--device cuda without an index; each rank takes cuda:LOCAL_RANK")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    return device


def _check_args_before_load(args) -> None:
    """Every argument and path that can be checked without the model, for every command
    (continue, extend, refine; with --refine, --memory, --fp8, --vae-tiling): inputs exist, --out
    (and --timings-json) destroy no input and can be written, --crf, --resolution, --seed,
    --offload-kv-cache without the cache, --device, the LONGCAT_KERNELS_* settings, the attention backend
    (--attn-backend or LONGCAT_KERNELS_BACKEND) on the device, and --fp8 on a device without fp8 GEMMs.
    Called before any weights load."""
    from .video_io import check_crf

    if args.command != "refine" and args.input == "-":  # stdin, as ffmpeg reads "-" (was "input not found: -")
        if os.isatty(0):
            raise UsageError("input -: stdin is a terminal; pipe a video in (... | longcat-vc continue - ...)")
        args.input = "/dev/stdin"  # read once (continue --refine too)
    inputs = _input_paths(args)
    for name, path in inputs:
        if path == "-":  # refine reads STAGE1 twice (its frames, then its tags)
            raise UsageError(f"{name} -: refine reads files, not stdin; give a path")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name} not found: {path}")
    paths = [p for _, p in inputs]
    _check_out_path(_output_target(args.out), paths)
    if args.crf is None:  # continue / extend: 18; continue --refine writes its 720p output at 10 (upstream, refine)
        args.crf_given, args.crf = False, (10 if getattr(args, "refine", False) else 18)
    try:
        check_crf(args.crf, "--crf")
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    res = getattr(args, "resolution", None)
    # refine: LongCat's F64 sizes (VAE 8 x patch 2 x BSA chunk 4); continue / extend: VAE 8 x patch 2
    mult = 64 if args.command == "refine" else 16
    if isinstance(res, tuple) and (res[0] <= 0 or res[1] <= 0 or res[0] % mult or res[1] % mult):
        raise UsageError(
            f"--resolution: expected HEIGHTxWIDTH as positive multiples of {mult}, got {res[0]}x{res[1]}")
    if args.timings_json is not None and not args.timings_json.strip():
        # an empty path read as "not given": no timings written, without a word
        raise UsageError(f"--timings-json: expected a file path, got {args.timings_json!r}")
    if args.timings_json and _is_stream(args.timings_json):
        if args.timings_json != "-" and not os.access(args.timings_json, os.W_OK):
            raise UsageError(f"--timings-json: {args.timings_json} is not writable")
    elif args.timings_json:
        if _same_path(_output_target(args.timings_json), args.out):  # before the check below, which called it "the input"
            raise UsageError(f"--timings-json {args.timings_json} is the same file as --out")
        _check_out_path(_output_target(args.timings_json), paths + [args.out], flag="--timings-json", suffix=None)
    stage1_out = getattr(args, "stage1_out", None)
    if stage1_out is not None:
        _check_out_path(_output_target(stage1_out), paths, flag="--stage1-out")
        for flag, other in (("--out", args.out), ("--timings-json", args.timings_json)):
            if other and _same_path(stage1_out, other):
                raise UsageError(f"--stage1-out {stage1_out} is the same file as {flag}")
    from .stages import _seed_fits

    if args.seed is not None and not _seed_fits(args.seed):  # refine too: else torch's overflow after the load
        raise UsageError(f"--seed must fit in 64 bits ([-2**63, 2**64)), got {args.seed}")
    if args.offload_kv_cache and args.no_kv_cache:  # refine too: the offload would be silently ignored
        raise UsageError("--offload-kv-cache needs the KV cache: drop --no-kv-cache or --offload-kv-cache")
    if getattr(args, "fuse_lora", False) and getattr(args, "mode", "distill") != "distill":
        raise UsageError(f"--fuse-lora applies to --mode distill (the cfg-step LoRA); --mode {args.mode} runs no LoRA")
    from longcat_kernels._envvars import backend_override, check_environment

    try:  # the LONGCAT_KERNELS_* values: a bad one raised in the first kernel call, after the weights load
        check_environment()
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = _device(args)
    backend = getattr(args, "attn_backend", None)
    via = f"--attn-backend {backend}"
    if backend in (None, "auto") and backend_override() not in (None, "auto"):
        # the environment's backend replaces auto (the default): on a device it cannot run, the first
        # attention call raised after the load
        backend = backend_override()
        via = f"LONGCAT_KERNELS_BACKEND={os.environ['LONGCAT_KERNELS_BACKEND']} (replaces --attn-backend auto)"
    if device.type == "cpu" and backend == "cuda":
        raise UsageError(f"{via} needs a CUDA device (running on cpu); use auto, torch or triton")
    from longcat_kernels.dispatch import triton_interpret

    if device.type == "cpu" and backend == "triton" and not triton_interpret():
        raise UsageError(f"{via} on cpu needs TRITON_INTERPRET=1 (the Triton CPU interpreter, slow); "
                         "use auto or torch")
    if device.type == "cpu" and backend == "triton" and getattr(args, "dtype", "auto") == "bf16":
        # the interpreter has no bfloat16 (numpy): the first attention call refused it, after the load
        raise UsageError(f"{via} on cpu runs the Triton CPU interpreter, which has no bfloat16: use --dtype fp32 "
                         "(or fp16), or --attn-backend torch")
    if getattr(args, "fp8", False):
        from .fp8 import check_fp8_device

        try:
            check_fp8_device(device)
        except ValueError as e:
            raise UsageError(f"--{e}") from None  # "--fp8: ...": the flag's name


def _check_resolution_aspect(res, height: int, width: int, what: str) -> None:
    """``--resolution HxW`` of the other orientation than the input (portrait for a landscape clip or
    the reverse, aspect ratios more than 1.5x apart): WIDTHxHEIGHT given for HEIGHTxWIDTH, as ffmpeg
    writes sizes. The model ran on a squashed clip, resized back to the input's size without a word."""
    import math

    if not isinstance(res, tuple):
        return
    th, tw = res
    off = math.log((th / tw) / (height / width))
    if (th > tw) != (height > width) and th != tw and height != width and abs(off) > math.log(1.5):
        raise UsageError(f"--resolution {th}x{tw} is HEIGHTxWIDTH: {tw} wide and {th} high, the other orientation "
                         f"than {what} ({width}x{height}, width x height), which it would squash; did you mean "
                         f"{tw}x{th}?")


def _every(stride: int) -> str:
    """``every 4th frame``; a huge stride (``--input-fps 1e300``: 6.7e298) in 3 digits, not 300."""
    return f"every {stride}th frame" if stride < 10**6 else f"1 frame in {float(stride):.3g}"


def _check_input_frames(video, args) -> None:
    """Enough input frames (after subsampling) for --cond-frames, with the input's path."""
    if video.num_frames < args.cond_frames:
        stride = getattr(video, "stride", 1)
        sub = f" ({_every(stride)}, about 15 fps)" if stride > 1 else ""
        # the likely culprit: --input-fps 1e300 kept 1 frame
        given = f" at --input-fps {args.input_fps:g}" if stride > 1 and args.input_fps is not None else ""
        raise UsageError(
            f"{args.input}: {video.num_frames} frames{sub}, fewer than --cond-frames {args.cond_frames}{given}"
        )


def _available_host_bytes() -> Optional[int]:
    """The host memory a new allocation can take now (``MemAvailable`` of /proc/meminfo, else the free pages);
    None where the system cannot say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _guidance(args) -> float:
    """``--guidance``, or its default for ``--mode`` (``pipeline.MODE_DEFAULTS``: 4.0 basic, 1.0 distill; not
    imported: the parser runs without torch)."""
    return args.guidance if args.guidance is not None else (1.0 if args.mode == "distill" else 4.0)


def _cfg_batch(args) -> int:
    """The DiT's batch per step: 2 under classifier-free guidance (``--guidance`` > 1), else 1."""
    return 2 if _guidance(args) > 1.0 else 1


def _run_bytes(cfg, args, video, size_hw, frames: int, segments: int, on_cpu: bool, dtype_bytes: int) -> int:
    """Shape-dependent bytes of a run (weights left out): the output frames in host memory (the input and every
    new frame at the input's size, a copy while they are joined; the model-size clip), and on CPU, where the
    device is the host, the DiT's activations and KV cache (``memory.estimate_peak_bytes`` without weights) and
    the decoded clip before its conversion to uint8."""
    from .memory import estimate_peak_bytes

    h, w = size_hw
    new = segments * (frames - args.cond_frames) * (2 if getattr(args, "refine", False) else 1)
    host = 2 * (video.num_frames + new) * video.height * video.width * 3 + frames * h * w * 3
    if not on_cpu:
        return host
    est = estimate_peak_bytes(cfg, "resident", height=h, width=w, num_frames=frames, num_cond_frames=args.cond_frames,
                              batch=_cfg_batch(args), dtype_bytes=dtype_bytes, text_encoder_params=0,
                              vae_params=0, kv_cache=not args.no_kv_cache)
    act = est["peak"] - est["text"]  # "text" is the DiT's weights alone here
    return host + act + frames * 3 * h * w * 4


def _check_run_size(args, video) -> None:
    """``--frames`` / ``--segments`` / ``--resolution`` whose run cannot fit, refused before the weights load
    (``--frames 2000001`` on cpu loaded the weights and ran for minutes before failing): the DiT has no positional
    limit (its 3D RoPE is computed for any grid), so the bound is memory. Host memory available now against what
    grows with the run (``_run_bytes``: frames; on cpu also activations and KV cache), never the weights; on CUDA
    also the GPU's total memory against ``memory='low'``'s estimate at the run's shape (the load-time fit check
    sees 480p / 93 frames only). Lenient: it refuses the absurd, not a tight fit."""
    from .config import DiTConfig
    from .memory import estimate_peak_bytes
    from .stages import bucket_size

    try:  # an unreadable config: check_checkpoint says what is wrong, next
        cfg = DiTConfig.from_json(os.path.join(args.checkpoint, "dit"))
    except Exception:
        return
    res = args.resolution
    size_hw = res if isinstance(res, tuple) else bucket_size(video.height, video.width, res)
    device = _device(args)
    on_cpu = device.type == "cpu"
    dtype_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}.get(args.dtype, 2 if not on_cpu else 4)
    segments = 1 if args.command != "extend" else (args.segments if args.segments is not None else len(args.prompt))
    budgets = []  # (bytes needed for (frames, segments), bytes there, what they are)
    avail = _available_host_bytes()
    if avail is not None:
        budgets.append((lambda f, n: _run_bytes(cfg, args, video, size_hw, f, n, on_cpu, dtype_bytes), avail,
                        "host memory on cpu (activations, KV cache and frames)" if on_cpu
                        else "host memory for the frames"))
    if device.type == "cuda":
        import torch

        cp = getattr(args, "context_parallel", 1)

        def on_gpu(f: int, n: int) -> int:
            return estimate_peak_bytes(cfg, "low", height=size_hw[0], width=size_hw[1], num_frames=f,
                                       num_cond_frames=args.cond_frames, batch=_cfg_batch(args),
                                       dtype_bytes=dtype_bytes, fp8=args.fp8, kv_cache=not args.no_kv_cache,
                                       sp_size=cp, cfg_parallel=args.cfg_parallel)["peak"]

        budgets.append((on_gpu, torch.cuda.get_device_properties(device).total_memory,
                        f"{device} memory even in --memory low"))
    gib = 1024 ** 3
    what = f"--frames {args.frames}" + (f" x --segments {segments}" if args.command == "extend" else "")
    for need, have, where in budgets:
        got = need(args.frames, segments)
        if got <= have:
            continue
        lo = args.cond_frames + 4  # the fewest frames a clip can have; then the most that fit, by bisection in 4k+1
        if need(lo, segments) > have:
            s_lo, s_hi = 0, segments  # fewer segments of the shortest clip
            while s_hi - s_lo > 1:
                mid = (s_lo + s_hi) // 2
                s_lo, s_hi = (mid, s_hi) if need(lo, mid) <= have else (s_lo, mid)
            hint = (f"at most --segments {s_lo} fit" if args.command == "extend" and s_lo >= 1
                    else "no --frames fits: use a lower --resolution")
        else:
            k_lo, k_hi = (lo - 1) // 4, (args.frames - 1) // 4
            while k_hi - k_lo > 1:
                mid = (k_lo + k_hi) // 2
                k_lo, k_hi = (mid, k_hi) if need(4 * mid + 1, segments) <= have else (k_lo, mid)
            hint = (f"at most --frames {4 * k_lo + 1} fits"
                    + (" with these --segments" if args.command == "extend" else ""))
        raise UsageError(f"{what} at {size_hw[0]}x{size_hw[1]} needs about {got / gib:.1f} GiB of {where}, more "
                         f"than the {have / gib:.1f} GiB {'available' if 'host' in where else 'it has'}: {hint}")


def _world_size() -> int:
    """``WORLD_SIZE`` (set by torchrun; 1 when unset) as an int, or a UsageError naming it."""
    from .parallel import _env_int

    try:
        return _env_int("WORLD_SIZE", 1)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _fail_early(args) -> None:
    """Cheap checks before the (slow) model load."""
    _check_args_before_load(args)
    for name, val in (("--frames", args.frames), ("--cond-frames", args.cond_frames)):
        if val < 1:
            raise UsageError(f"{name} must be >= 1, got {val}")
    if (args.cond_frames - 1) % 4:
        raise UsageError(f"--cond-frames must be 4k+1 (1, 5, 9, 13, ...), got {args.cond_frames}")
    frames = (args.frames - 1) // 4 * 4 + 1
    if frames <= args.cond_frames:
        # "--frames (7) must be greater than --cond-frames (5)" contradicted itself: 7 is used as 5 (4k+1)
        used = f", used as {frames} (frame counts are 4k+1)" if frames != args.frames else ""
        raise UsageError(f"--frames ({args.frames}{used}) must be greater than --cond-frames ({args.cond_frames})")
    if frames != args.frames:
        print(f"{PROG}: --frames {args.frames} is not 4k+1; using {frames}", file=sys.stderr)
        args.frames = frames
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.steps is not None and args.mode == "distill":  # else refused only after the load
        from .schedule import check_distill_steps

        try:
            check_distill_steps(args.steps, "--steps")
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.guidance is not None and not (1.0 <= args.guidance < float("inf")):
        raise UsageError(f"--guidance must be >= 1 and finite (1 disables classifier-free guidance), "
                         f"got {args.guidance}")
    g = _guidance(args)
    if args.negative_prompt is not None and g <= 1.0:
        # it would be silently ignored (no classifier-free guidance at 1)
        raise UsageError(f"--negative-prompt needs --guidance > 1 (it is {g:g} with --mode {args.mode})")
    if args.memory != "resident" and args.context_parallel > 1:
        # Block streaming under context parallelism is untested: every rank would stream its own copy.
        raise UsageError(f"--memory {args.memory} is not supported with --context-parallel (use --memory resident)")
    if args.context_parallel < 1:
        raise UsageError(f"--context-parallel must be >= 1, got {args.context_parallel}")
    if args.cfg_parallel and (args.context_parallel < 2 or args.context_parallel % 2):
        raise UsageError(f"--cfg-parallel needs --context-parallel N with an even N >= 2, got {args.context_parallel}")
    if args.cfg_parallel and g <= 1.0:
        # no CFG batch to split: both halves of the ranks would run the same branch, each on half the ranks
        raise UsageError(f"--cfg-parallel needs --guidance > 1 (it is {g:g} with --mode {args.mode}): without "
                         "classifier-free guidance there is one branch; drop --cfg-parallel")
    world = _world_size() if args.context_parallel > 1 else 1
    if args.context_parallel > 1 and world != args.context_parallel:
        raise UsageError(
            f"--context-parallel {args.context_parallel} needs {args.context_parallel} processes (WORLD_SIZE={world}): "
            f"launch with torchrun --nproc-per-node {args.context_parallel} -m longcat_vc.cli ..."
        )
    if args.input_fps is not None and not 0 < args.input_fps < float("inf"):  # inf: no subsampling, silently
        raise UsageError(f"--input-fps must be a positive finite number, got {args.input_fps}")
    if args.command == "extend":
        if args.segments is not None and args.segments < 1:
            raise UsageError(f"--segments must be >= 1, got {args.segments}")
        n = args.segments if args.segments is not None else len(args.prompt)
        if len(args.prompt) not in (1, n):
            raise UsageError(f"got {len(args.prompt)} --prompt for --segments {n}: give 1 or {n}")


def _fmt_s(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _summary(timings: dict, load_s: float, write_s: float) -> str:
    steps = timings.get("steps", 0)
    den = timings.get("denoise", 0.0)
    per = den / steps if steps else 0.0
    parts = [
        f"load {_fmt_s(load_s)}",
        f"text {_fmt_s(timings.get('text', 0.0))}",
        f"vae encode {_fmt_s(timings.get('vae_encode', 0.0))}",
        f"cache build {_fmt_s(timings.get('cache_build', 0.0))}",
        f"denoise {_fmt_s(den)} ({steps} steps, {per:.3f} s/step)",
        f"decode {_fmt_s(timings.get('decode', 0.0))}",
        f"write {_fmt_s(write_s)}",
        f"total {_fmt_s(load_s + timings.get('total', 0.0) + write_s)}",
    ]
    return "timings (s): " + " | ".join(parts)


def _quiet_loaders() -> None:
    """Our own progress bars only: silence the libraries' weight-loading bars and info logs."""
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - optional
        pass
    try:
        from diffusers.utils import logging as dlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover - optional
        pass


def _run(args) -> int:
    if args.command == "refine":
        return _run_refine(args)
    _fail_early(args)
    if getattr(args, "refine", False):
        if args.context_parallel > 1:
            raise UsageError("--refine does not run context-parallel yet; drop --context-parallel")
        if args.fp8 and args.fuse_lora:
            # the refinement swaps the distill LoRA for its own, which fp8 weights quantised with the
            # distill LoRA fused in cannot do: it would fail after the whole 480p stage
            raise UsageError("--fp8 with --fuse-lora quantises the distill LoRA into the weights, and --refine must "
                             "swap it for the refinement LoRA: drop --fuse-lora (or --fp8)")
        _check_refine_args(args)
    elif args.spatial_only or args.t_thresh is not None:  # continue / extend
        # refinement flags without --refine would be silently ignored
        flag = "--spatial-only" if args.spatial_only else "--t-thresh"
        raise UsageError(f"{flag} applies to the refinement: add --refine")
    import torch

    from .pipeline import VideoContinuationPipeline, check_checkpoint
    from .video_io import VideoFrames, read_video, subsample_to_fps

    # Read the input before loading the model: a bad video fails in a second, not a minute.
    # --refine reads it at two rates: a pipe (/dev/stdin) is read once, it holds nothing for a second read
    # extend --refine: the input at its own rate, which the pipeline takes to ~15 fps (stage 1) and ~30 fps (the
    # written input part)
    refine = getattr(args, "refine", False)
    full = None
    if args.input_fps is not None or (refine and (_is_stream(args.input) or args.command == "extend")):
        full = read_video(args.input)
    if args.input_fps is not None:
        # subsampled to about 15 fps here, as the pipeline would: the frame-count check below sees
        # what the model will get
        video = subsample_to_fps(VideoFrames(full.frames, float(args.input_fps), full.source), 15.0)[0]
    else:
        # subsampled while decoding (from the one read of a pipe)
        video = read_video(args.input, target_fps=15.0) if full is None else subsample_to_fps(full, 15.0)[0]
        if video.fps is None:  # frame folders, single images: taken as 15 fps
            video = VideoFrames(video.frames, 15.0, video.source)
    _check_input_frames(video, args)
    _check_resolution_aspect(args.resolution, video.height, video.width, f"the input {args.input}")
    video30 = None
    if refine and args.command == "extend":  # its first window has no cond frames: no count to check here
        fps = args.input_fps if args.input_fps is not None else (full.fps or 15.0)  # frame folders: as they are
        video30 = VideoFrames(full.frames, float(fps), full.source)
    elif refine:
        # the refinement's cond frames come from the input at ~30 fps: too few must fail now, not
        # after the whole 480p stage has run
        if args.input_fps is not None:
            video30 = VideoFrames(full.frames, float(args.input_fps), full.source)
        elif full is not None:  # a pipe's one read
            video30 = subsample_to_fps(full, 30.0)[0]
        else:  # subsampled to ~30 fps while decoding; frame folders (no fps) are used as they are
            video30 = read_video(args.input, target_fps=30.0)
        from .refine import _video_30fps

        rnc = args.cond_frames if args.spatial_only else 2 * args.cond_frames
        n30 = int(_video_30fps(video30).shape[0])
        if n30 < rnc:
            raise UsageError(f"{args.input}: {n30} frames at about 30 fps, fewer than the refinement's {rnc} cond "
                             f"frames ({'' if args.spatial_only else '2 x '}--cond-frames {args.cond_frames})")
    _check_run_size(args, video)
    check_checkpoint(args.checkpoint, args.mode)

    device, dtype, seed = _setup(args)
    run = None
    if args.context_parallel > 1:
        from .parallel import init_distributed

        run = init_distributed(args.context_parallel, device)
        device = run.device
        seed = run.broadcast_object(seed)  # the same noise on every rank

    main_rank = run is None or run.is_main
    log = sys.stderr if main_rank else open(os.devnull, "w")
    sub = f" ({_every(video.stride)} of {video.fps * video.stride:g} fps)" if video.stride > 1 and video.fps else ""
    print(f"{PROG}: input {video.num_frames} frames {video.width}x{video.height}"
          f"{f' at {video.fps:g} fps' if video.fps else ''}{sub}; seed {seed}", file=log, flush=True)
    print(f"{PROG}: loading {args.checkpoint} ({args.mode}, {str(dtype).replace('torch.', '')}, {device}, "
          f"memory {args.memory}{', fp8' if args.fp8 else ''})",
          file=log, flush=True)
    _quiet_loaders()
    t0 = time.perf_counter()
    pipe = VideoContinuationPipeline.from_pretrained(
        args.checkpoint, dtype=dtype, device=device, mode=args.mode,
        process_group=None if run is None else run.group, cfg_parallel=args.cfg_parallel,
        fuse_lora=args.fuse_lora, attn_backend=args.attn_backend, memory=args.memory, fp8=args.fp8,
        vae_tiling=args.vae_tiling, progress=not args.no_progress and main_rank,
    )
    load_s = time.perf_counter() - t0
    if run is not None:
        print(f"{PROG}: {pipe.dit.context_parallel!r} ({run.backend})", file=log, flush=True)

    generator = torch.Generator(device=device).manual_seed(seed)
    common = dict(
        resolution=args.resolution,
        num_frames=args.frames,
        num_cond_frames=args.cond_frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        use_kv_cache=not args.no_kv_cache,
        offload_kv_cache=True if args.offload_kv_cache else None,  # None: as --memory says
        use_bsa=True if args.bsa else None,  # without --bsa the checkpoint's config decides
        generator=generator,
        progress=not args.no_progress and main_rank,
    )
    if args.command == "continue":
        if getattr(args, "refine", False):
            # the refinement's memory, checked before stage 1 (it was checked only when the refinement started,
            # after the stage-1 minutes)
            size_hw = pipe._target_size(video.frames, args.resolution)
            pipe.check_refine_fits_ahead(size_hw, args.frames, args.cond_frames, spatial_refine_only=args.spatial_only,
                                         use_kv_cache=not args.no_kv_cache, offload_kv_cache=common["offload_kv_cache"])
        out = pipe(video, args.prompt, args.negative_prompt, **common)
        if args.stage1_out is not None and main_rank:
            from .video_io import write_video

            # the stage-1 cond count, for refine's default --cond-frames (2x it, as continue --refine takes)
            nc1 = int(out.model_frames.shape[0]) - int(out.num_new_frames)
            crf = args.crf if getattr(args, "crf_given", True) else 18
            write_video(_output_target(args.stage1_out), out.model_frames, out.fps, crf=crf,
                        tags={"comment": f"{STAGE1_TAG}{nc1}"})
            args.stage1_written = True  # an interruption or error from here on says it was kept
            print(f"{PROG}: wrote {args.stage1_out}: the stage-1 clip, {out.model_frames.shape[0]} frames at "
                  f"{out.size[1]}x{out.size[0]} (for `{PROG} refine`)", file=log, flush=True)
        if getattr(args, "refine", False):
            stage1_timings = out.timings
            print("stage 1 (480p) " + _summary(stage1_timings, load_s, 0.0), file=log)
            from .refine import refine_bucket

            # the bucket of the stage-1 frames (upstream's generate_refine): with --resolution of another aspect
            # than the input's, "720p" paired the input with another bucket and refused the run after stage 1
            out = pipe.refine(out, args.prompt, video=video30, resolution=refine_bucket(*out.size),
                              spatial_refine_only=args.spatial_only, t_thresh=args.t_thresh, generator=generator,
                              use_kv_cache=not args.no_kv_cache,
                              offload_kv_cache=common["offload_kv_cache"], progress=not args.no_progress and main_rank)
            out.timings["stage1"] = stage1_timings
    else:
        # --refine: SPEC 11's long video, sliding windows over the segments (the input at its own rate)
        ref = dict(refine=True, spatial_refine_only=args.spatial_only, t_thresh=args.t_thresh) if refine else {}
        out = pipe.extend(video30 if refine else video, args.prompt, args.negative_prompt, segments=args.segments,
                          **ref, **common)
        if refine:
            # reported as continue --refine: a stage-1 line, then the refinement's sums over its windows (the
            # "refine (720p)" line showed the 480p segments' timings and steps, the windows' in no line)
            out.timings = _split_extend_refine_timings(out.timings)
            print("stage 1 (480p) " + _summary(out.timings["stage1"], load_s, 0.0), file=log)

    if not main_rank:  # rank 0 writes the video and reports
        run.close()
        return 0
    _write_out(args, out, load_s, seed, log, "refine (720p)" if getattr(args, "refine", False) else "",
               extra={"mode": args.mode})
    if run is not None:
        run.close()
    return 0


def _split_extend_refine_timings(t: dict) -> dict:
    """``extend(refine=True)``'s timings (the stage-1 segments' sums, ``refine``: one dict per window, ``total``: the
    whole call) in ``continue --refine``'s layout: the refinement's sums over its windows, ``refine`` kept, and
    ``stage1`` the segments' part, whose ``total`` is the call's less the windows' (the two add up to the call)."""
    wins = t["refine"]
    out = {key: float(sum(w[key] for w in wins)) for key in ("text", "vae_encode", "cache_build", "denoise", "decode")}
    out["steps"] = int(sum(w["steps"] for w in wins))
    out["kv_cache_bytes"] = max(w["kv_cache_bytes"] for w in wins)
    out["denoise_steps"] = [s for w in wins for s in w["denoise_steps"]]
    out["refine"] = wins
    out["total"] = float(sum(w["total"] for w in wins))
    out["stage1"] = {key: v for key, v in t.items() if key != "refine"}
    out["stage1"]["total"] = t["total"] - out["total"]
    return out


def _allocator_default(environ=os.environ) -> None:
    """Expandable segments for torch's CUDA caching allocator unless the user configured it
    (``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF``). Long runs that move blocks and caches
    between CPU and GPU fragment the default allocator: a 720p refine in ``--memory low`` under a
    24 GiB cap ran out of memory with 10.4 GiB reserved but unallocated, and finished with a
    15.4 GiB peak with expandable segments (bench/results/h200/refine-stage_20261204_*). Read by
    torch when CUDA is first used, which the command has not done yet."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in environ and "PYTORCH_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``longcat-vc`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + one error line and exits 2
    _allocator_default()
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted ({_kept_outputs(args) or 'no output written'})", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, no traceback, unless --debug
        if args.debug:
            raise
        from .stages import VCOutOfMemoryError, _is_oom

        if isinstance(e, UsageError):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        if _is_oom(e) and not isinstance(e, VCOutOfMemoryError):  # ours already says what to try
            msg = f"out of accelerator memory: {str(e).splitlines()[0]} (try --offload-kv-cache, a lower resolution or fewer frames)"
        elif isinstance(e, (ValueError, TypeError, OSError, ImportError, RuntimeError)):
            msg = str(e) or type(e).__name__
        else:
            msg = f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)"
        kept = _kept_outputs(args)
        print(f"{PROG}: error: {msg}" + (f" ({kept})" if kept else ""), file=sys.stderr)
        return 1


def _kept_outputs(args) -> str:
    """What a run that stopped early left behind: the --stage1-out clip is written (complete) before
    stage 2 / the --out video, and stays; --out before --timings-json; empty when nothing was written."""
    if getattr(args, "stage1_written", False) and not getattr(args, "out_written", False):
        return f"{args.out} not written; the stage-1 clip {args.stage1_out} is complete and kept"
    if getattr(args, "out_written", False):
        # --out is renamed into place before --timings-json is written: a stop there said "no output written"
        tj = args.timings_json
        return f"{args.out} was written" + (f"; --timings-json {tj} was not" if tj and not
                                             getattr(args, "timings_written", False) else "")
    return ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
