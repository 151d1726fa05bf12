"""Round 46 (state shared between models and pipelines).

* two ``LongCatDiT`` built from one ``DiTConfig`` object shared it: ``dit.config.enable_bsa = True`` (or a
  pipeline's ``use_bsa``, refine's BSA switch) on one switched the other model too. Each model now owns a
  copy of the config it was built with (as diffusers' ``ConfigMixin`` models do).
* two pipelines on one DiT in different modes: the LoRA state one set (``set_mode``, construction) was the
  one the other's next call ran with. Each call now runs with its own pipeline's LoRA state; a switch that
  would need a fused LoRA un/fused on every call is refused.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from longcat_vc.pipeline import CFG_STEP_LORA, VideoContinuationPipeline
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config
from vc_components import full_checkpoint_in, tiny_vc_latents, tiny_vc_video


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return full_checkpoint_in(tmp_path_factory, "ckpt46")


_video, _run = tiny_vc_video, tiny_vc_latents


def _other(pipe, mode):
    return VideoContinuationPipeline(pipe.dit, pipe.vae, pipe.text_encoder, pipe.tokenizer, {"shift": pipe.shift},
                                     mode=mode)


def test_two_models_built_from_one_config_do_not_share_it():
    """``a = LongCatDiT(cfg); b = LongCatDiT(cfg)``: ``a.config.enable_bsa = True`` switched block-sparse
    attention on in ``b`` too (both held the same object), so ``b``'s output changed without a word."""
    from longcat_vc.dit import LongCatDiT

    cfg = tiny_config(attn_backend="torch", bsa_params={"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2]})
    a, b = LongCatDiT(cfg, device="meta"), LongCatDiT(cfg, device="meta")
    a.config.enable_bsa = True
    a.config.bsa_params["sparsity"] = 0.75
    assert b.config.enable_bsa is False and b.config.bsa_params["sparsity"] == 0.5
    assert cfg.enable_bsa is False and cfg.bsa_params["sparsity"] == 0.5
    # the model's own switch still works on the forward
    sd = random_state_dict(cfg)
    m1, m2 = model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)
    x = torch.randn(1, 16, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.randn(1, 1, 5, cfg.caption_channels, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500.0])
    with torch.no_grad():
        dense = m2(x, t, y)
        m1.config.enable_bsa = True
        sparse = m1(x, t, y)
        again = m2(x, t, y)
    assert not torch.allclose(sparse, dense)
    torch.testing.assert_close(again, dense, rtol=0, atol=0)


def test_second_pipeline_mode_does_not_leak_into_the_first(ckpt):
    """A basic pipeline and a distill one on one DiT: the distill pipeline's construction enabled the
    cfg-step LoRA, and the basic pipeline's next call ran with it (rel. L2 of its latents 0.17)."""
    basic = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="basic",
                                                      attn_backend="torch")
    ref_basic = _run(basic)
    basic.dit.load_lora(f"{ckpt}/lora/cfg_step_lora.safetensors", CFG_STEP_LORA)
    assert basic.dit.active_loras == []
    distill = _other(basic, "distill")  # enables the loaded cfg-step LoRA
    ref_distill = _run(distill)
    assert not torch.allclose(ref_distill, ref_basic)
    torch.testing.assert_close(_run(basic), ref_basic, rtol=0, atol=0)
    torch.testing.assert_close(_run(distill), ref_distill, rtol=0, atol=0)
    distill.set_mode("distill")
    torch.testing.assert_close(_run(basic), ref_basic, rtol=0, atol=0)
    assert basic.dit.active_loras == []
    torch.testing.assert_close(_run(distill), ref_distill, rtol=0, atol=0)
    assert distill.dit.active_loras == [CFG_STEP_LORA]


def test_basic_pipeline_on_a_distill_pipelines_dit_runs_without_the_lora(ckpt):
    """``VideoContinuationPipeline(distill_pipe.dit, ..., mode="basic")`` ran its calls with the cfg-step
    LoRA the distill pipeline enabled (basic mode runs no LoRA); the distill pipeline keeps it."""
    distill = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="distill",
                                                        attn_backend="torch")
    ref_distill = _run(distill)
    alone = copy.deepcopy(distill.dit)
    alone.disable_loras()
    ref_basic = _run(VideoContinuationPipeline(alone, distill.vae, distill.text_encoder, distill.tokenizer,
                                               {"shift": distill.shift}, mode="basic"))
    basic = _other(distill, "basic")
    torch.testing.assert_close(_run(basic), ref_basic, rtol=0, atol=0)
    torch.testing.assert_close(_run(distill), ref_distill, rtol=0, atol=0)
    torch.testing.assert_close(_run(basic), ref_basic, rtol=0, atol=0)


