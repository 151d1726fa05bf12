"""Refinement to 720p: stage 3 of LongCat-Video's VC flow (SPEC 11; upstream ``generate_refine``).

``VideoContinuationPipeline.refine`` runs this module's ``run_refine``. One call, in order (the
order fixes the random stream):

1. Stage-1 frames ``[F, H, W, 3]`` (all decoded frames of the 480p result, cond frames included)
   and the original video at about 30 fps (the cond frames; None: no cond frames). The bucket is
   the 720p table for a spatial factor 64 (VAE 8 x patch 2 x BSA chunk 4): 16:9 -> 704 x 1280.
2. Prompt embeddings without CFG (one DiT forward per step).
3. Pixels: stage-1 frames bilinear-resized to the bucket (``align_corners=True``, in the DiT
   dtype as upstream), scaled to [0, 1], trilinear x2 in time (x1 with ``spatial_refine_only``),
   scaled to [-1, 1]; front-padded (copies of the first frame) and back-padded (copies of the last)
   so that cond and noise latents are multiples of 4 latent frames (the BSA chunk in T).
4. VAE encode, posterior sample (draw 1), normalise, ``z = (1-t) z + t * noise`` (draw 2); then the
   last ``num_cond_frames`` frames of ``video`` (front-padded the same way) are encoded, sampled
   (draw 3) and written into the cond latents. With ``generator=None`` the three draws come from the
   global RNG exactly as upstream draws them; with a generator, all three come from it.
5. Schedule: the plain 50-step schedule, then ``[t_thresh*1000] + [t < t_thresh*1000]`` (1000: the
   scheduler's ``num_train_timesteps``).
6. Denoise with the refinement LoRA and BSA on; cond latents at timestep 0. With the KV cache
   (default) the cond latents' keys/values are computed once (one BSA forward over the cond grid)
   and each step runs the noise latents only against [cache; fresh] keys with BSA.
7. Decode, drop the front padding, keep ``2F`` (``F``) frames; the output is the video followed by
   the refined frames after the first ``num_cond_frames``, resized to the video's size.

How upstream applies BSA with cond latents (``Attention.forward`` / ``_process_attn`` of
``longcat_video/modules/attention.py``), and why the cache reproduces it exactly:

* BSA is used when the forward's latent grid has more than one frame (``shape[0] > 1``, the
  *whole* grid, cond + noise); the refine's grids always have >= 8 frames.
* Cache off, with ``c`` cond latents, upstream makes two attention calls: the cond queries against
  the cond keys only (``flash_attn_bsa_3d`` with ``latent_shape_q = latent_shape_k = (c, H, W)``),
  and the noise queries against all keys, cond first (``latent_shape_q = (T - c, H, W)``,
  ``latent_shape_k = (T, H, W)``). Blocks are 3D chunks of each call's own grid: query chunks
  tile the noise grid from its first frame, key chunks tile the [cond; noise] grid from frame 0,
  so with ``c`` a multiple of the chunk's 4 frames no key block straddles cond and noise. Gating
  (mean-pooled block scores, top-k per query block) is per call over those blocks.
* Our cache build is the first call (the ``"build"`` plan: ``block_sparse_attn`` over ``(c, H, W)``
  with the same chunks), and each cached step is the second call
  (``attn_with_kv_cache(q_noise, k, v, k_cache, v_cache, block_sparse=BlockSparseParams(...))``:
  query grid ``(T-c, H, W)``, key grid ``(c + T - c, H, W)`` with the cache's blocks first). The
  cond tokens' hidden states never depend on the noise tokens (cond queries see cond keys only,
  cond cross-attention output is zero), so the cached keys/values equal those of every cache-off
  step and the two paths agree to rounding.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .loading import CheckpointError
from .lora import compiled_original, fused_loras
from .video_io import VideoFrames, as_video_frames, read_video, subsample_to_fps

__all__ = [
    "REFINE_FPS",
    "REFINEMENT_LORA",
    "REFINEMENT_LORA_FILE",
    "BUCKETS_720P_F64",
    "refine_bucket",
    "refine_timesteps",
    "refine_padding",
    "check_t_thresh",
    "check_refine_resolution",
    "run_refine",
]

REFINE_FPS = 30.0
REFINEMENT_LORA = "refinement_lora"
REFINEMENT_LORA_FILE = os.path.join("lora", "refinement_lora.safetensors")
BSA_LATENT_GRANULARITY = 4  # upstream pads cond and noise latents to multiples of the BSA chunk in T

# LongCat-Video's 720p aspect-ratio buckets for a spatial factor of 64 (height / width -> (h, w)).
BUCKETS_720P_F64: Dict[str, Tuple[int, int]] = {
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408),
    "0.55": (704, 1280), "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024),
    "1.00": (960, 960), "1.14": (1024, 896), "1.31": (1088, 832), "1.50": (1152, 768),
    "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704), "2.20": (1408, 640),
    "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}


def refine_bucket(height: int, width: int) -> Tuple[int, int]:
    """The (height, width) of the F64 720p bucket closest to ``height / width`` (first on ties).
    ValueError for a size that is not positive (0 or negative mapped to the widest bucket, width 0 raised
    ZeroDivisionError)."""
    if not (height > 0 and width > 0):
        raise ValueError(f"refine_bucket: height and width must be positive, got {height} x {width}")
    ratio = height / width
    key = min(BUCKETS_720P_F64, key=lambda k: abs(float(k) - ratio))
    return BUCKETS_720P_F64[key]


def refine_timesteps(shift: float, num_steps: int, t_thresh: float,
                     num_train_timesteps: int = 1000) -> Tuple[torch.Tensor, torch.Tensor]:
    """Timesteps ``[t_thresh*N] + [t < t_thresh*N of the plain schedule]`` (fp32) and their
    sigmas ``t / N`` plus a final 0, ``N = num_train_timesteps`` (1000 upstream; SPEC 11)."""
    from .schedule import vc_timesteps

    # (0, 1] as refine() takes it: 1.5 gave a first sigma above pure noise, 0 a lone no-op step at t=0
    t_thresh = check_t_thresh(t_thresh)
    ts, _ = vc_timesteps(num_steps, shift, "plain", num_train_timesteps=num_train_timesteps)
    th = torch.tensor(t_thresh * num_train_timesteps, dtype=ts.dtype)
    ts = torch.cat([th[None], ts[ts < th]])
    sig = torch.cat([ts / num_train_timesteps, torch.zeros(1, dtype=ts.dtype)])
    return ts, sig


def refine_padding(num_frames: int, num_cond_frames: int, temporal: int = 4) -> Dict[str, int]:
    """Padding of ``num_frames`` refine frames whose first ``num_cond_frames`` are cond frames.

    Returns ``cond_latents`` (multiple of 4, 0 without cond frames), ``cond_added`` (frames
    copied in front), ``noise_latents`` (multiple of 4) and ``noise_added`` (frames copied at the
    back). Upstream's rule, except without cond frames where it leaves fewer than ``num_frames``
    frames to decode: then 4 more noise latents. Ints with ``0 <= num_cond_frames < num_frames`` and
    ``temporal >= 1`` (TypeError / ValueError: a count refine() never allows gave no noise latents or
    fractional frame counts).
    """
    from .stages import _check_int

    num_frames = _check_int("refine_padding: num_frames", num_frames, 1)
    num_cond_frames = _check_int("refine_padding: num_cond_frames", num_cond_frames, 0)
    temporal = _check_int("refine_padding: temporal", temporal, 1)
    if num_cond_frames >= num_frames:
        raise ValueError(f"refine_padding: num_cond_frames={num_cond_frames} must be less than "
                         f"num_frames={num_frames} (nothing would be refined)")
    g = BSA_LATENT_GRANULARITY
    nc, added = num_cond_frames, 0
    c_lat = 0
    if nc > 0:
        c_lat = 1 + math.ceil((nc - 1) / temporal)
        c_lat = math.ceil(c_lat / g) * g
        added = 1 + (c_lat - 1) * temporal - nc
    n_noise = num_frames - num_cond_frames
    n_lat = math.ceil(math.ceil(n_noise / temporal) / g) * g
    if nc == 0 and 1 + (n_lat - 1) * temporal < n_noise:
        # without cond frames the VAE keeps 1 + 4k of the 4 * n_lat padded frames: upstream's padding
        # lost the last 1-3 frames of n = 14, 15, 0 (mod 16), and the output had fewer than it reported
        n_lat += g
    return {"cond_latents": c_lat, "cond_added": added, "noise_latents": n_lat,
            "noise_added": n_lat * temporal - n_noise}


def _lora_rank_equivalent(path: Optional[str], config) -> int:
    """The rank ``estimate_peak_bytes`` needs to count the LoRA file's parameters (it assumes about
    ``rank * 30 * hidden`` per block); 0 without a readable file. Reads the header only."""
    if path is None or not os.path.isfile(path):
        return 0
    try:
        from safetensors import safe_open

        numel = 0
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= int(d)
                numel += n
    except Exception:  # an unreadable file fails later with its own error, at the load
        return 0
    return int(math.ceil(numel / max(1, config.depth * 30 * config.hidden_size)))


def refine_estimate_shape(size: Tuple[int, int], n_refine: int, nc: int, *, temporal: int = 4, dtype_bytes: int = 2,
                          lora_rank: int = 0, fp8: bool = False,
                          use_kv_cache: bool = True) -> Tuple[Dict[str, Any], int, int]:
    """``(kwargs, latents, cond_latents)`` for a refinement of ``n_refine`` frames (``nc`` of them
    cond) at ``size``: the keyword arguments of ``memory.estimate_peak_bytes`` (its padded latent grid
    expressed as the frame counts the estimate takes, batch 1: no CFG) and that grid's latent frames."""
    pad = refine_padding(n_refine, nc, temporal)
    c = pad["cond_latents"]
    t_lat = c + pad["noise_latents"]
    kwargs = dict(height=int(size[0]), width=int(size[1]), num_frames=4 * (t_lat - 1) + 1,
                  num_cond_frames=4 * (c - 1) + 1 if c > 0 else 0, batch=1, dtype_bytes=dtype_bytes,
                  lora_rank=lora_rank, fp8=fp8, kv_cache=bool(use_kv_cache) and c > 0)
    return kwargs, t_lat, c


