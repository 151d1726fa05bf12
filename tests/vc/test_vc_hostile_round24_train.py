"""Round 24 (training loss): the velocity target the loss trains is the one the sampler's Euler step
uses, and a prediction that does not have the latents' shape is refused instead of broadcast."""

from __future__ import annotations

import pytest
import torch

from longcat_vc import training as tr
from longcat_vc.schedule import euler_step, vc_timesteps
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config


def test_the_true_velocity_has_zero_loss_and_the_sampler_reaches_x0():
    x0 = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    class Oracle(torch.nn.Module):  # the exact prediction for the one data point x0, from timestep in 0..1000
        def forward(self, x, t, y, m=None):
            return (x0 - x) / (t / 1000).view(-1, 1, 1, 1, 1)

    m = Oracle()
    y = torch.zeros(1, 1, 3, 32)
    for s in (0.05, 0.5, 0.97):
        assert tr.flow_matching_loss(m, x0, y, sigmas=torch.tensor([s])).item() < 1e-10
    ts, sg = vc_timesteps(8, 12.0, "plain")
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(ts):
        x = euler_step(x, m(x, t.view(1), y), sg[i], sg[i + 1])
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("out_channels", [1, 32])
def test_a_dit_whose_output_is_not_shaped_like_the_latents_is_refused(out_channels):
    # out_channels 1 was broadcast against the 16-channel target (only a UserWarning), 32 failed in
    # mse_loss with torch's unnamed "size of tensor a (32) must match ..."
    cfg = tiny_config(attn_backend="torch", out_channels=out_channels)
    dit = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    x0 = torch.randn(1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="out_channels"):
        tr.flow_matching_loss(dit, x0, torch.randn(1, 1, 5, 32))
