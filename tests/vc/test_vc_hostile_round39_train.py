"""Round 39 (LoRA and training): fuse/unfuse on a float64 DiT, arguments of ``flow_matching_loss`` that were
ignored or failed without naming themselves."""

from __future__ import annotations

import os

import pytest
import torch

from longcat_vc import training as tr
from tiny_ckpt import lora_merged_state_dict, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora


def _peft_model():
    cfg = tiny_config(attn_backend="torch")
    dit = model_from_state_dict(cfg, random_state_dict(cfg, seed=int(torch.randint(0, 1000, ())))).train()
    return tr.add_lora(dit, tr.lora_config(rank=4, alpha=8))


def _batch(B=2):
    x0 = torch.randn(B, 16, 2, 4, 4)
    y = torch.randn(B, 1, 5, 32)
    return x0, y, torch.rand(B) * 0.8 + 0.1, torch.randn(x0.shape)


def test_fuse_and_unfuse_keep_a_float64_dit_in_float64(tmp_path):
    """``fuse_lora`` / ``unfuse_lora`` computed ``W.float() + delta`` on every weight dtype: on a float64 DiT
    (a dtype load_lora and the loader accept) the weights were rounded to float32, the fused ones 2.5e-8 off
    the fp64 merge and the unfused ones 3e-8 off the originals (about 3e8 fp64 ulps; documented: within 1 ulp
    of the weight dtype). Now the merge runs in float64 there."""
    cfg = tiny_config(attn_backend="torch")
    sd = random_state_dict(cfg, seed=1)
    path = os.fspath(tmp_path / "a.safetensors")
    lora = write_longcat_lora(path, cfg, seed=1)
    m = model_from_state_dict(cfg, sd, dtype=torch.float64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_lora(path, "a", multiplier=-1.5)
    m.enable_loras(["a"])
    m.fuse_lora()
    want = lora_merged_state_dict({k: v.double() for k, v in sd.items()}, lora, -1.5)
    for k, v in m.state_dict().items():
        assert v.dtype == torch.float64
        err = float((v - want[k].double()).abs().max())
        assert err <= 1e-14, (k, err)
    m.unfuse_lora()
    for k, v in m.state_dict().items():
        err = float((v - before[k]).abs().max())
        assert err <= 1e-14, (k, err)


def test_a_shift_beside_explicit_sigmas_is_refused():
    """``flow_matching_loss(..., sigmas=s, shift=3.0)`` ignored the shift without a word (it only shapes the
    default sigmas): a loop meaning to train at shifted noise levels trained at the unshifted ones. Now a
    ValueError naming shift; shift 1.0 (the default, no shift) with sigmas still runs."""
    model = _peft_model()
    x0, y, s, noise = _batch()
    with pytest.raises(ValueError, match=r"^shift=3.0 is used only for the default sigmas"):
        tr.flow_matching_loss(model, x0, y, sigmas=s, noise=noise, shift=3.0)
    a = tr.flow_matching_loss(model, x0, y, sigmas=s, noise=noise, shift=1.0)
    b = tr.flow_matching_loss(model, x0, y, sigmas=s, noise=noise)
    assert torch.equal(a, b)


@pytest.mark.parametrize("noise", ["list", "array"])
def test_noise_that_is_not_a_tensor_is_named(noise):
    """``noise=<list>`` failed with ``AttributeError: 'list' object has no attribute 'shape'``; now a TypeError
    naming noise."""
    model = _peft_model()
    x0, y, s, n = _batch()
    bad = n.tolist() if noise == "list" else n.numpy()
    with pytest.raises(TypeError, match=r"^noise: expected a Tensor"):
        tr.flow_matching_loss(model, x0, y, sigmas=s, noise=bad)


def test_a_distill_pipeline_enables_the_cfg_step_lora_it_was_given_loaded(tmp_path):
    """``VideoContinuationPipeline(dit, ..., mode="distill")`` with the cfg-step LoRA loaded under
    ``"cfg_step_lora"`` (what the docstring asks for) left it disabled: the 16-step distill schedule at
    guidance 1 ran on the base model without a word. Now it is enabled as ``set_mode("distill")`` does; one
    already enabled (and fused) is left as it is."""
    from longcat_vc.lora import fused_loras
    from longcat_vc.pipeline import CFG_STEP_LORA, VideoContinuationPipeline
    from tiny_ckpt import LORA_TARGETS_CFG_STEP
    from vc_components import build_text_encoder, build_tokenizer, build_vae

    cfg = tiny_config(attn_backend="torch")
    path = os.fspath(tmp_path / "cfg_step_lora.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_CFG_STEP)
    parts = (build_vae(), build_text_encoder(), build_tokenizer(os.fspath(tmp_path / "tok")), {"shift": 12.0})
    dit = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    dit.load_lora(path, CFG_STEP_LORA)
    VideoContinuationPipeline(dit, *parts, mode="distill")
    assert dit.active_loras == [CFG_STEP_LORA]
    dit.fuse_lora()
    VideoContinuationPipeline(dit, *parts, mode="distill")
    assert dit.active_loras == [CFG_STEP_LORA] and fused_loras(dit) == [CFG_STEP_LORA]
    plain = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))  # e.g. merged weights: runs as it is
    VideoContinuationPipeline(plain, *parts, mode="distill")
    assert plain.active_loras == []
    basic = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    basic.load_lora(path, CFG_STEP_LORA)
    VideoContinuationPipeline(basic, *parts, mode="basic")
    assert basic.active_loras == []


def test_a_lora_folder_is_named_as_a_folder(tmp_path):
    """``dit.load_lora("<root>/lora/distilled", ...)`` (FastVideo's converter writes each LoRA into such a folder,
    and its scripts pass the folder) said "LoRA file not found" for a path that exists. Now an
    IsADirectoryError naming the .safetensors file(s) in it; a missing path is still FileNotFoundError."""
    cfg = tiny_config(attn_backend="torch")
    folder = tmp_path / "distilled"
    folder.mkdir()
    write_longcat_lora(os.fspath(folder / "cfg_step_lora.safetensors"), cfg)
    dit = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    with pytest.raises(IsADirectoryError, match=r"is a folder; pass the .safetensors file in it \(found: "
                                                 r"cfg_step_lora.safetensors\)"):
        dit.load_lora(folder, "distilled")
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        dit.load_lora(tmp_path / "missing.safetensors", "distilled")
    assert dit.lora_names == []
    dit.load_lora(folder / "cfg_step_lora.safetensors", "distilled")
