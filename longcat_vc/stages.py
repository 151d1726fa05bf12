"""What the pipeline's stages share: the output type and small helpers.

``pipeline.py`` (480p continuation) and ``refine.py`` (720p refinement) both return a
``VideoContinuationOutput`` and use these helpers; they live here so that neither module imports the
other's internals (no import circle).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["VideoContinuationOutput"]


@dataclass
class VideoContinuationOutput:
    """What a continuation returns.

    Attributes:
        frames (np.ndarray | None): ``[F_in + F_new, H, W, 3]`` uint8, the input frames (after fps
            subsampling) followed by the generated ones, at the input's size. None for
            ``output_type="latent"``.
        latents (Tensor | None): ``[1, 16, T, h, w]`` fp32 normalised latents (cond + generated)
            of the (last) clip, on the pipeline's device; None from ``extend``.
        fps (float): frame rate of ``frames`` (15, the model's rate).
        num_input_frames (int): F_in.
        num_new_frames (int): F_new.
        size (tuple): the bucket (height, width) the model ran at.
        model_frames (np.ndarray | None): ``[num_frames, h, w, 3]`` uint8, every decoded frame of
            the (last) clip at the model's size, cond frames included (what ``refine`` takes as
            stage 1); None for ``output_type="latent"`` and from ``extend``.
        timings (dict): seconds: ``text``, ``vae_encode``, ``cache_build``, ``denoise`` (sum),
            ``denoise_steps`` (list, one per step), ``decode``, ``total``; plus ``steps`` and
            ``kv_cache_bytes`` (0 with the cache off).
            ``extend`` adds ``segments`` (one such dict per segment).
    """

    frames: Optional[np.ndarray]
    latents: Optional[torch.Tensor]
    fps: float
    num_input_frames: int
    num_new_frames: int
    size: Tuple[int, int]
    timings: Dict[str, Any] = field(default_factory=dict)
    model_frames: Optional[np.ndarray] = None


def _resize_frames(frames: np.ndarray, size_hw: Tuple[int, int], resample) -> np.ndarray:
    from PIL import Image

    h, w = size_hw
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), resample=resample)) for f in frames])


class VCOutOfMemoryError(RuntimeError):
    """The accelerator ran out of memory; the message says what to try."""


def _fragmented_gib(cause: Optional[BaseException]) -> float:
    """GiB the caching allocator held "reserved but unallocated" when ``cause`` (a CUDA OOM) was raised,
    read from torch's message (0 when it does not say)."""
    m = re.search(r"([0-9.]+) ([KMG])iB is reserved by PyTorch but unallocated", str(cause or ""))
    if not m:
        return 0.0
    return float(m.group(1)) / {"K": 2**20, "M": 2**10, "G": 1}[m.group(2)]


