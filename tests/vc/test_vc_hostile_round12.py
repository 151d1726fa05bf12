"""Hostile-user round 12: extend, video_io and the schedule at their edges.

* a scheduler shift outside what fp32 holds (1e39, 1e-50, 1e-7) gave NaN / infinite / off sigmas; the
  enhance_hf schedule then dropped the NaN timesteps without a word and denoised from pure noise at
  timestep 500, returning a half-noisy video.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from longcat_vc.schedule import check_scheduler_config, read_scheduler_config, vc_timesteps


@pytest.mark.parametrize("shift", [1e39, 1e-50, 1e-7])
@pytest.mark.parametrize("mode", ["enhance_hf", "plain", "distill"])
def test_shift_outside_fp32_range_is_refused_not_nan(shift, mode):
    with pytest.raises(ValueError, match="^" + re.escape(f"vc_timesteps: shift={shift!r} gives wrong sigmas in fp32")):
        vc_timesteps(16, shift, mode)


@pytest.mark.parametrize("shift", [True, "12"])
def test_shift_of_another_type_is_refused(shift):
    # True ran as shift 1.0, "12" as 12.0, without a word
    with pytest.raises(TypeError, match=r"^vc_timesteps: shift must be a positive finite number"):
        vc_timesteps(16, shift, "plain")


def test_scheduler_config_with_an_fp32_overflowing_shift_is_refused(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"shift": 1e39, "num_train_timesteps": 1000}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: 'shift'=1e\+39 gives wrong sigmas"):
        read_scheduler_config(str(tmp_path))
    with pytest.raises(ValueError, match=r"^cfg: 'shift'=1e-07 gives wrong sigmas"):
        check_scheduler_config({"shift": 1e-7}, "cfg")


@pytest.mark.parametrize("shift", [1e-4, 0.01, 1.0, 12.0, 3e38])
def test_shifts_fp32_can_hold_still_work(shift):
    for mode in ("enhance_hf", "plain", "distill"):
        t, s = vc_timesteps(16, shift, mode)
        assert torch.isfinite(s).all() and (t > 0).all() and abs(float(s[0]) - 1) < 1e-3


# ---- extend / __call__ on the tiny real VAE / UMT5 with the DiT's interface twin

import warnings  # noqa: E402

import numpy as np  # noqa: E402

from vc_components import StandInDiT, build_text_encoder, build_tokenizer, build_vae  # noqa: E402

SIZE = (32, 48)
RUN = dict(resolution=SIZE, num_inference_steps=2, guidance_scale=1.0, progress=False)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from longcat_vc.pipeline import VideoContinuationPipeline

    tok = build_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer"))
    return VideoContinuationPipeline(StandInDiT().eval(), build_vae(), build_text_encoder(), tok, {"shift": 12.0})


def _video(n=9, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("call", ["__call__", "extend"])
def test_rounded_num_frames_error_names_the_given_value_and_warns_at_the_callers_line(pipe, call):
    # num_frames=7 rounds to 5 == num_cond_frames: the error said "num_frames (5)", a value never passed,
    # and the rounding warning pointed into torch/utils/_contextlib.py (torch.no_grad's wrapper)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"^num_frames \(7, rounded down to 4k\+1: 5\) must be greater than "
                                             r"num_cond_frames \(5\)"):
            getattr(pipe, call)(_video(), "a cat", num_frames=7, num_cond_frames=5, **RUN)
    rounding = [x for x in w if "rounding down" in str(x.message)]
    assert len(rounding) == 1 and rounding[0].filename == __file__, [(str(x.message), x.filename) for x in w]


@pytest.mark.parametrize("prompts,got", [(["a cat", None], r"prompts\[1\] is NoneType None"),
                                         (("a cat", b"a dog"), r"prompts\[1\] is bytes b'a dog'"),
                                         ([], r"got list \(empty\)"), (None, "got NoneType")])
def test_extend_names_the_bad_prompt_entry(pipe, prompts, got):
    with pytest.raises(TypeError, match=rf"^prompts must be a str or a non-empty list of str; {got}$"):
        pipe.extend(_video(), prompts, num_frames=13, num_cond_frames=5, **RUN)


# ---- video_io: refused frames say what they are

from longcat_vc.video_io import as_video_frames  # noqa: E402


def test_non_uint8_frame_tensor_is_refused_naming_its_dtype():
    # bf16 failed inside .numpy() ("Got unsupported ScalarType BFloat16"), naming no argument
    with pytest.raises(TypeError, match=r"^clip: frame tensor must be uint8 \[F, H, W, 3\], got dtype torch.bfloat16"):
        as_video_frames(torch.zeros(2, 8, 8, 3, dtype=torch.bfloat16), name="clip")
    assert as_video_frames(torch.zeros(2, 8, 8, 3, dtype=torch.uint8)).num_frames == 2


@pytest.mark.parametrize("frame,what", [
    (np.zeros((8, 8, 4), np.uint8), r"ndarray of dtype uint8 and shape \(8, 8, 4\)"),
    (np.zeros((8, 8, 3), np.float32), r"ndarray of dtype float32 and shape \(8, 8, 3\)"),
    (torch.zeros(8, 8, 3, dtype=torch.uint8), r"Tensor of dtype torch.uint8 and shape \(8, 8, 3\)"),
])
def test_refused_list_frame_names_its_dtype_and_shape(frame, what):
    # the message said only "got ndarray": the RGBA / float frame looked like the accepted kind
    with pytest.raises(TypeError, match=rf"^video\[0\]: expected a PIL image or a uint8 \[H, W, 3\] array, got {what}$"):
        as_video_frames([frame])