def check_refine_fits(pipe, size: Tuple[int, int], n_refine: int, nc: int, *, use_kv_cache: bool = True,
                      offload_kv_cache: Optional[bool] = None, lora_path: Optional[str] = None,
                      budget_bytes: Optional[int] = None, margin: float = 1.05) -> Optional[Dict[str, int]]:
    """Raises ``MemoryModeError`` before a refinement does any work when its estimated peak
    (``memory.estimate_peak_bytes`` at the refine's latent grid, batch 1, the refinement LoRA, the
    pipeline's memory mode and cache options) times ``margin`` exceeds what the device can hold:
    its free memory and the caching allocator's free blocks plus what the pipeline's components
    already hold there (the estimate counts them too). The message says what fits: offloading the
    KV cache, a lower memory mode, or neither. Context parallel: per rank (its token shard, its heads
    of the cache), and no lower mode is named (only ``resident`` runs context parallel). Returns the
    estimate; None on a CPU device (no check). ``budget_bytes`` replaces the device query (tests)."""
    from .memory import (MemoryModeError, check_budget_args, device_bytes, estimate_peak_bytes, usable_bytes, GiB,
                         MEMORY_MODES)

    check_budget_args(budget_bytes, margin)
    device = pipe.device
    if budget_bytes is None and (device.type != "cuda" or not torch.cuda.is_available()):
        return None
    cfg = pipe.dit.config
    mode = pipe._memory.name
    offload = pipe._memory.offload_kv_cache if offload_kv_cache is None else bool(offload_kv_cache)
    from .fp8 import Fp8Linear

    shape, t_lat, c = refine_estimate_shape(size, n_refine, nc, temporal=pipe.vae_scale_temporal,
                                            dtype_bytes=torch.empty(0, dtype=pipe.dtype).element_size(),
                                            lora_rank=_lora_rank_equivalent(lora_path, cfg),
                                            fp8=any(isinstance(m, Fp8Linear) for m in pipe.dit.modules()),
                                            use_kv_cache=use_kv_cache)
    cached = shape["kv_cache"]
    cp = getattr(pipe.dit, "context_parallel", None)
    if cp is not None:
        # each rank holds its token shard's activations and its heads of the KV cache (batch 1: no CFG split)
        shape["sp_size"] = cp.sp_size
    est = estimate_peak_bytes(cfg, mode, offload_kv_cache=offload, **shape)
    if budget_bytes is None:
        own = device_bytes([pipe.dit, getattr(pipe, "vae", None), getattr(pipe, "text_encoder", None)], device)
        budget_bytes = usable_bytes(device, own)
    need = est["peak"] * margin
    if need <= budget_bytes:
        return est

    def peak(m, off):
        return estimate_peak_bytes(cfg, m, offload_kv_cache=off, **shape)["peak"] * margin

    offloaded = peak(mode, True) if cached and not offload else None
    if offloaded is not None and offloaded <= budget_bytes:
        hint = (f"offloading its KV cache fits, estimated {offloaded / GiB:.1f} GiB: pass "
                "offload_kv_cache=True (--offload-kv-cache)")
    elif cp is not None:
        # the streaming modes are refused with context parallel: a hint naming one sent the user to that refusal
        hint = ("context parallel runs memory='resident' only: use more ranks, refine at a lower resolution or "
                "fewer frames (spatial_refine_only=True, --spatial-only)")
    else:
        lower = MEMORY_MODES[MEMORY_MODES.index(mode) + 1:]
        lower_off = None if offload_kv_cache is None else offload
        fits = [m for m in lower if peak(m, lower_off) <= budget_bytes]
        if fits:
            # the estimate the fit was decided on (the caller's offload_kv_cache, not the mode's default)
            hint = (f"memory={fits[0]!r} fits, estimated {peak(fits[0], lower_off) / GiB:.1f} GiB: load the pipeline "
                    f"with memory={fits[0]!r} (--memory {fits[0]})")
        else:
            low = peak("low", True if cached else None)
            if low <= budget_bytes:  # only the caller's offload_kv_cache=False kept 'low' from fitting
                hint = (f"memory='low' with its KV cache offloaded fits, estimated {low / GiB:.1f} GiB: load the "
                        "pipeline with memory='low' (--memory low) and leave offload_kv_cache unset (or True)")
            else:
                hint = (f"even memory='low' needs about {low / GiB:.1f} GiB: refine at a lower resolution, fewer "
                        "frames (spatial_refine_only=True, --spatial-only) or on a larger GPU")
    stage = max((k for k in est if k != "peak"), key=lambda k: est[k])
    raise MemoryModeError(
        f"the refinement at {size[1]}x{size[0]} ({t_lat} latent frames, {c} of them cond) needs about "
        f"{need / GiB:.1f} GiB in memory={mode!r} (peak in stage {stage!r}) but {device} has "
        f"{budget_bytes / GiB:.1f} GiB usable for it; {hint}"
    )


