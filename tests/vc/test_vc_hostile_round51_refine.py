"""Round 51: the 720p refinement (SPEC 11) under the combinations a user tries: another LoRA loaded, fused and
active; an exception mid-call; odd sizes and frame counts; t_thresh and num_cond_frames at their bounds. No bug
was found; these pin the verified behaviour."""

import numpy as np
import pytest
import torch

from longcat_vc.lora import fused_loras
from vc_components import random_frames

R = dict(resolution=(64, 64), num_inference_steps=2, progress=False)


def _seed():
    return int(np.random.default_rng().integers(0, 2 ** 31))


def _state(dit):
    return (dit.active_loras, fused_loras(dit), dit.config.enable_bsa, dit.training,
            {k: v.clone() for k, v in dit.state_dict().items()})


def _same_state(a, b):
    assert a[:4] == b[:4]
    assert set(a[4]) == set(b[4]) and all(torch.equal(a[4][k], b[4][k]) for k in a[4])


def test_state_restored_after_exception_mid_call_with_fused_lora(refine_pipe):
    """A fused, active second LoRA and BSA off before; a DiT forward raising on the 2nd step: the LoRA is active
    and fused again, the weights bit-identical, BSA off, eval mode; and a refine after gives the result of one with no LoRA
    active (to the unfuse's rounding) (the refinement LoRA alone runs)."""
    dit = refine_pipe.dit
    seed = _seed()
    frames = random_frames(3, 40, 70, seed % 1000)
    clean = refine_pipe.refine(frames, generator=seed, **R)
    if "distill51" not in dit.lora_names:
        dit.load_lora(refine_pipe.refinement_lora_path, "distill51", multiplier=0.7)
    dit.enable_loras(["distill51"])
    dit.fuse_lora()
    before = _state(dit)
    orig, calls = dit.forward, [0]

    def boom(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom mid-call")
        return orig(*a, **k)

    dit.forward = boom
    try:
        with pytest.raises(RuntimeError, match="boom mid-call"):
            refine_pipe.refine(frames, generator=seed, **R)
    finally:
        del dit.forward
    _same_state(before, _state(dit))
    again = refine_pipe.refine(frames, generator=seed, **R)
    _same_state(before, _state(dit))
    assert torch.isfinite(again.latents).all()
    # the unfuse restores the base weights within 1 ulp (lora.unfuse_lora), not bitwise
    torch.testing.assert_close(again.latents, clean.latents, rtol=1e-4, atol=1e-4)
    dit.disable_loras()


def test_result_independent_of_prior_lora_and_bsa_state(refine_pipe):
    """The refinement LoRA active together with another, and BSA on, before the call: same result as from the
    plain state, and that state is back after."""
    dit = refine_pipe.dit
    seed = _seed()
    frames = random_frames(3, 40, 70, seed % 1000)
    ref = refine_pipe.refine(frames, generator=seed, **R)
    refine_pipe.refine(frames, generator=seed, **R)  # the LoRA is loaded now
    if "distill51" not in dit.lora_names:
        dit.load_lora(refine_pipe.refinement_lora_path, "distill51", multiplier=0.5)
    dit.enable_loras(["refinement_lora", "distill51"])
    dit.config.enable_bsa = True
    try:
        out = refine_pipe.refine(frames, generator=seed, **R)
        assert dit.active_loras == ["refinement_lora", "distill51"] and dit.config.enable_bsa is True
    finally:
        dit.disable_loras()
        dit.config.enable_bsa = False
    assert torch.isfinite(out.latents).all() and torch.equal(out.latents, ref.latents)


@pytest.mark.parametrize("f1,spatial", [(1, False), (1, True), (14, False), (15, False)])
def test_odd_sizes_and_edge_frame_counts_without_video(refine_pipe, f1, spatial):
    """Frames the pipeline did not produce, 37x53 (no multiple of anything), 1 frame and the counts where the
    noise padding rounds (14, 15): 2F (F) refined frames at the input's size, F64 bucket model frames, finite."""
    seed = _seed()
    out = refine_pipe.refine(random_frames(f1, 37, 53, seed % 1000), generator=seed, spatial_refine_only=spatial, **R)
    n = f1 if spatial else 2 * f1
    assert out.frames.shape == (n, 37, 53, 3) and out.model_frames.shape == (n, 64, 64, 3)
    assert out.num_input_frames == 0 and out.num_new_frames == n and out.fps == (15.0 if spatial else 30.0)
    assert torch.isfinite(out.latents).all() and out.latents.shape[2] % 4 == 0


@pytest.mark.parametrize("t", [1.0 + 1e-9, 0.0, -1e-9])
def test_t_thresh_just_outside_refused_before_work(refine_pipe, t):
    with pytest.raises(ValueError, match="t_thresh"):
        refine_pipe.refine(random_frames(2, 40, 70), t_thresh=t, **R)


def test_t_thresh_one_and_one_step(refine_pipe):
    """t_thresh=1 (pure noise start) with one requested step: finite, deterministic for a seed."""
    seed = _seed()
    fr = random_frames(2, 40, 70, seed % 1000)
    a = refine_pipe.refine(fr, t_thresh=1.0, generator=seed, **{**R, "num_inference_steps": 1})
    b = refine_pipe.refine(fr, t_thresh=1.0, generator=seed, **{**R, "num_inference_steps": 1})
    assert torch.isfinite(a.latents).all() and torch.equal(a.latents, b.latents) and a.timings["steps"] == 1


def test_num_cond_frames_at_the_bound(refine_pipe):
    """num_cond_frames = 2F - 1 refines one frame; = 2F is refused naming it."""
    seed = _seed()
    vid = random_frames(12, 40, 70, seed % 1000)
    out = refine_pipe.refine(random_frames(5, 40, 70, 1), video=vid, num_cond_frames=9, generator=seed, **R)
    assert out.num_new_frames == 1 and out.frames.shape == (13, 40, 70, 3)
    assert np.array_equal(out.frames[:12], vid) and torch.isfinite(out.latents).all()
    with pytest.raises(ValueError, match="num_cond_frames=10"):
        refine_pipe.refine(random_frames(5, 40, 70, 1), video=vid, num_cond_frames=10, **R)


@pytest.mark.parametrize("spatial", [False, True])
def test_extend_refine_restores_a_fused_lora_and_counts_frames(refine_pipe, spatial):
    """extend(refine=True, use_bsa=True) with another LoRA active and fused: 2 segments x 4 new frames refine to
    16 (8 with spatial_refine_only) new frames at 30 (15) fps after the input; LoRA, fuse and BSA state back."""
    dit = refine_pipe.dit
    if "distill51" not in dit.lora_names:
        dit.load_lora(refine_pipe.refinement_lora_path, "distill51", multiplier=0.7)
    dit.enable_loras(["distill51"])
    dit.fuse_lora()
    try:
        before = _state(dit)
        seed = _seed()
        vid = random_frames(17, 64, 64, seed % 1000)
        out = refine_pipe.extend(vid, "x", segments=2, resolution=(64, 64), num_frames=9, num_cond_frames=5,
                                 num_inference_steps=1, guidance_scale=1.0, generator=seed, progress=False,
                                 refine=True, refine_resolution=(64, 64), refine_steps=2, use_bsa=True,
                                 spatial_refine_only=spatial)
        _same_state(before, _state(dit))
    finally:
        dit.disable_loras()
    n_new = 8 if spatial else 16
    assert out.frames.shape == (17 + n_new, 64, 64, 3) and out.num_new_frames == n_new
    assert out.fps == (15.0 if spatial else 30.0) and len(out.timings["refine"]) == 2
    assert np.array_equal(out.frames[:17], vid)
