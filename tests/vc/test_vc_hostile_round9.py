"""Hostile inputs of the refinement (SPEC 11) found by the ninth audit: each test fails on the code
before its fix.

- The stage-1/video pairing check of ``refine`` compared the 720p bucket of the stage-1 frames with
  the 720p bucket of the video's own aspect ratio. Stage 1 runs at the 480p bucket of the video, and
  for a 16:10 clip (1920x1200: 480p bucket 832x480, whose 720p bucket is 1280x704, while 16:10
  itself maps to 1216x768), 2:1 and other ratios the two differ: ``continue --refine``
  and ``refine`` of a ``--stage1-out`` clip with its own input raised "not the same clip?" after
  the whole 480p stage.
- A streamed model (``BlockStreamer``: memory="low") kept block 0's prefetched copy on the device after
  ``refine`` and after a denoising loop that raised outside a block call.
"""

import numpy as np
import pytest
import torch

from longcat_vc.pipeline import bucket_size
from longcat_vc.refine import refine_bucket, resolve_refine_args


def _frames(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw", [(1200, 1920), (960, 1920), (1560, 1000), (920, 1000)])
def test_refine_accepts_the_stage1_clip_of_its_own_video(hw):
    h, w = hw
    s1 = bucket_size(h, w, "480p")  # the size __call__ / continue ran stage 1 at
    assert refine_bucket(*s1) != refine_bucket(h, w)  # the case: the two 720p buckets differ
    video = _frames(4, h // 10, w // 10)  # the same aspect, smaller (the check reads the ratio only)
    a = resolve_refine_args(None, _frames(3, *s1), video, 2, "720p", False, 0.5, 1, "np")
    assert a["size"] == refine_bucket(*s1) and a["nc"] == 2


def test_refine_still_refuses_a_video_of_another_clip():
    with pytest.raises(ValueError, match="not the same clip"):
        resolve_refine_args(None, _frames(3, 480, 832), _frames(4, 100, 100), 2, "720p", False, 0.5, 1, "np")


def test_cli_continue_refine_at_a_resolution_of_another_aspect(tmp_path, capsys, monkeypatch):
    """``continue --refine --resolution HxW`` of the input's orientation but another aspect (accepted, the
    model runs squashed): the refinement's pairing check refused the run after stage 1, since the stage-1
    frames (HxW) and the input map to other 720p buckets. The CLI knows the pairing and refines at the
    bucket of the stage-1 frames, as upstream's ``generate_refine`` does. The refine is replaced by its
    argument resolution (720p on CPU would take minutes)."""
    from longcat_vc.cli import main
    from longcat_vc.pipeline import VideoContinuationPipeline
    from longcat_vc.video_io import write_video
    from vc_components import write_refine_checkpoint

    ck = str(tmp_path / "ckpt")
    write_refine_checkpoint(ck)
    vid = str(tmp_path / "in.mp4")
    write_video(vid, _frames(15, 32, 64, 4), fps=15)
    seen = {}

    def spy(self, stage1, prompt="", **kw):
        seen.update(resolve_refine_args(self, stage1, kw["video"], kw.get("num_cond_frames"),
                                        kw.get("resolution", "720p"), kw["spatial_refine_only"], kw["t_thresh"], 1,
                                        "np"))
        return stage1

    monkeypatch.setattr(VideoContinuationPipeline, "refine", spy)
    assert refine_bucket(48, 80) not in {refine_bucket(32, 64)} | {refine_bucket(*bucket_size(32, 64, "480p"))}
    out = str(tmp_path / "out.mp4")
    rc = main(["continue", vid, "--prompt", "a cat", "--checkpoint", ck, "--out", out, "--device", "cpu", "--dtype",
               "fp32", "--attn-backend", "torch", "--no-progress", "--frames", "9", "--cond-frames", "5", "--steps",
               "1", "--resolution", "48x80", "--refine", "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert seen["size"] == refine_bucket(48, 80) and seen["nc"] == 10


def _streamed(pipe):
    from longcat_vc.memory import BlockStreamer

    return BlockStreamer(pipe.dit, "cpu", pin=False).attach()


def test_refine_releases_the_streamed_blocks(refine_pipe):
    """A streamed refinement left block 0's prefetched copy loaded through the decode and after the call
    (``__call__`` released it; ``refine`` did not)."""
    streamer = _streamed(refine_pipe)
    try:
        out = refine_pipe.refine(_frames(5, 36, 64, 1), "a cat", video=_frames(12, 40, 72, 2), num_cond_frames=5,
                                 resolution=(64, 64), generator=3, output_type="latent", progress=False)
        assert torch.isfinite(out.latents).all()
        assert streamer._loaded == {}
    finally:
        streamer.detach()


@pytest.mark.parametrize("stage", ["continue", "refine"])
def test_denoising_error_outside_a_block_releases_the_streamed_blocks(refine_pipe, monkeypatch, stage):
    """An error in the loop outside a block call (here the final layer, as an out-of-memory there) left the
    prefetched block 0 on the device until the next call."""
    streamer = _streamed(refine_pipe)
    calls = []
    real = type(refine_pipe.dit.final_layer).forward

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the final layer")
        return real(self, *a, **k)

    monkeypatch.setattr(type(refine_pipe.dit.final_layer), "forward", failing)
    try:
        with pytest.raises(RuntimeError, match="boom in the final layer"):
            if stage == "refine":
                refine_pipe.refine(_frames(5, 36, 64, 1), "a cat", video=_frames(12, 40, 72, 2), num_cond_frames=5,
                                   resolution=(64, 64), generator=3, output_type="latent", progress=False)
            else:
                refine_pipe(_frames(5, 36, 64, 1), "a cat", num_frames=9, num_cond_frames=5, resolution=(32, 32),
                            num_inference_steps=3, generator=3, output_type="latent", progress=False)
        assert len(calls) == 2 and streamer._loaded == {}
    finally:
        streamer.detach()
