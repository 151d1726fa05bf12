"""LongCat-Video video continuation (VC): a video + a prompt -> its continuation (SPEC 7).

    import torch
    from longcat_vc import VideoContinuationPipeline
    from longcat_vc.video_io import write_video

    pipe = VideoContinuationPipeline.from_pretrained("LongCat-Video", mode="distill")
    out = pipe("input.mp4", "A person rides a motorcycle along a coastal road ...",
               generator=torch.Generator("cuda").manual_seed(42))
    write_video("output.mp4", out.frames, out.fps)
    print(out.timings)

What one call does, in order (the order fixes the random stream):

1. Read the video; a file's frames are subsampled to about 15 fps (stride round(fps / 15)).
2. Pick the aspect-ratio bucket of the first frame (LongCat's 480p/720p tables); encode the
   prompt (and the negative prompt when guidance > 1) with UMT5.
3. Draw the noise latents ``[1, 16, (F-1)//4 + 1, h, w]`` from ``generator``; resize the last
   ``num_cond_frames`` frames to the bucket, VAE-encode them and sample the posterior with the
   same generator; normalise and write them into the first ``c = 1 + (num_cond_frames-1)//4``
   latent frames.
4. With the KV cache (default) run the DiT once over the cond latents and keep their keys and
   values; then denoise only the noisy latents (flow-matching Euler, CFG-zero when guidance > 1).
   Without the cache the DiT sees all latents every step, cond latents at timestep 0.
5. Decode, keep the generated frames, resize them back to the input size (bicubic) and return the
   input frames followed by the new ones.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import numbers
import os
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from longcat_kernels._validate import check_bool, user_stacklevel

from .schedule import check_distill_steps, check_scheduler_config, read_scheduler_config, vc_timesteps
from .text import DEFAULT_NEGATIVE_PROMPT, MAX_SEQUENCE_LENGTH, encode_prompts
from .loading import CheckpointError, _list
from .lora import compiled_original, fused_loras, model_lock
from .video_io import VideoFrames, as_video_frames, read_video, subsample_to_fps
from .stages import (  # noqa: F401 (re-exported)
    VCOutOfMemoryError, VideoContinuationOutput, _check_flags, _check_int, _check_not_ignored, BUCKETS, _denoise,
    _rank0_latents, _ranks_agree, _refuse_non_finite_latents, _resize_frames, _seed_fits, _Timer, bucket_size,
)

__all__ = [
    "VideoContinuationPipeline",
    "VideoContinuationOutput",
    "CheckpointError",
    "VCOutOfMemoryError",
    "BUCKETS",
    "bucket_size",
    "check_checkpoint",
    "MODES",
    "TARGET_FPS",
]

MODES = ("basic", "distill")
TARGET_FPS = 15.0
CFG_STEP_LORA = "cfg_step_lora"
CFG_STEP_LORA_FILE = os.path.join("lora", "cfg_step_lora.safetensors")
REFINEMENT_LORA_FILE = os.path.join("lora", "refinement_lora.safetensors")

# Per mode: default steps, guidance, schedule.
MODE_DEFAULTS = {
    "basic": {"steps": 50, "guidance": 4.0, "schedule": "enhance_hf"},
    "distill": {"steps": 16, "guidance": 1.0, "schedule": "distill"},
}

# --------------------------------------------------------------------------------------------
# checkpoint layout


# One lock per DiT: a call flips state of the DiT for its length (``use_bsa``, refine's LoRA/BSA swap,
# ``set_mode``, the eval-mode switch), so a second call on the same DiT from another thread (the same
# pipeline, or another one built on that DiT) ran with the first one's settings and returned other
# latents without a word. Calls on one DiT run one after the other; an RLock: ``extend`` refines inside.
# The DiT's LoRA lock (``lora.model_lock``): a ``dit.fuse_lora()`` from another thread waits for the call.
_dit_lock = model_lock


def _one_call_per_dit(fn, take_dit: bool = True):
    """Runs the pipeline method holding its DiT's lock (see ``_dit_lock``), with the DiT in this pipeline's
    LoRA state (``take_dit``: ``VideoContinuationPipeline._take_dit``)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with _dit_lock(self.dit):
            if take_dit:
                self._take_dit()
            return fn(self, *args, **kwargs)
    return wrapper


# Which pipeline's LoRA state a DiT holds (several pipelines may be built on one DiT, in different modes):
# a pipeline's calls set its own state again where another pipeline changed it since (``_take_dit``), as
# the basic-mode calls otherwise ran with the cfg-step LoRA a distill pipeline on the same DiT had enabled.
_DIT_LORA_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _lora_state(dit) -> Optional[Tuple[Tuple[str, ...], bool]]:
    """(active LoRA names, whether they are fused) of ``dit``; None for a DiT without the LoRA API."""
    active = getattr(dit, "active_loras", None)
    if active is None or not isinstance(dit, torch.nn.Module):
        return None
    return tuple(active), bool(fused_loras(dit))


def _apply_lora_state(dit, state: Tuple[Tuple[str, ...], bool]) -> None:
    """Puts ``dit`` back in a ``_lora_state``: exactly those LoRAs active (``enable_loras`` unfuses first), fused
    again if they were."""
    names, fused = state
    if names:
        dit.enable_loras(list(names))
        if fused:
            dit.fuse_lora()
    else:
        dit.disable_loras()


def _lora_owner(dit) -> Optional["VideoContinuationPipeline"]:
    """The pipeline (alive) whose LoRA state ``dit`` holds (``_DIT_LORA_OWNERS``), or None."""
    try:
        ref = _DIT_LORA_OWNERS.get(compiled_original(dit))  # (torch.compile(dit) is that DiT)
    except TypeError:  # a DiT that cannot be weakly referenced
        return None
    return ref() if ref is not None else None


def _describe_lora_state(state: Tuple[Tuple[str, ...], bool]) -> str:
    names, fused = state
    if not names:
        return "no LoRA"
    return f"LoRA {list(names)} " + ("fused into the weights" if fused else "enabled")


def _any_exists(folder: str, names: Sequence[str]) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in names)


def _has_safetensors(folder: str) -> bool:
    return os.path.isdir(folder) and any(
        n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in os.listdir(folder)
    )


