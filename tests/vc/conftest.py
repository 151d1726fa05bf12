"""Fixtures shared by the test files of this folder (module-scoped: each file gets its own)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def refine_ckpt(tmp_path_factory, request):
    """A refinement checkpoint (``vc_components.write_refine_checkpoint``) for this test file."""
    from vc_components import refine_checkpoint_in

    return refine_checkpoint_in(tmp_path_factory, "ckpt_" + request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def refine_pipe(refine_ckpt):
    """The pipeline on ``refine_ckpt``: fp32, CPU, the torch reference attention."""
    from longcat_vc.pipeline import VideoContinuationPipeline

    return VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                     attn_backend="torch")


@pytest.fixture(scope="module")
def tiny_base():
    """``(config, state dict)`` of the tiny DiT with random weights."""
    from tiny_ckpt import random_state_dict, tiny_config

    cfg = tiny_config()
    return cfg, random_state_dict(cfg, seed=3)