def _as_frames(x, name: str) -> np.ndarray:
    if isinstance(x, (str, os.PathLike)):
        return read_video(x).frames  # stage-1 frames are used as they are: no subsampling
    return as_video_frames(x, name=name).frames


def _video_30fps(video) -> np.ndarray:
    if isinstance(video, (str, os.PathLike)):
        return read_video(video, target_fps=REFINE_FPS).frames
    vf = as_video_frames(video, name="video")
    if isinstance(video, VideoFrames) and vf.fps:
        vf = subsample_to_fps(vf, REFINE_FPS)[0]
    return vf.frames


# the DiT attribute naming the file its refinement LoRA was loaded from (``_lora_file_id``; refine_state)
_REFINEMENT_SOURCE = "_refinement_lora_source"


def _lora_file_id(path: str) -> tuple:
    """What tells a LoRA file from another, or from itself rewritten: its absolute path, inode, size and
    modification time (``os.stat``; the file is not read)."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns


def _refinement_lora_to_load(pipe, lora_path: Optional[str]) -> bool:
    """Whether ``refine_state`` loads the refinement LoRA from ``lora_path``: it is not loaded, or an earlier
    refinement loaded it from another file, or from this one before it changed (``pipe.refinement_lora_path``
    set to a new file, or the file rewritten after more training: the first call's LoRA stayed in use without
    a word). One the user loaded by hand is kept while the path and its file stay as they were. The file the
    loaded LoRA came from is recorded on the DiT (``_REFINEMENT_SOURCE``), not on the pipeline: a second
    pipeline on the same DiT with another ``refinement_lora_path`` refined with the first one's LoRA."""
    if REFINEMENT_LORA not in getattr(pipe.dit, "lora_names", []):
        return True
    source = getattr(compiled_original(pipe.dit), _REFINEMENT_SOURCE, None)
    if source is None or lora_path is None:
        return False
    try:
        return _lora_file_id(lora_path) != source
    except OSError:  # gone: check_refine_lora names it
        return True