def check_checkpoint(checkpoint_dir: str, mode: str = "basic") -> None:
    """Check that ``checkpoint_dir`` has every file the pipeline loads (upstream layout, SPEC 9).

    Raises:
        CheckpointError: naming every missing file (relative to ``checkpoint_dir``).
    """
    if os.path.isfile(checkpoint_dir):  # (was "checkpoint folder not found" for a file that exists)
        raise CheckpointError(f"checkpoint folder: {checkpoint_dir} is a file; pass the checkpoint root folder "
                              "(holding dit/, vae/, text_encoder/, tokenizer/, scheduler/)")
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint folder not found: {checkpoint_dir}")
    missing: List[str] = []

    def need(sub: str, alternatives: Sequence[str], what: str) -> None:
        if not _any_exists(os.path.join(checkpoint_dir, sub), alternatives):
            shown = " or ".join(os.path.join(sub, a) for a in alternatives)
            missing.append(f"{shown} ({what})")

    need("dit", ["config.json"], "DiT config")
    if not _has_safetensors(os.path.join(checkpoint_dir, "dit")):
        missing.append("dit/*.safetensors (DiT weights)")
    need("vae", ["config.json"], "VAE config")
    need("vae", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"], "VAE weights")
    need("text_encoder", ["config.json"], "text encoder config")
    need(
        "text_encoder",
        ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"],
        "text encoder weights",
    )
    need("tokenizer", ["tokenizer.json", "spiece.model"], "tokenizer")
    need("scheduler", ["scheduler_config.json"], "scheduler config")
    if mode == "distill":
        need("lora", ["cfg_step_lora.safetensors"], "cfg-step LoRA of distill mode")
    if missing:
        raise CheckpointError(
            f"checkpoint folder {checkpoint_dir} is missing: " + "; ".join(missing)
        )


# --------------------------------------------------------------------------------------------
# output


# --------------------------------------------------------------------------------------------
# helpers


def _vae_latent_stats(vcfg, name: str, z_dim: int) -> torch.Tensor:
    """The VAE config's ``latents_mean`` / ``latents_std`` as ``[1, z_dim, 1, 1, 1]`` fp32: ``z_dim``
    finite numbers, the std's positive (another length failed in a bare ``view``; a zero std made every
    latent Inf, reported at the end as a non-finite weight)."""
    values = getattr(vcfg, name, None)
    try:
        t = torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        t = None
    positive = name == "latents_std"
    if (t is None or tuple(t.shape) != (z_dim,) or not bool(torch.isfinite(t).all())
            or (positive and bool((t <= 0).any()))):
        shown = repr(values)
        raise ValueError(f"VAE config {name}: expected {z_dim} (z_dim) finite{' positive' if positive else ''} "
                         f"numbers, got {shown if len(shown) <= 120 else shown[:120] + '...'}")
    return t.view(1, z_dim, 1, 1, 1)


def _vae_scale_factors(vcfg) -> Tuple[int, int]:
    """The VAE config's ``(scale_factor_temporal, scale_factor_spatial)`` (4, 8 when absent), checked
    against its architecture where the config has one (AutoencoderKLWan: ``2**sum(temperal_downsample)``
    and ``2**len(temperal_downsample) * patch_size``): the latents are sized with them, so a config
    saying 2 for a 4x VAE planned twice the latent frames, and a 0 silently became the default."""
    down = getattr(vcfg, "temperal_downsample", None)
    arch = {}
    if isinstance(down, (list, tuple)):
        arch["scale_factor_temporal"] = 2 ** sum(bool(d) for d in down)
        arch["scale_factor_spatial"] = 2 ** len(down) * int(getattr(vcfg, "patch_size", None) or 1)
    out = []
    for name, default in (("scale_factor_temporal", 4), ("scale_factor_spatial", 8)):
        value = getattr(vcfg, name, None)
        if value is None:
            value = arch.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value != arch.get(name, value):
            raise ValueError(f"VAE config {name}: expected a positive int"
                             + (f" matching the VAE's architecture ({arch[name]})" if name in arch else "")
                             + f", got {value!r}")
        out.append(value)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# pipeline


def _fit_shape(cfg, checkpoint_dir: str, mode: str, dtype: torch.dtype, fp8: bool) -> Dict[str, Any]:
    """``from_pretrained``'s keyword arguments of ``check_memory_fits``: the weights' dtype, fp8, and in
    distill mode the cfg-step LoRA it loads (sized from its file's header; it stays resident, also fused)."""
    shape: Dict[str, Any] = dict(dtype_bytes=torch.empty(0, dtype=dtype).element_size(), fp8=fp8)
    if mode == "distill":
        from .refine import _lora_rank_equivalent  # noqa: PLC0415

        shape["lora_rank"] = _lora_rank_equivalent(os.path.join(checkpoint_dir, CFG_STEP_LORA_FILE), cfg)
    return shape


class VideoContinuationPipeline:
    """LongCat-Video video continuation.

    Args:
        dit: ``longcat_vc.LongCatDiT`` (or a module with the same interface: ``forward(x, t,
            text, mask, num_cond_latents=, kv_cache=)``, ``build_kv_cache``, ``config``).
        vae: ``diffusers.AutoencoderKLWan``.
        text_encoder: ``transformers.UMT5EncoderModel``.
        tokenizer: its tokenizer.
        scheduler_config (dict | str): the scheduler config dict, or the path of
            ``scheduler_config.json`` (or its folder); ``shift`` and ``num_train_timesteps`` (1000)
            are read from it (``schedule.check_scheduler_config``).
        mode (str): ``"basic"`` or ``"distill"``; sets the defaults of steps/guidance/schedule.
            Distill mode expects the cfg-step LoRA loaded under the name ``"cfg_step_lora"``
            (``from_pretrained`` and ``set_mode`` do that); loaded but not enabled, it is enabled
            here as ``set_mode("distill")`` does (the only active LoRA). A DiT without it runs as it is
            (e.g. weights with the LoRA merged in).
        max_sequence_length (int): text tokens (512).
        process_group: a ``torch.distributed`` process group: run the DiT context-parallel across
            its ranks (``dit.enable_context_parallel``; every rank runs the same calls, rank 0's
            latents are used). None: single process.
        cfg_parallel (bool): with ``process_group``: the CFG branches on two halves of the ranks.
    """

    def __init__(
        self,
        dit,
        vae,
        text_encoder,
        tokenizer,
        scheduler_config,
        *,
        mode: str = "basic",
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        process_group=None,
        cfg_parallel: bool = False,
    ):
        if isinstance(scheduler_config, (str, os.PathLike)):
            scheduler_config = read_scheduler_config(os.fspath(scheduler_config))
        if not isinstance(scheduler_config, dict):
            raise TypeError(f"scheduler_config must be a dict or a path, got {type(scheduler_config).__name__}")
        check_scheduler_config(scheduler_config, "scheduler_config")  # a dict passed in: not checked yet
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.dit = dit
        # (the DiT, the LoRA state of it this pipeline's calls run with), recorded when another pipeline on
        # the same DiT takes it over (_take_dit); None: the DiT's state as it is
        self._saved_lora_state: Optional[tuple] = None
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.shift = float(self.scheduler_config.get("shift", 1.0))
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        # int() truncated 1.5 to a 1-token prompt without a word
        self.max_sequence_length = _check_int("max_sequence_length", max_sequence_length, 1)
        self._mode = mode
        # lora/refinement_lora.safetensors of the checkpoint (set by from_pretrained); refine()
        # loads it on first use, and again once it names another file than the DiT's came from or its file
        # changed (refine._refinement_lora_to_load)
        self.refinement_lora_path: Optional[str] = None

        vcfg = vae.config
        self.vae_scale_temporal, self.vae_scale_spatial = _vae_scale_factors(vcfg)
        patch = tuple(getattr(dit.config, "patch_size", (1, 2, 2)))
        self.patch_size = patch
        self.spatial_multiple = self.vae_scale_spatial * max(patch[1], patch[2])
        z_dim = int(vcfg.z_dim)
        in_ch = int(getattr(dit.config, "in_channels", z_dim))
        if in_ch != z_dim:
            raise ValueError(f"DiT in_channels ({in_ch}) must equal the VAE z_dim ({z_dim})")
        out_ch = int(getattr(dit.config, "out_channels", z_dim))
        if out_ch != z_dim:  # else the first denoising step fails on a shape mismatch
            raise ValueError(f"DiT out_channels ({out_ch}) must equal the VAE z_dim ({z_dim})")
        d_model = getattr(getattr(text_encoder, "config", None), "d_model", None)
        cap = getattr(dit.config, "caption_channels", None)
        if d_model is not None and cap is not None and int(d_model) != int(cap):
            raise ValueError(
                f"text encoder width d_model ({d_model}) must equal the DiT caption_channels ({cap})"
            )
        self._latents_mean = _vae_latent_stats(vcfg, "latents_mean", z_dim)
        self._latents_std = _vae_latent_stats(vcfg, "latents_std", z_dim)
        from .memory import memory_plan

        # apply_memory_mode replaces it. A DiT that already streams its blocks (another pipeline's, built with
        # memory="balanced"/"low"): "resident" was recorded, so refine's fit check counted the whole DiT on the
        # device and apply_memory_mode(pipe, "resident") moved the streamed blocks instead of refusing
        streams = getattr(dit, "_block_streamer", None) is not None
        self._memory = memory_plan("balanced" if streams else "resident")
        if process_group is not None:
            dit.enable_context_parallel(process_group, cfg_parallel=cfg_parallel)
        elif cfg_parallel:
            raise ValueError("cfg_parallel=True needs a process_group")
        with _dit_lock(dit):
            state = _lora_state(dit)
            shared = self._dit_owner() is not None  # another pipeline (alive) is built on this DiT
            if shared and mode == "basic" and state is not None and CFG_STEP_LORA in state[0] and state[1]:
                raise ValueError(
                    f"mode='basic': another pipeline on this DiT fused its cfg-step LoRA {CFG_STEP_LORA!r} into the "
                    "weights (distill, fuse_lora=True); a basic-mode pipeline runs without it, and unfusing it for "
                    "this pipeline's calls would not be exact: build this pipeline on its own DiT, or the distill "
                    "one without fuse_lora")
            self._take_dit(restore=False)
            loaded, active = getattr(dit, "lora_names", None), getattr(dit, "active_loras", None)
            if mode == "distill" and loaded is not None and active is not None and CFG_STEP_LORA in loaded \
                    and CFG_STEP_LORA not in active:
                # loaded as documented but not enabled: the 16-step distill schedule ran on the base model
                self.set_mode("distill")
            elif shared and mode == "basic" and active is not None and CFG_STEP_LORA in active:
                # the distill pipeline's LoRA on the shared DiT: basic mode runs without it (that pipeline's
                # next call enables it again)
                dit.enable_loras([n for n in active if n != CFG_STEP_LORA])

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: Union[str, os.PathLike],
        dtype: torch.dtype = torch.bfloat16,
        device: Optional[Union[str, torch.device]] = None,
        mode: str = "basic",
        process_group=None,
        cfg_parallel: bool = False,
        *,
        fuse_lora: bool = False,
        attn_backend: Optional[str] = None,
        memory: str = "resident",
        fp8: bool = False,
        vae_tiling: bool = False,
        progress: bool = True,
    ) -> "VideoContinuationPipeline":
        """Load a LongCat-Video checkpoint folder (upstream layout, SPEC 9).

        ``dit/`` (LongCatDiT), ``vae/`` (AutoencoderKLWan), ``text_encoder/`` (UMT5EncoderModel),
        ``tokenizer/``, ``scheduler/scheduler_config.json`` and, for ``mode="distill"``,
        ``lora/cfg_step_lora.safetensors`` (loaded and enabled).

        Args:
            checkpoint_dir: the folder.
            dtype: weights dtype of every component (bf16 as upstream; fp32 for tests), except that
                with fp16 the UMT5 text encoder loads in bf16 (T5 activations overflow fp16, which
                transformers clamps without a word; upstream runs it in bf16); its embeddings are
                cast to fp16 for the DiT.
            device: where to run (default: CUDA if available, else CPU).
            mode: ``"basic"`` or ``"distill"``.
            process_group, cfg_parallel: context parallelism (see the class); each rank passes
                its own device (e.g. ``cuda:LOCAL_RANK``).
            fuse_lora: distill only: merge the LoRA into the DiT weights (faster steps; in bf16 the
                merged weights round differently from upstream's separate LoRA matmuls).
            attn_backend: the DiT's attention backend ("auto", "torch", "triton", "cuda"); None
                keeps the checkpoint config's default.
            memory: ``"resident"`` (all on the device), ``"balanced"`` (DiT blocks streamed from
                pinned CPU memory one block ahead, text encoder streamed while encoding) or
                ``"low"`` (balanced + KV cache offloaded); all give the same results
                (``longcat_vc.memory``). Checked against the usable device memory (free, plus the
                allocator's free blocks) before loading.
            fp8: quantise the DiT blocks' large linears to fp8 (e4m3, per-channel scales;
                ``longcat_vc.fp8``; needs compute capability >= 8.9; not exact).
            vae_tiling: decode (and encode) with the VAE's spatial tiling (less memory at 720p;
                the decoded pixels differ slightly from untiled ones).
            progress (bool): a progress bar while the DiT weights load (minutes for the released
                model), like the calls' denoising bars; False also silences the loading bars of
                transformers and diffusers (text encoder, VAE).

        Raises:
            CheckpointError: a component file is missing (named) or fails to load, or a component
                (DiT, VAE, text encoder) holds NaN/Inf weights (named).
            MemoryModeError: ``memory`` cannot fit the device (names the GiB needed and a mode
                that fits), raised before any weight is loaded.
            ValueError: with ``process_group``: the DiT config's heads do not divide by the
                sequence-parallel size, or cfg_parallel on an odd world
                (``parallel.check_context_parallel``), raised before any weight is loaded.
        """
        if not isinstance(checkpoint_dir, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir: expected a str or os.PathLike folder, got {type(checkpoint_dir).__name__}")
        checkpoint_dir = os.fspath(checkpoint_dir)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        from .config import ATTN_BACKENDS
        from .loading import check_device, check_dtype

        check_dtype(dtype)
        # every argument is checked before anything loads: a truthy stand-in ("no", 1) would silently
        # turn a feature on, and an error raised while loading would come back as a CheckpointError
        for name, flag in (("cfg_parallel", cfg_parallel), ("fuse_lora", fuse_lora), ("fp8", fp8),
                           ("vae_tiling", vae_tiling), ("progress", progress)):
            check_bool(flag, name)
        if fuse_lora and mode != "distill":
            raise ValueError(f"fuse_lora=True applies to mode='distill' (the cfg-step LoRA); mode={mode!r} runs no LoRA")
        if attn_backend is not None and (not isinstance(attn_backend, str) or attn_backend not in ATTN_BACKENDS):
            raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS} or None, got {attn_backend!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = check_device(device)
        if fp8:
            from .fp8 import check_fp8_device

            check_fp8_device(device)
        from .memory import apply_memory_mode, check_memory_fits, memory_plan, refuse_streaming_with_context_parallel

        plan = memory_plan(memory)
        if process_group is not None:
            refuse_streaming_with_context_parallel(plan.name, "a process_group")
        if cfg_parallel and process_group is None:
            raise ValueError("cfg_parallel: expected False without a process_group, got True (cfg_parallel=True needs "
                             "a process_group)")
        check_checkpoint(checkpoint_dir, mode)

        def sub(name: str) -> str:
            return os.path.join(checkpoint_dir, name)

        def load(what: str, fn):
            try:
                return fn()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"failed to load the {what} from {checkpoint_dir}: {e}") from e

        if device.type == "cuda" or process_group is not None:
            from .config import DiTConfig

            # dit/'s, the folder loaded below (resolve_dit_dir(root) refused a root holding a FastVideo
            # transformer/ beside it, on CUDA only)
            cfg = load("DiT config", lambda: DiTConfig.from_json(sub("dit")))
            if process_group is not None:
                # what the DiT's enable_context_parallel would refuse (heads not divisible by the ranks,
                # cfg_parallel on an odd world): now, not after every rank has loaded the whole DiT
                from .parallel import check_context_parallel

                layout = check_context_parallel(process_group, num_heads=cfg.num_heads, cfg_parallel=cfg_parallel)
            if device.type == "cuda":
                shape = _fit_shape(cfg, checkpoint_dir, mode, dtype, fp8)
                if process_group is not None:
                    # each rank holds its token shard's activations and its heads of the KV cache: the
                    # single-GPU estimate refused runs that fit, and named a streaming mode (refused with CP)
                    shape.update(sp_size=layout.sp_size, cfg_parallel=layout.cfg_size == 2)
                check_memory_fits(cfg, plan.name, device, context_parallel=process_group is not None, **shape)
        # Streamed components load into CPU memory first and are placed by apply_memory_mode.
        load_device = device if plan.name == "resident" else torch.device("cpu")

        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        from .dit import LongCatDiT

        scheduler_config = load("scheduler config", lambda: read_scheduler_config(sub("scheduler")))
        # progress=False: transformers' / diffusers' own loading bars too (the text encoder's drew one)
        with _library_progress_bars(progress):
            tokenizer = load("tokenizer", lambda: AutoTokenizer.from_pretrained(sub("tokenizer")))
            text_encoder = load(
                "text encoder", lambda: _load_umt5(UMT5EncoderModel, sub("text_encoder"), _text_encoder_dtype(dtype))
                .to(load_device).eval()
            )
            vae = load("VAE", lambda: _load_vae(AutoencoderKLWan, sub("vae"), dtype).to(device).eval())
        dit_kw = {} if attn_backend is None else {"attn_backend": attn_backend}
        dit = load("DiT", lambda: LongCatDiT.from_pretrained(sub("dit"), dtype=dtype, device=load_device,
                                                             progress=progress, **dit_kw))
        dit.eval()
        pipe = cls(dit, vae, text_encoder, tokenizer, scheduler_config, process_group=process_group,
                   cfg_parallel=cfg_parallel)
        if mode == "distill":
            pipe.set_mode("distill", lora_path=sub(CFG_STEP_LORA_FILE), fuse_lora=fuse_lora)
        if fp8:
            from .fp8 import quantize_dit_fp8

            quantize_dit_fp8(dit, device=device)  # after the LoRA fuse: the fused weights get quantised
        apply_memory_mode(pipe, plan.name, device)
        if vae_tiling:
            vae.enable_tiling()
        pipe.refinement_lora_path = sub(REFINEMENT_LORA_FILE)
        return pipe

    def _dit_owner(self) -> Optional["VideoContinuationPipeline"]:
        """The other pipeline (alive) whose LoRA state the DiT holds, or None."""
        owner = _lora_owner(self.dit)
        return None if owner is self else owner

    def _take_dit(self, restore: bool = True) -> None:
        """Makes the DiT hold this pipeline's LoRA state (called under the DiT's lock, at the start of each
        call and by ``set_mode``): where another pipeline on the same DiT set its own since this pipeline's
        last call, that state is recorded for the other pipeline and this one's enabled again (``restore``).
        A switch that would fuse or unfuse a LoRA (not exact in the weight dtype, and a full weight pass) is
        refused with a RuntimeError."""
        owner = _lora_owner(self.dit)
        if owner is self:  # (the usual case: one pipeline per DiT, nothing to compare)
            return
        state = _lora_state(self.dit)
        if state is None:  # (a DiT without the LoRA API: not tracked)
            return
        dit = compiled_original(self.dit)  # (a pipeline on torch.compile(dit) and one on dit share that DiT)
        if owner is not None:
            owner._saved_lora_state = (weakref.ref(dit), state)
        saved = self._saved_lora_state
        # (one saved for another DiT, were pipe.dit replaced since, is not this one's)
        mine = saved[1] if saved is not None and saved[0]() is dit else None
        if restore and mine is not None and mine != state:
            if mine[1] or state[1]:
                raise RuntimeError(
                    f"this {self._mode}-mode pipeline runs with {_describe_lora_state(mine)} on its DiT, but another "
                    f"pipeline on the same DiT set {_describe_lora_state(state)}; a LoRA fused into the weights is "
                    "not switched per call (un/fusing is not exact): build the pipelines on separate DiTs, or call "
                    "set_mode() on this pipeline to take the DiT over")
            _apply_lora_state(self.dit, mine)
        _DIT_LORA_OWNERS[dit] = weakref.ref(self)

    @property
    def memory(self) -> str:
        """The memory mode (``longcat_vc.memory``): "resident", "balanced" or "low"."""
        return self._memory.name

    @property
    def _memory(self):
        """The memory plan recorded by ``apply_memory_mode``; "balanced" where it says "resident" but the DiT streams
        its blocks: another pipeline on this DiT switched it since this one recorded its mode (``memory`` kept
        saying "resident", and refine's fit check counted the whole DiT on the device), as at construction."""
        plan = self._memory_plan
        if not plan.stream_dit_blocks and getattr(self.dit, "_block_streamer", None) is not None:
            from .memory import memory_plan

            return memory_plan("balanced")
        return plan

    @_memory.setter
    def _memory(self, plan) -> None:
        self._memory_plan = plan

    @property
    def mode(self) -> str:
        return self._mode

    @functools.partial(_one_call_per_dit, take_dit=False)  # takes the DiT over as it is (the mode sets its LoRAs)
    def set_mode(self, mode: str, lora_path: Optional[str] = None, *, fuse_lora: bool = False) -> None:
        """Switch between ``"basic"`` (LoRAs disabled) and ``"distill"`` (cfg-step LoRA enabled).

        For distill, ``lora_path`` loads the LoRA file first (name ``"cfg_step_lora"``); without it
        the LoRA must already be loaded under that name. ``fuse_lora`` merges it into the weights
        (``set_mode("basic")`` unmerges). A switch that fails (an exception or an interrupt) leaves the mode
        and the previous LoRA/fuse state as they were (a LoRA file given by ``lora_path`` stays loaded).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_bool(fuse_lora, "fuse_lora")  # a truthy "no" would merge the LoRA into the weights
        if fuse_lora and mode != "distill":
            raise ValueError(f"fuse_lora=True applies to mode='distill' (the cfg-step LoRA); mode={mode!r} runs no LoRA")
        if lora_path is not None and not isinstance(lora_path, (str, os.PathLike)):
            raise TypeError(f"lora_path: expected a str or os.PathLike file or None, got {type(lora_path).__name__}")
        if fuse_lora:
            from .fp8 import check_fuse_before_quantising

            # refused by the fp8 layers only after the LoRA was enabled, with the mode still recorded as before
            check_fuse_before_quantising(self.dit, "set_mode: fuse_lora=True")
        self._take_dit(restore=False)  # the DiT's LoRA state is this pipeline's from now on
        if mode == "distill":
            # before a reload (which unfuses an active LoRA of that name): a fuse that fails (fuse_lora's
            # overflow refusal, an interrupt) left the cfg-step LoRA enabled with the mode still recorded
            # as before, and later basic calls ran the distill LoRA; the previous LoRA state is put back
            prev = _lora_state(self.dit)
            if lora_path is not None:
                if not os.path.isfile(lora_path):
                    raise CheckpointError(f"cfg-step LoRA file not found: {lora_path}")
                try:
                    self.dit.load_lora(lora_path, CFG_STEP_LORA)
                except Exception as e:
                    raise CheckpointError(f"failed to load the cfg-step LoRA {lora_path}: {e}") from e
            try:
                self.dit.disable_loras()  # unfuses a previously fused LoRA before re-enabling
                try:
                    self.dit.enable_loras([CFG_STEP_LORA])
                except (KeyError, ValueError) as e:
                    raise ValueError(
                        f"distill mode needs the cfg-step LoRA loaded as {CFG_STEP_LORA!r}: pass "
                        f"lora_path=<checkpoint>/{CFG_STEP_LORA_FILE} ({e})"
                    ) from e
                if fuse_lora:
                    self.dit.fuse_lora()
            except BaseException:
                if prev is not None:
                    _apply_lora_state(self.dit, prev)
                raise
        else:
            self.dit.disable_loras()
        self._mode = mode

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype

    # ---------------------------------------------------------------- pieces

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - latents_mean) / latents_std`` per channel, fp32."""
        mean = self._latents_mean.to(z.device)
        std = self._latents_std.to(z.device)
        return (z.float() - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize_latents``, fp32."""
        mean = self._latents_mean.to(z.device)
        std = self._latents_std.to(z.device)
        return z.float() * std + mean

    def encode_text(self, prompts: Union[str, Sequence[str]],
                    names: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """UMT5 embeddings ``[B, 1, L, C]`` (DiT dtype) and mask ``[B, L]`` on the DiT's device; ``names``:
        what a truncation warning calls each prompt (``encode_prompts``)."""
        return encode_prompts(
            self.tokenizer,
            self.text_encoder,
            prompts,
            max_length=self.max_sequence_length,
            device=self.device,
            dtype=self.dtype,
            names=names,
        )

    def _target_size(self, frames: np.ndarray, resolution) -> Tuple[int, int]:
        h, w = frames.shape[1:3]
        if isinstance(resolution, str):
            return bucket_size(h, w, resolution)
        if (
            isinstance(resolution, (tuple, list))
            and len(resolution) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in resolution)
        ):
            th, tw = int(resolution[0]), int(resolution[1])
            m = self.spatial_multiple
            if th <= 0 or tw <= 0 or th % m or tw % m:
                raise ValueError(
                    f"resolution (height, width) must be positive multiples of {m}, got ({th}, {tw})"
                )
            return th, tw
        raise ValueError(
            f"resolution must be one of {sorted(BUCKETS)} or a (height, width) tuple, got {resolution!r}"
        )

    def _frames_to_pixels(self, frames: np.ndarray, size_hw: Tuple[int, int]) -> torch.Tensor:
        """``[n, H, W, 3]`` uint8 -> ``[1, 3, n, h, w]`` in [-1, 1] (Lanczos resize as diffusers)."""
        from PIL import Image

        resized = _resize_frames(frames, size_hw, Image.LANCZOS)
        # np.require: a read-only array (a user's, or frames at the model size) is copied, not handed to torch as is
        x = torch.from_numpy(np.require(resized, requirements=["C", "W"])).float().div_(255.0).mul_(2.0).sub_(1.0)
        return x.permute(3, 0, 1, 2).unsqueeze(0)

    @torch.no_grad()
    def prepare_latents(
        self,
        cond_frames: np.ndarray,
        size_hw: Tuple[int, int],
        num_frames: int,
        num_cond_frames: int,
        generator: Optional[torch.Generator],
    ) -> torch.Tensor:
        """Noise for all latent frames, then the encoded cond frames in the first c (SPEC 7).

        Returns ``[1, 16, (num_frames-1)//4 + 1, h/8, w/8]`` fp32 (values rounded to the DiT dtype,
        as upstream draws them in it).
        """
        device, dtype = self.device, self.dtype
        h, w = size_hw
        t_lat = (num_frames - 1) // self.vae_scale_temporal + 1
        c = 1 + (num_cond_frames - 1) // self.vae_scale_temporal
        shape = (1, int(self.vae.config.z_dim), t_lat, h // self.vae_scale_spatial, w // self.vae_scale_spatial)
        gen_device = generator.device if generator is not None else device
        latents = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)

        pixels = self._frames_to_pixels(cond_frames[-num_cond_frames:], size_hw)
        vae_param = next(self.vae.parameters())
        pixels = pixels.to(device=vae_param.device, dtype=vae_param.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.sample(generator=generator)
        if z.shape[2] != c:
            raise RuntimeError(f"VAE encoded {num_cond_frames} frames to {z.shape[2]} latent frames, expected {c}")
        cond = self.normalize_latents(z).to(device=device, dtype=dtype)
        latents[:, :, :c] = cond
        return latents.float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """``[1, 16, T, h, w]`` normalised latents -> ``[F, h*8, w*8, 3]`` uint8 (truncating as upstream).

        Raises:
            ValueError: ``latents`` is not one clip ``[1, z_dim, T, h, w]`` (a batch of clips came back as its
                first clip's frames, the others dropped without a word)."""
        z_dim = int(self.vae.config.z_dim)
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[0] != 1 \
                or latents.shape[1] != z_dim:
            got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents: expected one clip [1, {z_dim}, T, h, w] (decode a batch one sample at a time: "
                             f"latents[i:i+1]), got {got}")
        vae_param = next(self.vae.parameters())
        z = self.denormalize_latents(latents).to(device=vae_param.device, dtype=vae_param.dtype)
        video = self.vae.decode(z, return_dict=False)[0]  # [1, 3, F, H, W]
        if not bool(torch.isfinite(video).all()):
            # finite latents, NaN/Inf pixels (an fp16 VAE overflowing): cast to uint8 they became black frames
            raise FloatingPointError(
                f"the VAE decoded finite latents to NaN/Inf pixels (an overflow in the VAE's {vae_param.dtype}); "
                "load the pipeline in a wider dtype (bfloat16 or float32)")
        video = (video[0].float() / 2 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)
        return video.permute(1, 2, 3, 0).contiguous().cpu().numpy()

    @contextlib.contextmanager
    def _bsa(self, use_bsa: Optional[bool]):
        """``config.enable_bsa`` set to ``use_bsa`` for the call and restored after; None leaves it (a
        False default left a config's ``enable_bsa: true`` on, so ``use_bsa=False`` was ignored)."""
        cfg = self.dit.config
        if use_bsa is None:
            yield
            return
        if not hasattr(cfg, "enable_bsa"):
            raise ValueError(f"use_bsa={use_bsa}: this DiT has no block-sparse attention switch (config.enable_bsa)")
        old = cfg.enable_bsa
        cfg.enable_bsa = use_bsa
        try:
            yield
        finally:
            cfg.enable_bsa = old

    # ---------------------------------------------------------------- validation

    def _resolve_args(
        self,
        num_frames,
        num_cond_frames,
        num_inference_steps,
        guidance_scale,
        output_type,
    ) -> Tuple[int, int, int, float, str]:
        defaults = MODE_DEFAULTS[self._mode]
        num_frames = _check_int("num_frames", num_frames, 1)
        num_cond_frames = _check_int("num_cond_frames", num_cond_frames, 1)
        st = self.vae_scale_temporal
        if (num_cond_frames - 1) % st:
            raise ValueError(
                f"num_cond_frames must be {st}k+1 (1, 5, 9, 13, ...) so the cond frames fill whole "
                f"latent frames, got {num_cond_frames}"
            )
        given = num_frames
        if (num_frames - 1) % st:
            rounded = (num_frames - 1) // st * st + 1
            # at the user's line, past the caller (__call__ / extend) and torch.no_grad's and _one_call_per_dit's wrappers
            warnings.warn(f"num_frames={num_frames} is not {st}k+1; rounding down to {rounded}",
                          stacklevel=user_stacklevel(os.path.dirname(__file__)))
            num_frames = rounded
        if num_frames <= num_cond_frames:
            # the given value too: "num_frames (5)" for num_frames=7 named a value the user never passed
            shown = f"{num_frames}" if given == num_frames else f"{given}, rounded down to {st}k+1: {num_frames}"
            raise ValueError(
                f"num_frames ({shown}) must be greater than num_cond_frames ({num_cond_frames}): "
                "nothing would be generated"
            )
        steps = defaults["steps"] if num_inference_steps is None else num_inference_steps
        steps = _check_int("num_inference_steps", steps, 1)
        if defaults["schedule"] == "distill":  # else vc_timesteps refuses it after the video is read
            check_distill_steps(steps, "num_inference_steps")
        g = defaults["guidance"] if guidance_scale is None else guidance_scale
        if isinstance(g, (bool, np.bool_)) or not isinstance(g, numbers.Real) or not math.isfinite(g):
            raise TypeError(f"guidance_scale must be a finite real number, got {g!r}")
        if g < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables classifier-free guidance), got {g}")
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        return num_frames, num_cond_frames, steps, float(g), output_type

    def _load_video(self, video, num_cond_frames: int) -> VideoFrames:
        """The input clip at about ``TARGET_FPS``; ValueError when it has fewer than
        ``num_cond_frames`` frames (after subsampling)."""
        if isinstance(video, (str, os.PathLike)):
            vf = read_video(video, target_fps=TARGET_FPS)
        else:
            vf = as_video_frames(video)
            if isinstance(video, VideoFrames) and vf.fps:
                vf = subsample_to_fps(vf, TARGET_FPS)[0]
        if vf.num_frames < num_cond_frames:
            note = ""
            if vf.stride > 1 and vf.fps:  # a hand-built VideoFrames may carry a stride without a rate
                note = f" (after subsampling {vf.fps * vf.stride:g} fps by {vf.stride} to about {TARGET_FPS:g} fps)"
            src = f"{vf.source}: " if getattr(vf, "source", None) else ""
            raise ValueError(
                f"{src}the video has {vf.num_frames} frames{note}, fewer than num_cond_frames={num_cond_frames}"
            )
        return vf

    def _schedule(self, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """DiT timesteps and sigmas of ``steps`` denoising steps in the current mode's schedule."""
        return vc_timesteps(
            steps, self.shift, MODE_DEFAULTS[self._mode]["schedule"], num_train_timesteps=self.num_train_timesteps
        )

    @staticmethod
    def _generator(generator, device: torch.device) -> Optional[torch.Generator]:
        if generator is None or isinstance(generator, torch.Generator):
            return generator
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            if not _seed_fits(generator):  # was torch's "Overflow when unpacking long long"
                raise ValueError(f"generator: an int seed must fit in 64 bits ([-2**63, 2**64)), got {generator}")
            return torch.Generator(device=device).manual_seed(int(generator))
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")

    # ---------------------------------------------------------------- the segment

    @torch.no_grad()
    def _segment(
        self,
        frames: np.ndarray,
        size_hw: Tuple[int, int],
        text: Tuple[torch.Tensor, torch.Tensor],
        *,
        num_frames: int,
        num_cond_frames: int,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        guidance_scale: float,
        use_kv_cache: bool,
        offload_kv_cache: bool,
        generator: Optional[torch.Generator],
        output_type: str,
        progress: bool,
        timer: _Timer,
        timings: Dict[str, Any],
        desc: str = "Denoising",
        out_hw: Optional[Tuple[int, int]] = None,
    ):
        """One continuation from ``frames`` (only their last ``num_cond_frames`` are used).

        Returns ``(new_frames, latents, decoded)``: ``[num_frames - num_cond_frames, H, W, 3]`` uint8 at
        ``out_hw`` (default: the size of ``frames``; None for ``output_type="latent"``), the ``[1, 16, T, h, w]``
        fp32 latents and every decoded frame at the model size.
        """
        embeds, mask = text
        do_cfg = guidance_scale > 1.0
        if offload_kv_cache is None:
            offload_kv_cache = self._memory.offload_kv_cache
        c = 1 + (num_cond_frames - 1) // self.vae_scale_temporal

        t0 = timer.now()
        cp = getattr(self.dit, "context_parallel", None)
        if cp is not None and cp.cfg_parallel and not do_cfg:
            # no CFG batch to split: both rank halves run the same branch, each over half the ranks
            warnings.warn(f"cfg_parallel=True at guidance_scale {guidance_scale:g} (no CFG): both halves of the "
                          "ranks run the same single branch, each over half of them, slower than context "
                          "parallelism over all ranks (cfg_parallel=False)", stacklevel=3)
        # context parallel: every rank denoises rank 0's latents and text states
        latents, _, embeds, mask = _rank0_latents(
            self, "the pipeline",
            lambda: (self.prepare_latents(frames, size_hw, num_frames, num_cond_frames, generator), None, c),
            embeds, mask, timesteps, sigmas, guidance_scale, use_kv_cache)
        t1 = timer.now()
        timings["vae_encode"] = t1 - t0

        full = _denoise(self, latents, c, timesteps, sigmas, embeds, mask, use_kv_cache=use_kv_cache,
                        offload_kv_cache=offload_kv_cache, guidance_scale=guidance_scale, do_cfg=do_cfg,
                        memory=self._memory.name, desc=desc, progress=progress, timer=timer, timings=timings,
                        t_start=t1)
        _refuse_non_finite_latents(full)
        if output_type == "latent":
            timings["decode"] = 0.0
            return None, full, None
        t3 = timer.now()
        decoded = self.decode_latents(full)  # [F, h, w, 3]
        from PIL import Image

        new = _resize_frames(decoded[num_cond_frames:], out_hw or frames.shape[1:3], Image.BICUBIC)
        timings["decode"] = timer.now() - t3
        return new, full, decoded

    # ---------------------------------------------------------------- public calls

    @_one_call_per_dit
    @torch.no_grad()
    def __call__(
        self,
        video,
        prompt: str,
        negative_prompt: Optional[str] = None,
        *,
        resolution: Union[str, Tuple[int, int]] = "480p",
        num_frames: int = 93,
        num_cond_frames: int = 13,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        use_kv_cache: bool = True,
        offload_kv_cache: Optional[bool] = None,
        use_bsa: Optional[bool] = None,
        generator: Optional[Union[torch.Generator, int]] = None,
        output_type: str = "np",
        progress: bool = True,
    ) -> VideoContinuationOutput:
        """Continue ``video`` following ``prompt``.

        Args:
            video: a path (video file, GIF, frame folder; subsampled to ~15 fps), a
                ``video_io.VideoFrames`` (subsampled by its fps), a list of PIL images or a
                ``[F, H, W, 3]`` uint8 array (taken as already at ~15 fps).
            prompt (str): what happens next.
            negative_prompt (str | None): used when guidance > 1; None -> the negative prompt of
                LongCat-Video's demos (``text.DEFAULT_NEGATIVE_PROMPT``); "" for an empty one.
            resolution: "480p", "720p" (LongCat's aspect-ratio buckets), or an explicit
                ``(height, width)``, multiples of 16.
            num_frames (int): frames of the generated clip including the cond frames (93); rounded
                down to 4k+1.
            num_cond_frames (int): last input frames used as condition (13); 4k+1.
            num_inference_steps (int | None): None -> 50 (basic, enhance_hf schedule: 56 DiT
                steps with shift 12) or 16 (distill).
            guidance_scale (float | None): None -> 4.0 (basic) or 1.0 (distill); >= 1.
            use_kv_cache (bool): compute the cond tokens' keys/values once (default). Not a pure
                speed switch under guidance > 1: CFG-zero's scale is computed over the noisy frames
                with the cache and over all frames without it, as upstream does (SPEC 7; a few % rel
                L2 apart in the latents); at guidance 1 the two agree to fp32 rounding.
            offload_kv_cache (bool | None): keep the cache in CPU memory between uses; None: as the
                memory mode says (on in ``"low"``).
            use_bsa (bool | None): block-sparse self-attention for this call: True on, False off, None
                (default) as ``config.enable_bsa`` says.
            generator: ``torch.Generator`` or an int seed; fixes noise and posterior sampling.
            output_type (str): "np" (frames) or "latent" (latents, no decode).
            progress (bool): show a progress bar.

        Returns:
            VideoContinuationOutput: frames (input + new, input size), timings, ...

        Raises:
            ValueError / TypeError: bad arguments (named); VideoReadError for bad videos;
            VCOutOfMemoryError when the accelerator runs out of memory (with a hint).
        """
        timer = _Timer(self.device)
        t_start = timer.now()
        timings: Dict[str, Any] = {}
        with _ranks_agree(self, "the pipeline's argument checks, video read and text encoding") as ok:
            num_frames, num_cond_frames, steps, g, output_type = self._resolve_args(
                num_frames, num_cond_frames, num_inference_steps, guidance_scale, output_type
            )
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            if negative_prompt is not None and not isinstance(negative_prompt, str):
                raise TypeError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
            _check_flags(use_kv_cache=use_kv_cache, offload_kv_cache_opt=offload_kv_cache, use_bsa_opt=use_bsa,
                         progress=progress)
            _check_not_ignored(g, negative_prompt, use_kv_cache, offload_kv_cache)
            vf = self._load_video(video, num_cond_frames)
            size_hw = self._target_size(vf.frames, resolution)
            generator = self._generator(generator, self.device)
            timesteps, sigmas = self._schedule(steps)

            t0 = timer.now()
            text = self._encode_for(prompt, negative_prompt, g > 1.0)
            timings["text"] = timer.now() - t0
            ok.record()
        with self._bsa(use_bsa):
            new, latents, decoded = self._segment(
                vf.frames,
                size_hw,
                text,
                num_frames=num_frames,
                num_cond_frames=num_cond_frames,
                timesteps=timesteps,
                sigmas=sigmas,
                guidance_scale=g,
                use_kv_cache=use_kv_cache,
                offload_kv_cache=offload_kv_cache,
                generator=generator,
                output_type=output_type,
                progress=progress,
                timer=timer,
                timings=timings,
            )
        timings["total"] = timer.now() - t_start
        n_new = num_frames - num_cond_frames
        frames = None if new is None else np.concatenate([vf.frames, new], axis=0)
        return VideoContinuationOutput(frames, latents, TARGET_FPS, vf.num_frames, n_new, size_hw, timings,
                                       model_frames=decoded)

    @_one_call_per_dit
    @torch.no_grad()
    def refine(
        self,
        stage1,
        prompt: str = "",
        *,
        video=None,
        num_cond_frames: Optional[int] = None,
        resolution: Union[str, Tuple[int, int]] = "720p",
        spatial_refine_only: bool = False,
        t_thresh: float = 0.5,
        num_inference_steps: int = 50,
        generator: Optional[Union[torch.Generator, int]] = None,
        use_kv_cache: bool = True,
        offload_kv_cache: Optional[bool] = None,
        output_type: str = "np",
        progress: bool = True,
    ) -> VideoContinuationOutput:
        """Refine a 480p continuation to 720p (and 30 fps) with the refinement LoRA and BSA (SPEC 11).

        Args:
            stage1: a ``VideoContinuationOutput`` of ``__call__`` (its ``model_frames``: every
                decoded frame at the model size, cond frames included, as upstream passes them),
                or frames ``[F, H, W, 3]`` uint8 / a path, used as they are (no subsampling).
            prompt (str): the prompt ("" as upstream's long-video refinement).
            video: the original input (path, ``VideoFrames``, frames); a path or ``VideoFrames``
                is re-subsampled to about 30 fps; its last ``num_cond_frames`` frames condition
                the refinement. None: no cond frames.
            num_cond_frames (int | None): the refine's cond frames; None -> 2 x the stage-1 count
                (13 -> 26), the stage-1 count with ``spatial_refine_only``; 0 without ``video``.
            resolution: "720p" (LongCat's F64 bucket table: 16:9 -> 704 x 1280) or
                ``(height, width)``, multiples of 64.
            spatial_refine_only (bool): keep the frame count (output at 15 fps).
            t_thresh (float): in (0, 1]: the stage-1 latents are mixed with this much noise and
                denoised from timestep ``1000 * t_thresh``.
            num_inference_steps (int): steps of the base schedule (50 -> 5 DiT steps at 0.5).
            generator: None: every draw from the global RNG in upstream's order (a fixed
                ``torch.manual_seed`` reproduces upstream); a generator / int seed: every draw
                from it, in the same order.
            use_kv_cache (bool): serve the cond latents from a KV cache built once (under guidance
                > 1 not a pure speed switch: see ``__call__``).
            offload_kv_cache (bool | None): keep that cache in CPU memory between uses (exact; at
                720p with 26 cond frames it holds ~20.6 GiB); None: as the memory mode says (on
                with ``memory="low"``).
            output_type (str): "np" or "latent".
            progress (bool): progress bar.

        Returns:
            VideoContinuationOutput: ``frames`` = ``video`` at ~30 fps followed by the refined new
            frames at the video's size; ``fps`` 30 (15); ``latents`` the whole padded latent tensor
            the DiT denoised; ``model_frames`` the refined frames at the bucket size; timings.

        Raises:
            ValueError / TypeError: bad arguments, before any model work; CheckpointError: the
            refinement LoRA file is missing. The previous LoRA/BSA state is restored in any case.
        """
        from .refine import run_refine

        return run_refine(
            self, stage1, prompt, video=video, num_cond_frames=num_cond_frames, resolution=resolution,
            spatial_refine_only=spatial_refine_only, t_thresh=t_thresh,
            num_inference_steps=num_inference_steps, generator=generator, use_kv_cache=use_kv_cache,
            offload_kv_cache=offload_kv_cache, output_type=output_type, progress=progress,
            lora_path=self.refinement_lora_path,
        )

    def _encode_for(self, prompt: str, negative_prompt: Optional[str], do_cfg: bool, cache=None,
                    name: str = "prompt"):
        """Text embeddings for one call: ``[neg; pos]`` with CFG, ``[pos]`` without. ``name``: what a
        truncation warning calls ``prompt`` (it said "prompt 1", the CFG batch row, for the user's only
        prompt and "prompt 0" for the negative prompt)."""
        if do_cfg:
            neg = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
            key = ("cfg", prompt, neg)
            if cache is not None and key in cache:
                return cache[key]
            out = self.encode_text([neg, prompt], names=["negative_prompt", name])
        else:
            key = ("nocfg", prompt)
            if cache is not None and key in cache:
                return cache[key]
            out = self.encode_text([prompt], names=[name])
        if cache is not None:
            cache[key] = out
        return out

    def check_refine_fits_ahead(self, size_hw: Tuple[int, int], num_frames: int, num_cond_frames: int, *,
                                with_cond: bool = True, spatial_refine_only: bool = False,
                                refine_resolution="720p", use_kv_cache: bool = True,
                                offload_kv_cache: Optional[bool] = None) -> None:
        """Raises (``refine.check_refine_fits``) before a stage 1 of ``num_frames`` at ``size_hw`` whose
        refinement (cond frames from the ~30 fps video when ``with_cond``) would not fit: the stage-1
        minutes are not spent on a result that cannot be refined."""
        from .refine import check_refine_fits, refine_bucket

        r_size = refine_bucket(*size_hw) if isinstance(refine_resolution, str) else tuple(refine_resolution)
        rnc = num_cond_frames if spatial_refine_only else 2 * num_cond_frames
        check_refine_fits(self, r_size, num_frames * (1 if spatial_refine_only else 2), rnc if with_cond else 0,
                          use_kv_cache=use_kv_cache, offload_kv_cache=offload_kv_cache,
                          lora_path=self.refinement_lora_path)

    @_one_call_per_dit
    @torch.no_grad()
    def extend(
        self,
        video,
        prompts: Union[str, Sequence[str]],
        negative_prompt: Optional[str] = None,
        *,
        segments: Optional[int] = None,
        resolution: Union[str, Tuple[int, int]] = "480p",
        num_frames: int = 93,
        num_cond_frames: int = 13,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        use_kv_cache: bool = True,
        offload_kv_cache: Optional[bool] = None,
        use_bsa: Optional[bool] = None,
        generator: Optional[Union[torch.Generator, int]] = None,
        progress: bool = True,
        refine: bool = False,
        spatial_refine_only: bool = False,
        t_thresh: float = 0.5,
        refine_resolution: Union[str, Tuple[int, int]] = "720p",
        refine_steps: int = 50,
    ) -> VideoContinuationOutput:
        """Long video: chain ``segments`` continuations, each conditioned on the last
        ``num_cond_frames`` decoded frames of the segment before (at the model size, its reconstructed
        cond frames included when it generates fewer new frames than that; the first segment: the
        input's last frames), as SPEC 7 says. Upstream's long-video demo resizes each segment's output to
        its first video's size and passes that on; there the first video is a t2v output at the model size,
        so the two agree; for an input of another size ours skips the resize round trip. Each segment's
        new frames are resized to the input's size for the output.

        Args:
            prompts: one prompt for every segment, or a list with one prompt per segment.
            segments (int | None): number of segments; default ``len(prompts)`` (1 for a str).
            The other arguments are those of ``__call__`` and apply to every segment; the same
            generator runs through all segments.

        Returns:
            VideoContinuationOutput: the input frames followed by ``segments * (num_frames -
            num_cond_frames)`` new frames; ``timings["segments"]`` holds each segment's timings.

        With ``refine=True`` the generated video is then refined to 720p (SPEC 11, upstream's
        long-video demo): sliding windows of ``num_frames`` stage-1 frames at the model size
        (the first clip's decoded frames, cond frames included, then each segment's new ones),
        start += ``num_frames - num_cond_frames``, prompt "", each window conditioned on the last
        ``2 * num_cond_frames`` (``num_cond_frames`` with ``spatial_refine_only``) refined frames
        of the previous window (none for the first). The result is the input at ~30 fps
        followed by the refined new frames at the input's size, 30 fps (15); ``timings["refine"]``
        holds each window's timings. ``refine_resolution``/``refine_steps``/``t_thresh`` are
        ``refine``'s ``resolution``/``num_inference_steps``/``t_thresh``.

        Reused across segments: the loaded components, the bucket size, the timestep schedule and
        the text embeddings (each distinct prompt is encoded once). Recomputed per segment: the
        VAE encoding of the new cond frames (they are new pixels), the KV cache (its keys/values
        depend on those latents), the denoising loop and the VAE decode.
        """
        timer = _Timer(self.device)
        t_start = timer.now()
        with _ranks_agree(self, "extend's argument checks and video read") as ok:
            num_frames, num_cond_frames, steps, g, _ = self._resolve_args(
                num_frames, num_cond_frames, num_inference_steps, guidance_scale, "np"
            )
            if isinstance(prompts, str):
                n = 1 if segments is None else _check_int("segments", segments, 1)
                prompt_list = [prompts] * n
            elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
                n = len(prompts) if segments is None else _check_int("segments", segments, 1)
                if len(prompts) == 1:
                    prompt_list = list(prompts) * n
                elif len(prompts) == n:
                    prompt_list = list(prompts)
                else:
                    raise ValueError(f"prompts has {len(prompts)} entries but segments={n}; give 1 or {n} prompts")
            else:
                # name the entry: ["a", None] was refused as a whole, leaving the user to find which one
                bad = next(((i, p) for i, p in enumerate(prompts) if not isinstance(p, str)), None) \
                    if isinstance(prompts, (list, tuple)) else None
                got = (f"prompts[{bad[0]}] is {type(bad[1]).__name__} {bad[1]!r}" if bad is not None
                       else f"got {type(prompts).__name__}" + (" (empty)" if isinstance(prompts, (list, tuple)) else ""))
                raise TypeError(f"prompts must be a str or a non-empty list of str; {got}")
            if negative_prompt is not None and not isinstance(negative_prompt, str):
                raise TypeError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
            _check_flags(use_kv_cache=use_kv_cache, offload_kv_cache_opt=offload_kv_cache, use_bsa_opt=use_bsa,
                         progress=progress, refine=refine)
            _check_not_ignored(g, negative_prompt, use_kv_cache, offload_kv_cache)

            if not refine:
                # the refinement's options would be silently ignored without it
                given = [f"{k}={v!r}" for k, v, d in (("spatial_refine_only", spatial_refine_only, False),
                                                      ("t_thresh", t_thresh, 0.5),
                                                      ("refine_resolution", refine_resolution, "720p"),
                                                      ("refine_steps", refine_steps, 50))
                         if not (type(v) is type(d) and v == d)]
                if given:
                    raise ValueError(f"{', '.join(given)} given with refine=False: the refinement options need "
                                     "refine=True")
            if refine:
                from .refine import BSA_LATENT_GRANULARITY, check_refine_lora, check_refine_resolution, check_t_thresh

                check_t_thresh(t_thresh)
                # checked here, not after the stage-1 segments have run
                check_refine_resolution(refine_resolution, self.vae_scale_spatial * 2 * BSA_LATENT_GRANULARITY,
                                        "refine_resolution")
                if not isinstance(spatial_refine_only, bool):
                    raise TypeError(f"spatial_refine_only must be a bool, got {type(spatial_refine_only).__name__}")
                _check_int("refine_steps", refine_steps, 1)
                check_refine_lora(self, self.refinement_lora_path)
            vf = self._load_video(video, num_cond_frames)
            size_hw = self._target_size(vf.frames, resolution)
            if refine:
                # the refinement's memory, checked before the stage-1 segments run: windows after the
                # first have cond frames, the first has none. Either can be the larger (the first, with
                # the KV cache offloaded: more noise latents, no cache on the device), so both are checked
                for with_cond in ((True, False) if n > 1 else (False,)):
                    self.check_refine_fits_ahead(size_hw, num_frames, num_cond_frames, with_cond=with_cond,
                                                 spatial_refine_only=spatial_refine_only,
                                                 refine_resolution=refine_resolution, use_kv_cache=use_kv_cache,
                                                 offload_kv_cache=offload_kv_cache)
            generator = self._generator(generator, self.device)
            timesteps, sigmas = self._schedule(steps)
            ok.record()
        from tqdm.auto import tqdm

        stage1_frames: List[np.ndarray] = []

        text_cache: Dict[Any, Tuple[torch.Tensor, torch.Tensor]] = {}
        pieces = [vf.frames]
        # the cond frames: the input's last ones, then the last decoded frames of the segment before, at the model
        # size (SPEC 7: "the last num_cond_frames decoded frames of the previous one"; upstream's demo, whose first
        # video is at the model size, resizes them to that size: the same frames). Taken at the input's size,
        # they went through a bicubic resize to the input and back every segment (a half-size input lost detail)
        tail = vf.frames[-num_cond_frames:]
        seg_timings = []
        with self._bsa(use_bsa):
            for k in tqdm(range(n), desc="Segments", disable=not progress or n == 1, unit="segment"):
                timings: Dict[str, Any] = {}
                t0 = timer.now()
                text = self._encode_for(prompt_list[k], negative_prompt, g > 1.0, cache=text_cache,
                                        name="prompts" if isinstance(prompts, str) else f"prompts[{k % len(prompts)}]")
                timings["text"] = timer.now() - t0
                new, _, decoded = self._segment(
                    tail,
                    size_hw,
                    text,
                    num_frames=num_frames,
                    num_cond_frames=num_cond_frames,
                    timesteps=timesteps,
                    sigmas=sigmas,
                    guidance_scale=g,
                    use_kv_cache=use_kv_cache,
                    offload_kv_cache=offload_kv_cache,
                    generator=generator,
                    output_type="np",
                    progress=progress,
                    timer=timer,
                    timings=timings,
                    desc=f"Denoising {k + 1}/{n}",
                    out_hw=vf.frames.shape[1:3],
                )
                pieces.append(new)
                if refine:
                    stage1_frames.append(decoded if k == 0 else decoded[num_cond_frames:])
                tail = decoded[-num_cond_frames:]
                seg_timings.append(timings)
        total: Dict[str, Any] = {
            key: float(sum(t[key] for t in seg_timings))
            for key in ("text", "vae_encode", "cache_build", "denoise", "decode")
        }
        total["steps"] = int(sum(t["steps"] for t in seg_timings))
        total["kv_cache_bytes"] = max(t["kv_cache_bytes"] for t in seg_timings)
        total["denoise_steps"] = [s for t in seg_timings for s in t["denoise_steps"]]
        total["segments"] = seg_timings
        if refine:
            return _refine_long_impl(self, video, vf, np.concatenate(stage1_frames, axis=0), n, num_frames,
                                     num_cond_frames, spatial_refine_only, t_thresh, refine_resolution,
                                     refine_steps, use_kv_cache, offload_kv_cache, generator, progress, total, timer,
                                     t_start)
        total["total"] = timer.now() - t_start
        frames = np.concatenate(pieces, axis=0)
        return VideoContinuationOutput(
            frames, None, TARGET_FPS, vf.num_frames, n * (num_frames - num_cond_frames), size_hw, total
        )


def _refine_long_impl(pipe, video, vf, all_gen, n, num_frames, num_cond_frames, spatial, t_thresh, resolution, steps,
                      use_kv_cache, offload_kv_cache, generator, progress, total, timer, t_start):
    """Sliding-window refinement of ``extend(refine=True)`` (SPEC 11, long video)."""
    from PIL import Image

    from .refine import REFINE_FPS, _video_30fps, run_refine

    rnc = num_cond_frames if spatial else 2 * num_cond_frames
    prev = None
    refined: List[np.ndarray] = []
    win_timings = []
    start = 0
    for k in range(n):
        window = all_gen[start:start + num_frames]
        out = run_refine(pipe, window, "", video=prev, num_cond_frames=None if prev is None else rnc,
                         resolution=resolution, spatial_refine_only=spatial, t_thresh=t_thresh,
                         num_inference_steps=steps, generator=generator, use_kv_cache=use_kv_cache,
                         offload_kv_cache=offload_kv_cache, progress=progress, lora_path=pipe.refinement_lora_path,
                         desc=f"Refining {k + 1}/{n}")
        refined.append(out.model_frames if prev is None else out.model_frames[rnc:])
        prev = out.model_frames
        win_timings.append(out.timings)
        start += num_frames - num_cond_frames
    video30 = _video_30fps(video) if not isinstance(video, VideoFrames) or video.fps else vf.frames
    new = np.concatenate(refined, axis=0)[rnc:]
    new = _resize_frames(new, video30.shape[1:3], Image.BICUBIC)
    total["refine"] = win_timings
    total["total"] = timer.now() - t_start
    fps = REFINE_FPS / 2 if spatial else REFINE_FPS
    return VideoContinuationOutput(np.concatenate([video30, new], axis=0), None, fps, int(video30.shape[0]),
                                   int(new.shape[0]), tuple(prev.shape[1:3]), total)


@contextlib.contextmanager
def _library_progress_bars(enabled: bool):
    """transformers' and diffusers' progress bars off inside when not ``enabled`` (each library's setting
    restored after); on, as they are."""
    if enabled:
        yield
        return
    import importlib

    saved = []
    for mod in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            lib = importlib.import_module(mod)
            saved.append((lib, lib.is_progress_bar_enabled()))
            lib.disable_progress_bar()
        except (ImportError, AttributeError):  # pragma: no cover - a library without the switch
            pass
    try:
        yield
    finally:
        for lib, was in saved:
            if was:
                lib.enable_progress_bar()


def _text_encoder_dtype(dtype: torch.dtype) -> torch.dtype:
    """The UMT5 encoder's weights dtype for a pipeline of ``dtype``: bf16 for fp16 (T5 activations overflow
    fp16's range; transformers clamps them silently, degrading the embeddings), else ``dtype``."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def _load_umt5(cls, path: str, dtype: torch.dtype):
    # transformers >= 4.56 names the argument `dtype`; older versions only know `torch_dtype`.
    try:
        model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except TypeError:
        model, info = cls.from_pretrained(path, torch_dtype=dtype, output_loading_info=True)
    _check_no_missing_tensors("text encoder", path, info, unused_ok=("decoder.", "lm_head."))  # a full UMT5's decoder and head
    _check_finite_weights("text encoder", path, model)
    return model


def _load_vae(cls, path: str, dtype: torch.dtype):
    model, info = cls.from_pretrained(path, torch_dtype=dtype, output_loading_info=True)
    _check_no_missing_tensors("VAE", path, info)
    _check_finite_weights("VAE", path, model)
    return model


def _check_finite_weights(what: str, path: str, model: torch.nn.Module) -> None:
    """CheckpointError naming the ``model`` tensors that hold NaN/Inf, as the DiT loader does (a NaN in
    the VAE decoder loaded silently: the latents stay finite, so the check before decoding passed,
    and the NaN pixels became black frames). Runs once at load, on the CPU copy; a sum per tensor."""
    from .loading import _has_non_finite

    bad = sorted(n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if _has_non_finite(t))
    if bad:
        raise CheckpointError(f"{path}: the {what} checkpoint holds non-finite values (NaN/Inf) in "
                              + _list(bad, 10))


def _check_no_missing_tensors(what: str, path: str, info, unused_ok: Tuple[str, ...] = ()) -> None:
    """CheckpointError naming the model tensors ``path`` lacks (``from_pretrained``'s loading info):
    transformers and diffusers initialise them at random with a log line (which the CLI silences), so
    a text encoder or VAE folder of another model ran as a random one. Likewise for checkpoint tensors
    the model has no place for (prefixes ``unused_ok`` excepted): a 2-layer encoder under a 1-layer
    config.json loaded as the 1-layer one, the rest dropped. The DiT loads strictly too."""
    missing = sorted((info or {}).get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"{path}: the {what} checkpoint lacks {len(missing)} tensor(s) of the model, which would "
                              f"be initialised at random: {_list(missing, 20)}")
    unexpected = sorted(k for k in (info or {}).get("unexpected_keys") or [] if not k.startswith(unused_ok))
    if unexpected:
        raise CheckpointError(f"{path}: the {what} checkpoint holds {len(unexpected)} tensor(s) not in the model built "
                              f"from its config.json, which would be dropped: {_list(unexpected, 20)}")