def test_a_fused_lora_that_another_pipeline_cannot_run_with_is_refused(ckpt):
    """A basic pipeline built on the DiT of a distill pipeline with the LoRA fused into the weights ran with
    it; un/fusing on every switch is not exact (bf16: 1 ulp per round trip): refused, naming the fix."""
    distill = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="distill",
                                                        attn_backend="torch", fuse_lora=True)
    with pytest.raises(ValueError, match="fused"):
        _other(distill, "basic")
    _other(distill, "distill")  # the same state: fine
    basic = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="basic",
                                                      attn_backend="torch")
    other = _other(basic, "basic")
    other.set_mode("distill", lora_path=f"{ckpt}/lora/cfg_step_lora.safetensors", fuse_lora=True)
    with pytest.raises(RuntimeError, match="fused"):
        _run(basic)
    basic.set_mode("basic")  # taking the DiT back explicitly works
    _run(basic)


def test_two_pipelines_on_one_dit_refine_with_their_own_refinement_lora(tmp_path):
    """Two pipelines on one DiT, each with its own ``refinement_lora_path``: the second's refine found the
    DiT's ``refinement_lora`` (the first pipeline's file) loaded, took it for one loaded by hand and refined
    with the other file's LoRA without a word. Which file the DiT's refinement LoRA came from is now
    recorded on the DiT, so each pipeline's refine loads its own file where the DiT holds another."""
    from vc_components import write_refine_checkpoint, write_refinement_lora

    root = str(tmp_path / "ckpt")
    cfg = write_refine_checkpoint(root)
    other_file = write_refinement_lora(str(tmp_path / "other"), cfg, seed=99)
    a = VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                  progress=False)
    b = _other(a, "basic")
    b.refinement_lora_path = other_file
    s1 = np.random.default_rng(2).integers(0, 256, (6, 36, 64, 3), dtype=np.uint8)
    kw = dict(num_cond_frames=0, resolution=(64, 64), spatial_refine_only=True, num_inference_steps=2, generator=3,
              progress=False, output_type="latent")

    def alone(path):
        dit = copy.deepcopy(a.dit)
        p = VideoContinuationPipeline(dit, a.vae, a.text_encoder, a.tokenizer, {"shift": a.shift})
        p.refinement_lora_path = path
        return p.refine(s1, "a cat", **kw).latents

    ref_a, ref_b = alone(a.refinement_lora_path), alone(other_file)
    assert not torch.allclose(ref_a, ref_b)
    torch.testing.assert_close(a.refine(s1, "a cat", **kw).latents, ref_a, rtol=0, atol=0)
    torch.testing.assert_close(b.refine(s1, "a cat", **kw).latents, ref_b, rtol=0, atol=0)
    torch.testing.assert_close(a.refine(s1, "a cat", **kw).latents, ref_a, rtol=0, atol=0)


def test_a_pipeline_built_on_a_streaming_dit_records_a_streaming_memory_mode(ckpt):
    """A second pipeline built on the DiT of a ``memory="balanced"`` one recorded ``memory == "resident"``
    while the DiT's blocks streamed: refine's fit check estimated the whole DiT resident, and
    ``apply_memory_mode(pipe, "resident")`` moved the streamed blocks under the attached hooks instead of
    refusing the switch (as it does for the pipeline that streams)."""
    pytest.importorskip("accelerate")
    from longcat_vc.memory import apply_memory_mode

    a = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                  memory="balanced", progress=False)
    b = _other(a, "basic")
    assert b.memory == "balanced"
    with pytest.raises(ValueError, match="switching to 'resident' needs a fresh"):
        apply_memory_mode(b, "resident", "cpu")
    torch.testing.assert_close(_run(b), _run(a), rtol=0, atol=0)