def check_refine_lora(pipe, lora_path: Optional[str]) -> None:
    """Before any refinement work: the refinement LoRA can be swapped in, i.e. it is loaded or its
    file exists, and the DiT's LoRA is not fused into fp8 weights (those cannot be unfused: with
    ``fp8=True, fuse_lora=True`` the refinement would fail only after the work before it)."""
    from .fp8 import Fp8Linear

    dit = pipe.dit
    if REFINEMENT_LORA not in getattr(dit, "lora_names", []) and lora_path is None:
        # a pipeline built by hand: "file not found: None" said neither what is missing nor how to give it
        raise CheckpointError(
            f"refinement LoRA: none known to this pipeline (built without from_pretrained); set "
            f"pipe.refinement_lora_path to the checkpoint's {REFINEMENT_LORA_FILE}, or load it with "
            f"pipe.dit.load_lora(path, {REFINEMENT_LORA!r})")
    if _refinement_lora_to_load(pipe, lora_path) and not os.path.isfile(lora_path):
        raise CheckpointError(
            f"refinement LoRA file not found: {lora_path} (expected {REFINEMENT_LORA_FILE} in the checkpoint folder)"
        )
    if any(isinstance(m, Fp8Linear) and m.lora_fused for m in dit.modules()):
        raise ValueError("refine: the DiT's fp8 weights were quantised with its LoRA fused in, and the refinement "
                         "swaps in its own LoRA; load the pipeline without fuse_lora (or without fp8) to refine")


