"""Benchmark shapes taken from the LongCat-Video presets (SPEC 7, SPEC 10).

A latent grid is ``(T, H, W)`` in tokens after the 1x2x2 patch: frames ``(F - 1) // 4 + 1`` for ``F``
video frames (Wan VAE: 4x temporal), and ``H = h // 16``, ``W = w // 16`` for an ``h x w`` video
(8x spatial VAE times the 2x2 patch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Resolution buckets used by the benchmarks: (height, width) in pixels of the 16:9 bucket.
RESOLUTIONS = {
    "480p": (480, 832),
    "720p": (704, 1280),
}

# The VC conditioning lengths of the main benchmark: 13/29/45/61/77 frames = 4/8/12/16/20 latents of 24.
COND_FRAMES = (13, 29, 45, 61, 77)
NUM_FRAMES = 93

# Sparsity levels of the block-sparse suite (0.9375 is LongCat's default, 0.875 FastVideo's refine).
SPARSITIES = (0.5, 0.75, 0.875, 0.9375)


def latent_frames(num_frames: int) -> int:
    """Latent frames for ``num_frames`` video frames (Wan VAE, 4x temporal)."""
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    return (num_frames - 1) // 4 + 1


def cond_latents(num_cond_frames: int) -> int:
    """Conditioning latents for ``num_cond_frames`` frames (SPEC 7: 13 -> 4)."""
    return latent_frames(num_cond_frames)


def latent_grid(resolution: str = "480p", num_frames: int = NUM_FRAMES) -> tuple[int, int, int]:
    """Token grid ``(T, H, W)`` of a ``resolution`` bucket with ``num_frames`` video frames."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution: expected one of {sorted(RESOLUTIONS)}, got {resolution!r}")
    h, w = RESOLUTIONS[resolution]
    return (latent_frames(num_frames), h // 16, w // 16)


@dataclass(frozen=True)
class Grid:
    """A named latent token grid ``(T, H, W)``."""

    name: str
    t: int
    h: int
    w: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.t, self.h, self.w)

    @property
    def frame_tokens(self) -> int:
        return self.h * self.w

    @property
    def tokens(self) -> int:
        return self.t * self.h * self.w

    def __str__(self) -> str:
        return f"{self.t}x{self.h}x{self.w}"


# Named grids: the real ones (SPEC 10) and small ones for CPU runs and CI.
GRIDS = {
    "480p": Grid("480p", *latent_grid("480p")),  # 24 x 30 x 52 = 37,440 tokens
    "720p": Grid("720p", *latent_grid("720p")),  # 24 x 44 x 80 = 84,480 tokens
    "cpu": Grid("cpu", 24, 4, 8),  # 24 frames so every cond length of COND_FRAMES fits
    "tiny": Grid("tiny", 24, 2, 4),
    # block-sparse grids: >= 16 key blocks so every sparsity level keeps >= 1 block; not divisible
    # by 4x4x4 on purpose (like 480p)
    "bsa-cpu": Grid("bsa-cpu", 12, 10, 18),
    "bsa-tiny": Grid("bsa-tiny", 8, 8, 14),
}

_GRID_RE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def parse_grid(spec: str) -> Grid:
    """A grid from a preset name (``480p``, ``720p``, ``cpu``, ...) or ``TxHxW``."""
    spec = spec.strip()
    if spec in GRIDS:
        return GRIDS[spec]
    m = _GRID_RE.match(spec)
    if m is None:
        raise ValueError(f"shape: expected a preset in {sorted(GRIDS)} or 'TxHxW', got {spec!r}")
    t, h, w = (int(g) for g in m.groups())
    if min(t, h, w) < 1:
        raise ValueError(f"shape: every dimension must be >= 1, got {spec!r}")
    return Grid(spec, t, h, w)


def cond_latents_for(grid: Grid, cond_frames: tuple[int, ...] = COND_FRAMES) -> list[tuple[int, int]]:
    """``(cond_frames, cond_latents)`` pairs that leave at least one noisy latent on ``grid``."""
    pairs = [(f, cond_latents(f)) for f in cond_frames]
    return [(f, c) for f, c in pairs if 0 < c < grid.t]


def cond_frames_left_out(grid: Grid, cond_frames: tuple[int, ...] = COND_FRAMES) -> list[tuple[int, int, str]]:
    """``(cond_frames, cond_latents, reason)`` of the values ``cond_latents_for`` leaves out on ``grid``:
    the suites report them as skipped (``--cond-frames 13,97`` timed 13 alone and exited 0, 97 unmentioned)."""
    kept = cond_latents_for(grid, cond_frames)
    return [(f, cond_latents(f), f"{f} cond frames = {cond_latents(f)} cond latents leave no noisy latent on grid "
             f"{grid} ({grid.t} latent frames)") for f in cond_frames if (f, cond_latents(f)) not in kept]
