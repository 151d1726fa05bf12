"""Where longcat_vc.schedule and diffusers' FlowMatchEulerDiscreteScheduler agree, and where they
do not (the reason schedule.py keeps its own; see its module docstring)."""

from __future__ import annotations

import pytest
import torch

from longcat_vc.schedule import _base_sigmas, euler_step, vc_timesteps

diffusers = pytest.importorskip("diffusers")


def _scheduler(shift: float):
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("mode,steps", [("plain", 50), ("plain", 7), ("distill", 16), ("distill", 50), ("distill", 1)])
def test_plain_and_distill_equal_diffusers_custom_sigmas(mode, steps):
    t, s = vc_timesteps(steps, 12.0, mode)
    sch = _scheduler(12.0)
    sch.set_timesteps(sigmas=_base_sigmas(steps, mode, 1000).numpy())
    assert torch.equal(sch.sigmas, s) and torch.equal(sch.timesteps, t)


def test_enhance_hf_is_not_expressible_with_a_shifted_scheduler():
    t, s = vc_timesteps(50, 12.0, "enhance_hf")
    sch = _scheduler(12.0)
    sch.set_timesteps(sigmas=s[:-1].numpy())  # diffusers shifts what it is given a second time
    assert len(sch.timesteps) == len(t)
    assert not torch.allclose(sch.timesteps, t, atol=1.0)
    tail = sch.timesteps[-10:]
    assert bool((tail > t[-10:] + 1).all())  # the unshifted 500 .. 50 tail comes out shifted up


def test_euler_step_equals_diffusers_in_fp32_but_diffusers_rounds_bf16_latents():
    t, s = vc_timesteps(16, 12.0, "distill")
    sch = _scheduler(12.0)
    sch.set_timesteps(sigmas=_base_sigmas(16, "distill", 1000).numpy())
    x32 = torch.randn(2, 3, 5)
    x_lib = x32.clone()
    for i in range(16):
        pred = torch.randn(2, 3, 5)
        x32 = euler_step(x32, pred, s[i].item(), s[i + 1].item())
        x_lib = sch.step(-pred, sch.timesteps[i], x_lib, return_dict=False)[0]
        assert torch.isfinite(x32).all()
    torch.testing.assert_close(x_lib, x32, rtol=1e-6, atol=1e-6)

    sch.set_timesteps(sigmas=_base_sigmas(16, "distill", 1000).numpy())
    xb, pb = torch.randn(2, 3, 5, dtype=torch.bfloat16), torch.randn(2, 3, 5, dtype=torch.bfloat16)
    ours = euler_step(xb, pb, s[0].item(), s[1].item())
    lib = sch.step(-pb, sch.timesteps[0], xb, return_dict=False)[0]
    assert ours.dtype == torch.float32 and lib.dtype == torch.bfloat16
    # the same step, but computed partly in bf16 and rounded to bf16 by diffusers
    torch.testing.assert_close(lib.float(), ours, rtol=2e-2, atol=2e-2)
    assert not torch.equal(lib.float(), ours)