@contextlib.contextmanager
def refine_state(pipe, lora_path: Optional[str]):
    """Refinement LoRA alone and BSA on for the body; the previous LoRA/fuse/BSA state after,
    also when the body raises. Loads the LoRA on first use (and again when ``lora_path`` names another file
    than the one loaded, or that file changed: ``_refinement_lora_to_load``) without touching any RNG."""
    dit = pipe.dit
    # before a (re)load: replacing an active LoRA of the same name unfuses the model
    prev_active = list(getattr(dit, "active_loras", []))
    prev_fused = bool(fused_loras(dit))
    cfg = dit.config
    prev_bsa = cfg.enable_bsa
    try:
        # inside the try: a reload that fails after replacing an active adapter (which unfuses the model)
        # still gets the previous LoRA/fuse state back
        if _refinement_lora_to_load(pipe, lora_path):
            if lora_path is None or not os.path.isfile(lora_path):
                raise CheckpointError(f"refinement LoRA file not found: {lora_path} ({REFINEMENT_LORA_FILE} of the "
                                      "checkpoint)")
            devices = [dit.device] if getattr(dit, "device", torch.device("cpu")).type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                try:
                    source = _lora_file_id(lora_path)
                    dit.load_lora(lora_path, REFINEMENT_LORA)
                except Exception as e:
                    raise CheckpointError(f"failed to load the refinement LoRA {lora_path}: {e}") from e
            # on the DiT itself, not a torch.compile wrapper: a pipeline on the bare DiT did not see the record,
            # took the LoRA for one loaded by hand and refined with another file's LoRA
            setattr(compiled_original(dit), _REFINEMENT_SOURCE, source)
        elif getattr(compiled_original(dit), _REFINEMENT_SOURCE, None) is None and lora_path is not None:
            # one loaded by hand before any refinement: kept while the path and its file stay as they are now
            # (with nothing recorded, a later pipe.refinement_lora_path was ignored without a word)
            try:
                setattr(compiled_original(dit), _REFINEMENT_SOURCE, _lora_file_id(lora_path))
            except OSError:  # no such file: the hand-loaded LoRA is used; a path set later is compared then
                pass
        dit.disable_loras()
        dit.enable_loras([REFINEMENT_LORA])
        cfg.enable_bsa = True
        yield
    finally:
        cfg.enable_bsa = prev_bsa
        dit.disable_loras()
        if prev_active:
            dit.enable_loras(prev_active)
            if prev_fused:
                dit.fuse_lora()


def check_t_thresh(t_thresh, name: str = "t_thresh") -> float:
    """``t_thresh`` as a float in (0, 1] (SPEC 11); any real number type (numpy scalars too), no bool."""
    if isinstance(t_thresh, bool) or not isinstance(t_thresh, numbers.Real) or not math.isfinite(t_thresh):
        raise TypeError(f"{name} must be a finite number in (0, 1], got {t_thresh!r}")
    if not 0.0 < t_thresh <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {t_thresh}")
    return float(t_thresh)


def check_refine_resolution(resolution, multiple: int, name: str = "resolution"):
    """``'720p'`` or a ``(height, width)`` of positive multiples of ``multiple`` (VAE x patch x BSA
    chunk); returns it (the tuple as ints). ValueError naming ``name`` otherwise."""
    if isinstance(resolution, str):
        if resolution != "720p":
            raise ValueError(f"{name} must be '720p' or (height, width), got {resolution!r}")
        return resolution
    if (isinstance(resolution, (tuple, list)) and len(resolution) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in resolution)):
        size = (int(resolution[0]), int(resolution[1]))
        if size[0] <= 0 or size[1] <= 0 or size[0] % multiple or size[1] % multiple:
            raise ValueError(f"{name} (height, width) must be positive multiples of {multiple}, got {size}")
        return size
    raise ValueError(f"{name} must be '720p' or a (height, width) tuple, got {resolution!r}")


