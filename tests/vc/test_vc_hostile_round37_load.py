"""Round 37 (hostile audit): ``VideoContinuationPipeline.from_pretrained``'s non-DiT components.

* a text encoder / VAE safetensors holding tensors the model built from its config.json has no place
  for (a 2-layer encoder under a 1-layer config) loaded as a smaller model, the extra tensors dropped
  with a log line only;
* a VAE config whose ``scale_factor_temporal`` / ``scale_factor_spatial`` disagree with its own
  architecture (``temperal_downsample``, ``patch_size``) sized the latents with the wrong factors
  (0 silently became the default).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from vc_components import write_full_checkpoint


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("r37ckpt"))
    write_full_checkpoint(root)
    return root


def _load(root):
    from longcat_vc.pipeline import VideoContinuationPipeline

    return VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                     progress=False)


def _copy_adding(root: str, dst: str, sub: str, fname: str, extra) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(root, dst)
    path = os.path.join(dst, sub, fname)
    sd = load_file(path)
    sd.update(extra)
    save_file(sd, path, metadata={"format": "pt"})
    return dst


def test_a_text_encoder_with_tensors_of_an_extra_layer_is_refused(ckpt_root, tmp_path):
    """A text encoder checkpoint with a second encoder block under a 1-layer config.json loaded as the
    1-layer encoder, the second block's tensors dropped with a log line (a silently different model)."""
    from longcat_vc.loading import CheckpointError

    extra = {"encoder.block.1.layer.0.layer_norm.weight": torch.randn(32)}
    root = _copy_adding(ckpt_root, str(tmp_path / "ck"), "text_encoder", "model.safetensors", extra)
    with pytest.raises(CheckpointError, match=r"(?s)text_encoder.*1 tensor.*not in the model.*encoder\.block\.1\."):
        _load(root)


def test_a_text_encoder_checkpoint_with_its_decoder_still_loads(ckpt_root, tmp_path):
    """An encoder-decoder UMT5 checkpoint's decoder tensors are legitimately unused by the encoder."""
    extra = {"decoder.block.0.layer.0.layer_norm.weight": torch.randn(32)}
    root = _copy_adding(ckpt_root, str(tmp_path / "ck"), "text_encoder", "model.safetensors", extra)
    assert _load(root) is not None


def test_a_vae_with_tensors_the_model_lacks_is_refused(ckpt_root, tmp_path):
    """Extra VAE tensors (another VAE's layers) were dropped with a log line and the VAE ran without them."""
    from longcat_vc.loading import CheckpointError

    extra = {"decoder.up_blocks.9.resnets.0.conv1.weight": torch.randn(3, 3)}
    root = _copy_adding(ckpt_root, str(tmp_path / "ck"), "vae", "diffusion_pytorch_model.safetensors", extra)
    with pytest.raises(CheckpointError, match=r"(?s)vae.*1 tensor.*not in the model.*decoder\.up_blocks\.9\."):
        _load(root)


@pytest.mark.parametrize("key,value", [("scale_factor_temporal", 2), ("scale_factor_temporal", 0),
                                       ("scale_factor_spatial", 16)])
def test_vae_scale_factors_must_match_its_architecture(ckpt_root, tmp_path, key, value):
    """The VAE config's scale factors sized the latents (frames // 2 latent frames for a 4x VAE); a 0
    silently became the default 4."""
    dst = str(tmp_path / "ck")
    shutil.copytree(ckpt_root, dst)
    path = os.path.join(dst, "vae", "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=rf"VAE config {key}.*{value}"):
        _load(dst)
