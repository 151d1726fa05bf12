"""Hostile round 24: the denoising loop's schedule against SPEC 7 and the scheduler config rules.

A second-hand ``scheduler_config.json`` is read from the checkpoint (SPEC 7). Upstream builds
diffusers' ``FlowMatchEulerDiscreteScheduler`` from it, where ``shift_terminal``, ``invert_sigmas``,
``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` change the sigmas and
``stochastic_sampling`` changes the step. Only ``shift`` and ``num_train_timesteps`` were read here,
so such a config ran the plain SPEC schedule without a word (``use_dynamic_shifting`` was already refused).
"""

import json

import pytest
import torch

from longcat_vc.schedule import check_scheduler_config, read_scheduler_config, vc_timesteps

PUBLISHED = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 12.0,
    "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096, "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


def test_published_style_config_with_defaults_is_accepted(tmp_path):
    p = tmp_path / "scheduler_config.json"
    p.write_text(json.dumps(PUBLISHED))
    assert read_scheduler_config(str(tmp_path))["shift"] == 12.0


@pytest.mark.parametrize("field,value", [
    ("shift_terminal", 0.1), ("invert_sigmas", True), ("use_karras_sigmas", True),
    ("use_exponential_sigmas", True), ("use_beta_sigmas", True), ("stochastic_sampling", True),
])
def test_schedule_changing_fields_are_refused(tmp_path, field, value):
    cfg = dict(PUBLISHED, **{field: value})
    with pytest.raises(ValueError, match=field):
        check_scheduler_config(cfg, "scheduler_config.json")
    p = tmp_path / "scheduler_config.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        read_scheduler_config(str(p))


def test_diffusers_really_changes_the_sigmas_for_those_fields():
    """Why they are refused: upstream's scheduler gives other sigmas than vc_timesteps' plain ones."""
    diffusers = pytest.importorskip("diffusers")
    S = diffusers.FlowMatchEulerDiscreteScheduler
    _, ours = vc_timesteps(6, 12.0, "plain")
    base = torch.linspace(1.0, 0.001, 6).numpy()
    for kw in ({"shift_terminal": 0.1}, {"invert_sigmas": True}, {"use_karras_sigmas": True}):
        s = S(shift=12.0, **kw)
        s.set_timesteps(6, sigmas=base)
        assert not torch.allclose(s.sigmas.float(), ours, atol=1e-4), kw