def _oom_error(stage: str, *, use_kv_cache: bool, offload_kv_cache: bool, memory: str,
               cause: Optional[BaseException] = None, context_parallel: bool = False) -> VCOutOfMemoryError:
    """The out-of-memory error of a denoising call (continuation or refinement), with what to try
    (``context_parallel``: no streaming mode, which context parallelism refuses, but more ranks).

    With ``cause`` (torch's OOM): when the allocator held >= 1 GiB reserved but unallocated
    (fragmentation; a 720p refine in ``low`` under a 24 GiB cap failed with 12.5 GiB allocated and
    10.4 GiB fragmented), that comes first, with torch's remedy (``expandable_segments``)."""
    hints = []
    frag = _fragmented_gib(cause)
    # torch reads either variable (PYTORCH_ALLOC_CONF is the newer name): one already set needs no hint
    conf = (os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")).lower()
    if frag >= 1.0 and "expandable_segments:true" not in conf.replace(" ", ""):
        hints.append(f"{frag:.1f} GiB were reserved but unallocated (fragmentation): set "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before the process starts")
    if use_kv_cache and not offload_kv_cache:
        hints.append("retry with offload_kv_cache=True (--offload-kv-cache) to keep the KV cache in CPU memory")
    if context_parallel:
        hints.append("run on more ranks (context parallel runs memory='resident' only: each rank holds a shard of the "
                     "tokens and of the KV cache)")
    elif memory != "low":
        hints.append("load with memory='low' (--memory low) to stream the DiT blocks from CPU memory")
    hints.append("try a smaller resolution, fewer frames or fewer cond frames")
    return VCOutOfMemoryError(f"out of accelerator memory while {stage}: " + "; or ".join(hints))


def _is_oom(err: BaseException) -> bool:
    oom_types = tuple(
        t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
    )
    if oom_types and isinstance(err, oom_types):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def _check_flags(**flags) -> None:
    """Every flag a bool (``None`` allowed where the keyword ends in ``_opt``, e.g. ``offload_kv_cache_opt``):
    a truthy string such as "no" must not switch a path on."""
    for name, value in flags.items():
        optional = name.endswith("_opt")
        label = name[:-4] if optional else name
        if optional and value is None:
            continue
        if not isinstance(value, bool):
            raise TypeError(f"{label} must be a bool{' or None' if optional else ''}, got {type(value).__name__} {value!r}")


def _check_not_ignored(guidance: float, negative_prompt, use_kv_cache: bool, offload_kv_cache) -> None:
    """Arguments that would be silently ignored raise (as the refinement's options do without refine)."""
    if negative_prompt is not None and guidance <= 1.0:
        raise ValueError(
            "negative_prompt is used only with classifier-free guidance (guidance_scale > 1), got guidance_scale="
            f"{guidance:g}: drop the negative prompt or raise the guidance"
        )
    _check_offload_needs_cache(use_kv_cache, offload_kv_cache)


def _check_offload_needs_cache(use_kv_cache: bool, offload_kv_cache) -> None:
    """``offload_kv_cache=True`` with ``use_kv_cache=False`` would be silently ignored: ValueError."""
    if offload_kv_cache and not use_kv_cache:
        raise ValueError("offload_kv_cache=True needs use_kv_cache=True: without the KV cache there is nothing to offload")


def _refuse_non_finite_latents(latents: torch.Tensor, stage: str = "denoised") -> None:
    """Raise before decoding latents that hold NaN/Inf: decoded, NaN becomes black frames without a word.

    ``stage`` names the latents in the message (``"denoised"``, ``"refinement's denoised"``)."""
    if not bool(torch.isfinite(latents).all()):
        raise FloatingPointError(
            f"the {stage} latents hold NaN/Inf (a non-finite weight in the checkpoint or a LoRA, or an "
            "overflow in the model dtype); nothing was decoded"
        )


def _seed_fits(seed: int) -> bool:
    """An int seed torch's ``manual_seed`` takes: 64 bits, signed or unsigned ``[-2**63, 2**64)``."""
    return -(2 ** 63) <= int(seed) < 2 ** 64


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class _Timer:
    """Wall-clock sections, synchronising the accelerator so GPU work is attributed correctly."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class _NoRanks:
    """``_ranks_agree`` without context parallelism: nothing to exchange."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self, *values) -> None:
        pass


def _ranks_agree(pipe, what: str):
    """``with _ranks_agree(pipe, what) as ok: <argument checks, video reads, text encoding>; ok.record()``:
    with context parallelism, every rank learns whether one raised in the block (one tiny all-gather,
    ``ContextParallel.same_call``) and stops too. A rank that failed there (a bad argument, a video only
    rank 0 can read) left the others waiting in the next collective until the process group's timeout."""
    cp = getattr(pipe.dit, "context_parallel", None)
    return _NoRanks() if cp is None else cp.same_call(what, (), pipe.device)


# What the ranks of a context-parallel pipeline must agree on before rank 0's latents and text states
# are broadcast (the prompts and RNG states may differ: rank 0's win). The DiT's calls in the loop skip
# their own check (``ContextParallel.checked_region``), so the cond latent count they took is here too.
_PIPELINE_FIELDS = ("latent frames", "latent height", "latent width", "cond latent frames", "text batch (CFG)",
                    "text tokens", "denoising steps", "timesteps (checksum)", "timesteps (position checksum)",
                    "sigmas (checksum)", "sigmas (position checksum)", "guidance_scale", "use_kv_cache",
                    "model state (dtype, attention settings, LoRA, fp8 linears; LongCatDiT.rank_state)")


def _pipeline_signature(latents, cond_latents, embeds, timesteps, sigmas, guidance_scale, use_kv_cache,
                        dit=None) -> tuple:
    """The ``_PIPELINE_FIELDS`` of one denoising call (``cond_latents``: how many latent frames condition;
    ``dit``: the model whose ``rank_state`` is compared, 0 without one)."""
    from .parallel import checksum  # (only context-parallel calls get here)

    # on the CPU (the same device type on every rank); position-sensitive: a reordered schedule differs too
    ts = torch.as_tensor(timesteps, dtype=torch.float64).cpu().reshape(1, -1)
    sg = torch.as_tensor(sigmas, dtype=torch.float64).cpu().reshape(1, -1)
    return (*latents.shape[2:], int(cond_latents), embeds.shape[0], embeds.shape[2], ts.shape[1], *checksum(ts),
            *checksum(sg), float(guidance_scale), bool(use_kv_cache), 0 if dit is None else dit.rank_state())


def _rank0_latents(pipe, what: str, prepare, embeds, mask, timesteps, sigmas, guidance_scale,
                   use_kv_cache) -> tuple:
    """``prepare()`` -> ``(latents, extra, cond_latents)``; returns ``(latents, extra, embeds, mask)``.

    Without context parallelism that is ``prepare()``'s answer and the text states as given. With it,
    every rank prepares its own latents inside ``ContextParallel.same_call`` (``what`` names the call in
    its errors), the ranks check they agree on ``_PIPELINE_FIELDS``, and every rank gets rank 0's
    latents and text states (the ranks' prompts and RNG states may differ: rank 0's win). ``extra``
    stays each rank's own.
    """
    cp = getattr(pipe.dit, "context_parallel", None)
    if cp is None:
        latents, extra, _ = prepare()
        return latents, extra, embeds, mask
    with cp.same_call(what, _PIPELINE_FIELDS, pipe.device) as same:
        latents, extra, cond_latents = prepare()
        same.record(*_pipeline_signature(latents, cond_latents, embeds, timesteps, sigmas, guidance_scale,
                                         use_kv_cache, pipe.dit))
    latents, embeds, mask = cp.broadcast(latents, embeds, mask)
    return latents, extra, embeds, mask


def _checked_region(pipe):
    """Around a pipeline's cache build and denoising loop, after ``_rank0_latents`` checked the call:
    ``ContextParallel.checked_region()`` (the DiT's calls skip their own check), else a no-op."""
    cp = getattr(pipe.dit, "context_parallel", None)
    return contextlib.nullcontext() if cp is None else cp.checked_region()


def _denoise(pipe, latents, c: int, timesteps, sigmas, embeds, mask, *, use_kv_cache: bool, offload_kv_cache: bool,
             guidance_scale: float, do_cfg: bool, memory: str, desc: str, progress: bool, timer, timings: dict,
             t_start: float, names: Tuple[str, str] = ("building the KV cache", "denoising")) -> torch.Tensor:
    """The denoising loop of a continuation segment and of the refinement: fp32 ``latents`` whose first
    ``c`` latent frames condition, Euler steps over ``timesteps``/``sigmas`` (CFG-zero when ``do_cfg``:
    the text batch holds the negative and the positive prompt). With ``use_kv_cache`` (and ``c > 0``) the
    cond frames' K/V are built once and only the noisy frames run; else the whole clip runs with the cond
    frames at timestep 0 and only the noisy frames step. Fills ``timings`` (cache build from ``t_start``,
    steps); ``names`` word the out-of-memory errors of the cache build and the loop. Returns the fp32
    latents of the whole clip, cond frames first."""
    from tqdm.auto import tqdm

    from .schedule import cfg_zero, euler_step
    from .text import _eval_mode

    device, dtype = pipe.device, pipe.dtype
    cached = bool(use_kv_cache) and c > 0
    kv_cache = None
    cp_run = getattr(pipe.dit, "context_parallel", None) is not None
    # context parallel: the call was checked before (_rank0_latents) and every rank holds rank 0's inputs, so
    # the DiT's cache build and forwards skip their own check (one all-gather per call, not one per step).
    # Eval mode: a DiT left in training mode (after LoRA training with peft) kept lora_dropout on, and every
    # denoising step dropped adapter activations at random; the modes are restored after.
    with _checked_region(pipe), _eval_mode(pipe.dit):
        if cached:
            try:
                kv_cache = pipe.dit.build_kv_cache(latents[:, :, :c].to(dtype), offload=offload_kv_cache)
            except Exception as e:
                if _is_oom(e):
                    raise _oom_error(names[0], use_kv_cache=True, offload_kv_cache=offload_kv_cache, memory=memory,
                                     cause=e, context_parallel=cp_run) from e
                raise
            x = latents[:, :, c:].clone()
        else:
            x = latents
        timings["cache_build"] = timer.now() - t_start if cached else 0.0
        timings["kv_cache_bytes"] = int(getattr(kv_cache, "nbytes", 0) or 0)

        steps = []
        bar = tqdm(total=len(timesteps), desc=desc, disable=not progress, leave=False, unit="step")
        try:
            for i in range(len(timesteps)):
                ts = time.perf_counter()
                model_in = (torch.cat([x, x]) if do_cfg else x).to(dtype)
                tstep = torch.full(model_in.shape[:1] + model_in.shape[2:3], float(timesteps[i]), device=device,
                                   dtype=dtype)
                if not cached:
                    tstep[:, :c] = 0
                pred = pipe.dit(model_in, tstep, embeds, mask, num_cond_latents=c, kv_cache=kv_cache).float()
                if do_cfg:
                    uncond, condp = pred.chunk(2)
                    pred = cfg_zero(uncond, condp, guidance_scale)
                s, s_next = float(sigmas[i]), float(sigmas[i + 1])
                if cached:
                    x = euler_step(x, pred, s, s_next)
                else:
                    x[:, :, c:] = euler_step(x[:, :, c:], pred[:, :, c:], s, s_next)
                timer.sync()
                steps.append(time.perf_counter() - ts)
                bar.update(1)
        except Exception as e:
            if _is_oom(e):
                raise _oom_error(names[1], use_kv_cache=cached, offload_kv_cache=offload_kv_cache, memory=memory,
                                 cause=e, context_parallel=cp_run) from e
            raise
        finally:
            bar.close()
            _release_streamed_blocks(pipe)
    del kv_cache
    timings["denoise_steps"] = steps
    timings["denoise"] = float(sum(steps))
    timings["steps"] = len(steps)
    return torch.cat([latents[:, :, :c].float(), x], dim=2) if cached else x


def _release_streamed_blocks(pipe) -> None:
    """After a denoising loop, finished or raised: a block streamer's prefetched device copies (block 0,
    for the next step) need not sit through the decode, or stay on the device after an error."""
    streamer = getattr(pipe.dit, "_block_streamer", None)
    if streamer is not None:
        streamer.release()


# LongCat-Video's aspect-ratio buckets for a spatial factor of 16 (VAE 8 x patch 2):
# key = height / width, value = (height, width).
BUCKETS: Dict[str, Dict[str, Tuple[int, int]]] = {
    "480p": {
        "0.26": (320, 1216), "0.31": (352, 1120), "0.38": (384, 1024), "0.43": (416, 960),
        "0.52": (448, 864), "0.58": (480, 832), "0.67": (512, 768), "0.74": (544, 736),
        "0.86": (576, 672), "0.95": (608, 640), "1.05": (640, 608), "1.17": (672, 576),
        "1.29": (704, 544), "1.35": (736, 544), "1.50": (768, 512), "1.67": (800, 480),
        "1.73": (832, 480), "2.00": (896, 448), "2.31": (960, 416), "2.58": (992, 384),
        "2.75": (1056, 384), "3.09": (1088, 352), "3.70": (1184, 320), "3.80": (1216, 320),
        "3.90": (1248, 320), "4.00": (1280, 320),
    },
    "720p": {
        "0.25": (480, 1920), "0.29": (512, 1792), "0.32": (544, 1696), "0.36": (576, 1600),
        "0.40": (608, 1504), "0.49": (672, 1376), "0.54": (704, 1312), "0.59": (736, 1248),
        "0.69": (800, 1152), "0.74": (832, 1120), "0.82": (864, 1056), "0.88": (896, 1024),
        "0.94": (928, 992), "1.00": (960, 960), "1.07": (992, 928), "1.14": (1024, 896),
        "1.22": (1056, 864), "1.31": (1088, 832), "1.35": (1120, 832), "1.44": (1152, 800),
        "1.70": (1248, 736), "2.00": (1344, 672), "2.05": (1376, 672), "2.47": (1504, 608),
        "2.53": (1536, 608), "2.83": (1632, 576), "3.06": (1664, 544), "3.12": (1696, 544),
        "3.62": (1856, 512), "3.93": (1888, 480), "4.00": (1920, 480),
    },
}


def bucket_size(height: int, width: int, resolution: str) -> Tuple[int, int]:
    """The (height, width) bucket of LongCat's table closest to ``height / width``.

    Ties go to the first bucket of the table (upstream sorts the keys stably by distance).
    """
    if resolution not in BUCKETS:
        raise ValueError(f"resolution must be one of {sorted(BUCKETS)} or (height, width), got {resolution!r}")
    ratio = height / width
    table = BUCKETS[resolution]
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]
