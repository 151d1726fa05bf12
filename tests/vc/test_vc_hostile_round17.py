"""Hostile-user round 17: state that leaked between refinement calls, and a refinement run's timing summary.
Each test fails on the code before its fix.

- ``pipe.refinement_lora_path`` pointed at another file (or the file rewritten, e.g. by
  ``save_longcat_lora(..., overwrite=True)`` after more training) after a first ``refine``: the LoRA
  loaded by that first call stayed in use, without a word.
- ``continue --refine``: the last timing summary, unlabelled, gave as the run's total only the
  refinement's (load + refinement + write), the 480p stage left out.
"""

from __future__ import annotations

import os

import pytest
import torch

from vc_components import TEXT_DIM, random_frames, write_refinement_lora

SIZE = (64, 64)


def _refine(pipe, **kw):
    return pipe.refine(random_frames(5, 36, 64, 1), "a cat", video=random_frames(12, 40, 72, 2), num_cond_frames=5,
                       resolution=SIZE, generator=3, output_type="latent", progress=False, **kw).latents


def _other_lora(folder, seed):
    from tiny_ckpt import tiny_config

    os.makedirs(folder, exist_ok=True)
    return write_refinement_lora(str(folder), tiny_config(caption_channels=TEXT_DIM), seed=seed)


def test_a_new_refinement_lora_path_is_used_after_a_first_refine(refine_ckpt, tmp_path):
    from longcat_vc.pipeline import VideoContinuationPipeline

    def fresh():
        return VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                         attn_backend="torch", progress=False)

    other = _other_lora(tmp_path / "other", seed=99)
    ref_pipe = fresh()
    ref_pipe.refinement_lora_path = other
    expected = _refine(ref_pipe)

    pipe = fresh()
    first = _refine(pipe)  # loads the checkpoint's refinement LoRA
    assert not torch.equal(first, expected)
    pipe.refinement_lora_path = other
    assert torch.equal(_refine(pipe), expected)  # was the first call's LoRA again

    # the same path rewritten with another adapter (more training, saved with overwrite=True)
    _other_lora(tmp_path / "other", seed=5)
    st = os.stat(other)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rewritten = _refine(pipe)
    assert not torch.equal(rewritten, expected)
    ref_pipe2 = fresh()
    ref_pipe2.refinement_lora_path = other
    assert torch.equal(rewritten, _refine(ref_pipe2))

    # a LoRA the user loads under the name by hand (check_refine_lora's advice) is kept while the path and its
    # file stay as they were
    pipe.dit.load_lora(os.path.join(refine_ckpt, "lora", "refinement_lora.safetensors"), "refinement_lora")
    assert torch.equal(_refine(pipe), first)
    assert "refinement_lora" not in pipe.dit.active_loras  # the previous LoRA state is restored

    # a path to a file that no longer exists is named, before any work
    pipe.refinement_lora_path = str(tmp_path / "gone.safetensors")
    from longcat_vc.loading import CheckpointError

    with pytest.raises(CheckpointError, match=r"refinement LoRA file not found: .*gone\.safetensors"):
        _refine(pipe)


def test_a_refinement_lora_reload_restores_the_fused_state_before_it(refine_ckpt, tmp_path):
    """The state to restore is read before the reload: replacing the active (fused) adapter of that name unfuses
    the model, and read after it, the state restored was 'not fused'."""
    from longcat_vc.lora import fused_loras
    from longcat_vc.pipeline import VideoContinuationPipeline

    pipe = VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                     attn_backend="torch", progress=False)
    _refine(pipe)  # loads the checkpoint's refinement LoRA
    pipe.dit.enable_loras(["refinement_lora"])
    pipe.dit.fuse_lora()
    pipe.refinement_lora_path = _other_lora(tmp_path / "other", seed=99)
    _refine(pipe)  # reloads it from the other file
    assert pipe.dit.active_loras == ["refinement_lora"]
    assert fused_loras(pipe.dit) == ["refinement_lora"]


