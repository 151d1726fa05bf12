"""Hostile inputs of longcat_vc that used to pass silently or crash without naming the culprit (third
audit, 2026-12-06): NaN latents decoded by the refinement, NaN weights in the DiT checkpoint."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_vc import CheckpointError, LongCatDiT
from longcat_vc.pipeline import VideoContinuationPipeline
from longcat_vc.refine import REFINEMENT_LORA
from tiny_ckpt import tiny_config, write_upstream_dit
from vc_components import write_refine_checkpoint

REFINE_SIZE = (64, 64)


@pytest.fixture(scope="module")
def refine_ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_round3"))
    write_refine_checkpoint(root)
    return root


def _frames(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _nan_while_refining(pipe, monkeypatch):
    """The DiT returns NaN while the refinement LoRA is active (a NaN weight in it, in effect)."""
    fwd = pipe.dit.forward

    def forward(*a, **k):
        out = fwd(*a, **k)
        return out * float("nan") if REFINEMENT_LORA in pipe.dit.active_loras else out

    monkeypatch.setattr(pipe.dit, "forward", forward)


# ------------------------------------------------------------------ A: NaN latents never decoded
@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_refine_non_finite_latents_raise_instead_of_black_frames(refine_ckpt, monkeypatch, output_type):
    pipe = VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                     attn_backend="torch")
    _nan_while_refining(pipe, monkeypatch)
    monkeypatch.setattr(pipe, "decode_latents", lambda *a, **k: pytest.fail("NaN latents were decoded"))
    with pytest.raises(FloatingPointError, match="refinement's denoised latents hold NaN/Inf"):
        pipe.refine(_frames(5, 36, 64), "a cat", video=_frames(12, 40, 72), num_cond_frames=5,
                    resolution=REFINE_SIZE, num_inference_steps=2, generator=0, output_type=output_type,
                    progress=False)


def test_extend_refine_non_finite_latents_raise(refine_ckpt, monkeypatch):
    pipe = VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                     attn_backend="torch", mode="distill")
    _nan_while_refining(pipe, monkeypatch)
    with pytest.raises(FloatingPointError, match="refinement's denoised latents hold NaN/Inf"):
        pipe.extend(_frames(9, 40, 72), "a cat", segments=1, num_frames=9, num_cond_frames=5, resolution=(32, 64),
                    num_inference_steps=1, generator=0, progress=False, refine=True, refine_resolution=REFINE_SIZE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dit_checkpoint_non_finite_tensor_named(tmp_path, bad, dtype):
    cfg = tiny_config()
    folder = str(tmp_path / "dit")
    write_upstream_dit(folder, cfg, seed=3, shards=2)
    shard = "diffusion_pytorch_model-00002-of-00002.safetensors"
    path = os.path.join(folder, shard)
    sd = {k: v.to(dtype) for k, v in load_file(path).items()}
    key = sorted(k for k in sd if k.endswith(".weight") and sd[k].dim() == 2)[0]
    sd[key] = sd[key].clone()
    sd[key][0, -1] = bad
    save_file(sd, path)
    # every tensor of the other shard in the same dtype too (else the mixed-dtype check fires first)
    other = os.path.join(folder, "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({k: v.to(dtype) for k, v in load_file(other).items()}, other)
    with pytest.raises(CheckpointError, match=rf"{shard}: non-finite values \(NaN/Inf\) in tensor '{key}'"):
        LongCatDiT.from_pretrained(folder)


def test_dit_checkpoint_large_finite_fp16_sum_loads(tmp_path):
    # finite fp16 values whose sum overflows fp16: the fast check (a sum) must not refuse them
    cfg = tiny_config()
    folder = str(tmp_path / "dit")
    sd = write_upstream_dit(folder, cfg, seed=3, shards=1)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    sd = {k: v.to(torch.float16) for k, v in sd.items()}
    key = max((k for k in sd if sd[k].dim() == 2), key=lambda k: sd[k].numel())
    sd[key] = torch.full_like(sd[key], 60000.0)
    assert not torch.isfinite(sd[key].sum())
    save_file(sd, path)
    model = LongCatDiT.from_pretrained(folder)
    assert torch.equal(model.state_dict()[key], sd[key])
