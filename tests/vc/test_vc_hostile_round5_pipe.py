"""Hostile inputs of the VC pipeline, the refinement, video I/O and the CLI that used to give a silently
wrong answer or an unhelpful crash (fifth audit, 2026-12-07), one section per finding:

A. ``refine`` without cond frames (``video=None``) of a stage-1 clip whose refine frame count is 14, 15
   or 0 (mod 16) (e.g. 8 frames, or 16 with ``spatial_refine_only``): upstream's padding gives the VAE
   4 * n latent frames of which it encodes 1 + 4 (n - 1), so the last frames were never encoded; the
   output held 13 frames where ``num_new_frames`` said 16.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longcat_vc.pipeline import VideoContinuationPipeline
from longcat_vc.refine import refine_padding
from vc_components import random_frames, refine_checkpoint_in


@pytest.fixture(scope="module")
def refine_ckpt(tmp_path_factory):
    return refine_checkpoint_in(tmp_path_factory, "ckpt_round5")


@pytest.fixture(scope="module")
def refine_pipe(refine_ckpt):
    return VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                     attn_backend="torch")


# ------------------------------------------------------------------------------------------------ A


def test_refine_padding_without_cond_keeps_every_frame_decodable():
    for n in range(1, 200):
        pad = refine_padding(n, 0)
        assert pad["noise_latents"] % 4 == 0
        assert 1 + 4 * (pad["noise_latents"] - 1) >= n, n  # frames the VAE encodes and decodes
        upstream = math.ceil(math.ceil(n / 4) / 4) * 4
        if 1 + 4 * (upstream - 1) >= n:  # where upstream's padding loses nothing it is kept
            assert pad["noise_latents"] == upstream, n


def test_refine_without_cond_returns_every_frame(refine_pipe):
    out = refine_pipe.refine(random_frames(16, 64, 64), "a cat", resolution=(64, 64), spatial_refine_only=True,
                             generator=1, progress=False)
    assert out.num_new_frames == 16
    assert out.frames.shape == (16, 64, 64, 3) and out.model_frames.shape == (16, 64, 64, 3)