def _check_stage1_latents(lat, z_dim: int) -> None:
    """A stage-1 output's latents as ``__call__`` returns them: ``[1, z_dim, T, h, w]``, floating and
    finite (another channel count failed deep in the VAE, a second sample was dropped silently, and
    NaN decoded to black frames that were then refined)."""
    if not isinstance(lat, torch.Tensor) or lat.ndim != 5 or lat.shape[2] < 1:
        raise ValueError(f"stage1.latents must be a [B, C, T, h, w] tensor, got "
                         f"{tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__}")
    if lat.shape[0] != 1 or lat.shape[1] != z_dim or not lat.is_floating_point():
        raise ValueError(f"stage1.latents: expected a floating [1, {z_dim}, T, h, w] tensor (one clip, the VAE's "
                         f"z_dim channels), got {lat.dtype} {list(lat.shape)}")
    if not bool(torch.isfinite(lat).all()):
        raise ValueError("stage1.latents: expected finite values, got NaN/Inf (decoded, they become black frames)")


def resolve_refine_args(pipe, stage1, video, num_cond_frames, resolution, spatial_refine_only, t_thresh,
                        num_inference_steps, output_type):
    """Every check that needs no model work, all before any (a stage-1 output's latents are decoded
    last). ``pipe=None`` (the CLI, before loading weights): checks only, with LongCat's VAE
    factors; ``stage1`` must then be frames. Returns a dict of resolved inputs."""
    from .stages import BUCKETS, VideoContinuationOutput, _check_int, bucket_size

    if not isinstance(spatial_refine_only, bool):
        raise TypeError(f"spatial_refine_only must be a bool, got {type(spatial_refine_only).__name__}")
    check_t_thresh(t_thresh)
    steps = _check_int("num_inference_steps", num_inference_steps, 1)
    if output_type not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
    vae_s = 8 if pipe is None else pipe.vae_scale_spatial
    vae_t = 4 if pipe is None else pipe.vae_scale_temporal
    resolution = check_refine_resolution(resolution, vae_s * 2 * BSA_LATENT_GRANULARITY)

    out_size = None
    frames1 = None
    if isinstance(stage1, VideoContinuationOutput):
        frames1 = getattr(stage1, "model_frames", None)
        if frames1 is None:
            lat = stage1.latents
            if lat is None:
                # (its frames hold the whole input before the new frames, not one clip starting with its cond
                # frames: refined with video=, the first frames were conditioned on the input's last ones)
                raise ValueError("stage1: this VideoContinuationOutput has neither model_frames nor latents "
                                 "(extend's output, a long video): refine it with extend(..., refine=True), which "
                                 "refines it window by window")
            if pipe is None:
                raise ValueError("stage1: a VideoContinuationOutput without model_frames needs the pipeline")
            _check_stage1_latents(lat, int(pipe._latents_mean.shape[1]))
            # decoded only after every check below: the frame count and size follow from the shape
            shape1 = (1 + (int(lat.shape[2]) - 1) * vae_t, int(lat.shape[3]) * vae_s, int(lat.shape[4]) * vae_s)
        if stage1.frames is not None:
            out_size = tuple(stage1.frames.shape[1:3])
    else:
        frames1 = _as_frames(stage1, "stage1")
    if frames1 is not None:
        shape1 = tuple(int(v) for v in frames1.shape[:3])
    if out_size is None:
        out_size = shape1[1:3]

    vid = None if video is None else _video_30fps(video)
    base_nc = 13
    if isinstance(stage1, VideoContinuationOutput):
        # the stage-1 cond count: its generated clip minus its new frames
        base_nc = max(1, shape1[0] - int(stage1.num_new_frames))
    if vid is None:
        if num_cond_frames is not None and _check_int("num_cond_frames", num_cond_frames, 0) != 0:
            raise ValueError(f"num_cond_frames={num_cond_frames} needs video (the cond frames); "
                             "video=None refines without cond frames")
        nc = 0
    elif num_cond_frames is None:
        nc = base_nc if spatial_refine_only else 2 * base_nc
    else:
        nc = _check_int("num_cond_frames", num_cond_frames, 1)
    f1 = shape1[0]
    n_refine = f1 if spatial_refine_only else 2 * f1
    if vid is not None and vid.shape[0] < nc:
        raise ValueError(f"video has {vid.shape[0]} frames at ~{REFINE_FPS:g} fps, fewer than num_cond_frames={nc}")
    if n_refine <= nc:
        raise ValueError(f"stage1 has {f1} frames ({n_refine} refine frames), not more than num_cond_frames={nc}: "
                         "nothing would be refined")

    if isinstance(resolution, str):
        size = refine_bucket(*shape1[1:3])
        if vid is not None:
            vh, vw = (int(d) for d in vid.shape[1:3])
            vsize = refine_bucket(vh, vw)
            # stage 1 ran at a bucket of the video's own table (480p by default): for 16:10, 2:1 and other
            # ratios that bucket maps to another 720p bucket than the video's aspect itself does
            paired = {vsize} | {refine_bucket(*bucket_size(vh, vw, r)) for r in BUCKETS}
            # a continuation's output holds its input frames at the input's size: one of the video's size is
            # its clip, whatever resolution stage 1 ran at (an explicit (h, w) of another aspect was refused)
            own_input = (isinstance(stage1, VideoContinuationOutput) and stage1.frames is not None
                         and tuple(stage1.frames.shape[1:3]) == (vh, vw))
            if size not in paired and not own_input:
                raise ValueError(
                    f"stage1 frames ({shape1[2]}x{shape1[1]}) map to the 720p bucket {size[1]}x{size[0]} "
                    f"but video ({vid.shape[2]}x{vid.shape[1]}) maps to {vsize[1]}x{vsize[0]}: not the same clip? "
                    f"(if it is, pass resolution=(height, width))"
                )
    else:
        size = resolution
    if vid is not None:
        out_size = tuple(vid.shape[1:3])
    if frames1 is None:
        frames1 = pipe.decode_latents(stage1.latents)
    return dict(frames1=frames1, video=vid, nc=nc, n_refine=n_refine, size=size, out_size=out_size, steps=steps)


