"""What the pipeline's stages share: the output type and small helpers.

``pipeline.py`` (480p continuation) and ``refine.py`` (720p refinement) both return a
``VideoContinuationOutput`` and use these helpers; they live here so that neither module imports the
other's internals (no import circle).
"""

from __future__ import annotations

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
