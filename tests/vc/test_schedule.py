"""vc_timesteps against SPEC 7's numbers and an independent longhand derivation."""

import json
import math

import numpy as np
import pytest
import torch

from longcat_vc.schedule import cfg_zero, euler_step, read_scheduler_config, shift_sigmas, vc_timesteps


def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def test_enhance_hf_shift12_gives_56_steps():
    t, s = vc_timesteps(50, 12.0, "enhance_hf")
    assert t.dtype == torch.float32 and s.dtype == torch.float32
    assert len(t) == 56 and len(s) == 57
    # 46 shifted base steps above 500, then 500, 450, ..., 50.
    tail = torch.arange(500, 0, -50, dtype=torch.float32)
    assert torch.equal(t[-10:], tail)
    assert bool((t[:46] > 500).all())
    assert t[0].item() == 1000.0
    assert torch.allclose(s[:-1], t / 1000) and s[-1].item() == 0.0
    # longhand, in float64: base i/49 grid
    for i in range(46):
        base = 1 - i * 0.999 / 49
        assert abs(t[i].item() - 1000 * _shift(base, 12)) < 1e-3
    assert bool((t[1:] < t[:-1]).all())


def test_distill_16_steps_end_near_510_6():
    t, s = vc_timesteps(16, 12.0, "distill")
    assert len(t) == 16 and len(s) == 17
    idx = [math.floor(i * 50 / 16) for i in range(16)]
    expected = [1000 * _shift((1000 - 20 * k) / 1000, 12.0) for k in idx]
    np.testing.assert_allclose(t.numpy(), np.array(expected), rtol=0, atol=2e-3)
    assert abs(t[-1].item() - 510.638) < 1e-2
    assert t[0].item() == 1000.0
    assert s[-1].item() == 0.0
    assert torch.allclose(s[:-1] * 1000, t)


def test_plain_schedule_and_shift_one_is_linear():
    t, s = vc_timesteps(50, 1.0, "plain")
    assert torch.allclose(t, torch.linspace(1000, 1, 50), atol=1e-3)
    t12, _ = vc_timesteps(7, 12.0, "plain")
    base = torch.linspace(1, 0.001, 7)
    assert torch.allclose(t12, 1000 * shift_sigmas(base, 12.0))
    assert len(t12) == 7


@pytest.mark.parametrize("steps", [1, 3, 8, 13, 25, 50])
def test_distill_any_count(steps):
    t, s = vc_timesteps(steps, 12.0, "distill")
    assert len(t) == steps and bool((t[1:] < t[:-1]).all()) and t[0].item() == 1000.0


def test_enhance_hf_shift1_keeps_fewer_steps():
    # shift 1: linear 1000..1, about half of the 50 are above 500.
    t, _ = vc_timesteps(50, 1.0, "enhance_hf")
    n_kept = int((torch.linspace(1, 0.001, 50) * 1000 > 500).sum())
    assert len(t) == n_kept + 10


@pytest.mark.parametrize(
    "args, exc",
    [
        ((0, 12.0, "plain"), ValueError),
        ((51, 12.0, "distill"), ValueError),
        ((16, 12.0, "bogus"), ValueError),
        ((16, -1.0, "plain"), ValueError),
        ((16.0, 12.0, "plain"), TypeError),
    ],
)
def test_bad_arguments(args, exc):
    with pytest.raises(exc):
        vc_timesteps(*args)


def test_read_scheduler_config(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"shift": 12.0, "num_train_timesteps": 1000}))
    assert read_scheduler_config(str(tmp_path))["shift"] == 12.0
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        read_scheduler_config(str(tmp_path / "nope"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_scheduler_config(str(tmp_path / "bad.json"))
    (tmp_path / "neg.json").write_text(json.dumps({"shift": -3}))
    with pytest.raises(ValueError, match="shift"):
        read_scheduler_config(str(tmp_path / "neg.json"))


def test_euler_step_fp32():
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    p = torch.randn(2, 3)
    out = euler_step(x, p, 0.8, 0.6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() + 0.2 * p)


def test_cfg_zero_matches_longhand():
    torch.manual_seed(0)
    u = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64)
    c = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64)
    g = 4.0
    out = cfg_zero(u, c, g)
    for b in range(2):
        st = float((c[b] * u[b]).sum() / ((u[b] ** 2).sum() + 1e-8))
        ref = u[b] * st + g * (c[b] - u[b] * st)
        torch.testing.assert_close(out[b], ref)
    # guidance 1 returns cond exactly (up to rounding)
    torch.testing.assert_close(cfg_zero(u, c, 1.0), c)