def test_a_failed_refinement_lora_reload_restores_the_state_before_it(refine_ckpt, tmp_path, monkeypatch):
    """A reload that fails after replacing the active (fused) adapter, which unfuses the model, gets the previous
    LoRA/fuse state back: the reload ran before the block that restores it."""
    from longcat_vc.loading import CheckpointError
    from longcat_vc.lora import fused_loras
    from longcat_vc.pipeline import VideoContinuationPipeline

    pipe = VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                     attn_backend="torch", progress=False)
    _refine(pipe)  # loads the checkpoint's refinement LoRA
    pipe.dit.enable_loras(["refinement_lora"])
    pipe.dit.fuse_lora()
    weights = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    pipe.refinement_lora_path = _other_lora(tmp_path / "other", seed=99)

    def failing_load(path, name):
        pipe.dit.disable_loras()  # what replacing the active adapter does first
        raise OSError("disk gone")

    monkeypatch.setattr(pipe.dit, "load_lora", failing_load)
    with pytest.raises(CheckpointError, match="failed to load the refinement LoRA"):
        _refine(pipe)
    assert pipe.dit.active_loras == ["refinement_lora"]
    assert fused_loras(pipe.dit) == ["refinement_lora"]
    for k, v in pipe.dit.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=1e-6, atol=1e-6)


def test_cli_continue_refine_summary_total_counts_both_stages(tmp_path, capsys, monkeypatch):
    """``continue --refine`` printed the refinement's summary as the run's last, unlabelled "timings (s): ...
    total T" line, T = load + refinement + write: the 480p stage (most of the run) was left out. The refine is a
    spy whose timings say it took 50 s, stage 1 one that took 30 s."""
    import re

    from longcat_vc.cli import main
    from longcat_vc.pipeline import VideoContinuationPipeline, VideoContinuationOutput
    from longcat_vc.video_io import write_video
    from vc_components import write_refine_checkpoint

    ck = str(tmp_path / "ckpt")
    write_refine_checkpoint(ck)
    vid = str(tmp_path / "in.mp4")
    write_video(vid, random_frames(15, 32, 64, 4), fps=15)

    def stage1(self, video, prompt, negative_prompt=None, **kw):
        return VideoContinuationOutput(random_frames(19, 32, 64), None, 15.0, 15, 4, (32, 64),
                                       {"total": 30.0, "steps": 1, "denoise": 29.0}, model_frames=random_frames(9, 32, 64))

    def spy(self, stage1, prompt="", **kw):
        return VideoContinuationOutput(stage1.frames, None, 30.0, 15, 4, (64, 128),
                                       {"total": 50.0, "steps": 5, "denoise": 45.0})

    monkeypatch.setattr(VideoContinuationPipeline, "__call__", stage1)
    monkeypatch.setattr(VideoContinuationPipeline, "refine", spy)
    out = str(tmp_path / "out.mp4")
    rc = main(["continue", vid, "--prompt", "a cat", "--checkpoint", ck, "--out", out, "--device", "cpu", "--dtype",
               "fp32", "--attn-backend", "torch", "--no-progress", "--frames", "9", "--cond-frames", "5", "--steps",
               "1", "--resolution", "32x64", "--refine", "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "timings (s):" in ln]
    assert len(lines) == 2 and lines[0].startswith("stage 1 (480p) ")
    load = float(re.search(r"load ([0-9.]+)", lines[0]).group(1))
    assert float(re.search(r"total ([0-9.]+)", lines[0]).group(1)) == pytest.approx(load + 30, abs=0.02)
    assert lines[1].startswith("refine (720p) ")  # was unlabelled, as if it summed up the run
    final_total = float(re.search(r"total ([0-9.]+)", lines[1]).group(1))
    assert final_total >= load + 30 + 50 - 0.02  # was load + 50 + write: the 480p stage left out