def _draw(shape, generator, device, dtype):
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    gen_device = generator.device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _normalize_as_upstream(pipe, z: torch.Tensor) -> torch.Tensor:
    """``(z - mean) * (1 / std)`` in ``z``'s dtype (upstream's rounding: the reciprocal of the
    std is taken after the cast, in bf16 for a bf16 VAE)."""
    mean = pipe._latents_mean.to(z.device, z.dtype)
    inv_std = 1.0 / pipe._latents_std.to(z.device, z.dtype)
    return (z - mean) * inv_std


@torch.no_grad()
def prepare_refine_latents(pipe, frames1: np.ndarray, video: Optional[np.ndarray], size: Tuple[int, int],
                           n_refine: int, nc: int, t_thresh: float, generator) -> Tuple[torch.Tensor, Dict[str, int]]:
    """``[1, 16, c_lat + n_lat, h/8, w/8]`` fp32 latents of SPEC 11 and the padding dict."""
    device, dtype = pipe.device, pipe.dtype
    h, w = size
    st = pipe.vae_scale_temporal
    pad = refine_padding(n_refine, nc, st)
    # np.require: a read-only array is copied (torch warns of undefined behaviour for one)
    x = torch.from_numpy(np.require(frames1, requirements=["C", "W"]))
    x = x.permute(0, 3, 1, 2).to(device=device, dtype=dtype)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)
    x = x.permute(1, 0, 2, 3).unsqueeze(0) / 255.0
    x = F.interpolate(x, size=(n_refine, h, w), mode="trilinear", align_corners=True)
    x = x * 2 - 1
    x = torch.cat([x[:, :, :1].repeat(1, 1, pad["cond_added"], 1, 1), x,
                   x[:, :, -1:].repeat(1, 1, pad["noise_added"], 1, 1)], dim=2)
    vae_param = next(pipe.vae.parameters())
    posterior = pipe.vae.encode(x.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
    z = posterior.sample(generator=generator)  # draw 1
    del x
    zn = _normalize_as_upstream(pipe, z)  # in the VAE dtype, as upstream normalises and mixes
    noise = _draw(zn.shape, generator, zn.device, zn.dtype)  # draw 2
    latents = ((1 - t_thresh) * zn + t_thresh * noise).to(device=device, dtype=torch.float32)
    if nc > 0:
        cond = pipe._frames_to_pixels(video[-nc:], size)
        cond = torch.cat([cond[:, :, :1].repeat(1, 1, pad["cond_added"], 1, 1), cond], dim=2)
        post = pipe.vae.encode(cond.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
        zc = post.sample(generator=generator)  # draw 3
        c = pad["cond_latents"]
        if zc.shape[2] != c:
            raise RuntimeError(f"VAE encoded {nc + pad['cond_added']} cond frames to {zc.shape[2]} latents, expected {c}")
        latents[:, :, :c] = _normalize_as_upstream(pipe, zc.float()).to(device)
    return latents, pad


@torch.no_grad()
def _with_cond(prepared) -> tuple:
    """``prepare_refine_latents``' answer as ``_rank0_latents`` takes it: ``(latents, pad, cond latents)``."""
    latents, pad = prepared
    return latents, pad, pad["cond_latents"]


def run_refine(pipe, stage1, prompt: str = "", *, video=None, num_cond_frames=None, resolution="720p",
               spatial_refine_only: bool = False, t_thresh: float = 0.5, num_inference_steps: int = 50,
               generator=None, use_kv_cache: bool = True, offload_kv_cache: Optional[bool] = None,
               output_type: str = "np", progress: bool = True, lora_path: Optional[str] = None,
               desc: str = "Refining"):
    """See ``VideoContinuationPipeline.refine``."""
    from .stages import (VideoContinuationOutput, _check_flags, _check_offload_needs_cache, _denoise, _rank0_latents,
                         _ranks_agree, _refuse_non_finite_latents, _resize_frames, _Timer)

    timer = _Timer(pipe.device)
    t_start = timer.now()
    with _ranks_agree(pipe, "refine's argument checks and video reads") as ok:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        _check_flags(use_kv_cache=use_kv_cache, offload_kv_cache_opt=offload_kv_cache, progress=progress)
        _check_offload_needs_cache(use_kv_cache, offload_kv_cache)
        memory = pipe._memory.name
        check_refine_lora(pipe, lora_path)
        a = resolve_refine_args(pipe, stage1, video, num_cond_frames, resolution, spatial_refine_only, t_thresh,
                                num_inference_steps, output_type)
        # before any work of its own: a refinement that cannot fit fails here, with what would fit. The caller's
        # offload_kv_cache, None kept: resolved to this mode's False, 'low' was checked with its cache on the
        # device and the hint said "even memory='low' needs" a size that fits
        check_refine_fits(pipe, a["size"], a["n_refine"], a["nc"], use_kv_cache=use_kv_cache,
                          offload_kv_cache=offload_kv_cache, lora_path=lora_path)
        ok.record()
    if offload_kv_cache is None:  # as the memory mode says (low: offloaded), like the continuation
        offload_kv_cache = pipe._memory.offload_kv_cache
    generator = pipe._generator(generator, pipe.device)
    timesteps, sigmas = refine_timesteps(pipe.shift, a["steps"], float(t_thresh), pipe.num_train_timesteps)
    timings: Dict[str, Any] = {}

    with refine_state(pipe, lora_path):
        t0 = timer.now()
        embeds, mask = pipe.encode_text([prompt], names=["prompt"])
        timings["text"] = timer.now() - t0

        t0 = timer.now()
        # context parallel: every rank denoises rank 0's latents (the ranks' RNGs may differ), as __call__ does
        latents, pad, embeds, mask = _rank0_latents(
            pipe, "refine",
            lambda: _with_cond(prepare_refine_latents(pipe, a["frames1"], a["video"], a["size"], a["n_refine"],
                                                      a["nc"], float(t_thresh), generator)),
            embeds, mask, timesteps, sigmas, 1.0, use_kv_cache)
        t1 = timer.now()
        timings["vae_encode"] = t1 - t0
        c = pad["cond_latents"]
        full = _denoise(pipe, latents, c, timesteps, sigmas, embeds, mask, use_kv_cache=use_kv_cache,
                        offload_kv_cache=offload_kv_cache, guidance_scale=1.0, do_cfg=False, memory=memory,
                        desc=desc, progress=progress, timer=timer, timings=timings, t_start=t1,
                        names=("building the refinement's KV cache", "refining"))
    _refuse_non_finite_latents(full, "refinement's denoised")

    nc, n_refine = a["nc"], a["n_refine"]
    fps = REFINE_FPS / 2 if spatial_refine_only else REFINE_FPS
    vid = a["video"]
    n_in = 0 if vid is None else int(vid.shape[0])
    if output_type == "latent":
        timings["decode"] = 0.0
        timings["total"] = timer.now() - t_start
        return VideoContinuationOutput(None, full, fps, n_in, n_refine - nc, a["size"], timings)
    t3 = timer.now()
    decoded = pipe.decode_latents(full)[pad["cond_added"]: pad["cond_added"] + n_refine]
    from PIL import Image

    new = _resize_frames(decoded[nc:], a["out_size"], Image.BICUBIC)
    timings["decode"] = timer.now() - t3
    frames = new if vid is None else np.concatenate([vid, new], axis=0)
    timings["total"] = timer.now() - t_start
    out = VideoContinuationOutput(frames, full, fps, n_in, n_refine - nc, a["size"], timings)
    out.model_frames = decoded
    return out
