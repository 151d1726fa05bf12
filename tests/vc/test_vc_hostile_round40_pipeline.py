"""Round 40: the VC pipeline end to end on the tiny real checkpoint (progress bars, the refinement of a
continuation run at an explicit resolution)."""

import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from longcat_vc.pipeline import VideoContinuationPipeline  # noqa: E402
from longcat_vc.video_io import VideoFrames  # noqa: E402
from vc_components import random_frames, write_refine_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt40"))
    write_refine_checkpoint(root)
    return root


@pytest.fixture(scope="module")
def pipe(ckpt):
    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", progress=False)


def test_from_pretrained_progress_false_shows_no_loading_bar(ckpt, capfd):
    """from_pretrained(progress=False) still drew transformers' "Loading weights" bar (the text encoder's load)
    on stderr; progress=False now silences the libraries' loading bars too (and leaves their setting as it was)."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    capfd.readouterr()
    VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", progress=False)
    err = capfd.readouterr().err
    assert "%|" not in err and "Loading" not in err, err
    assert tlog.is_progress_bar_enabled() == was


def test_refine_of_a_continuation_at_an_explicit_resolution_of_another_aspect(pipe):
    """A continuation run at an explicit resolution of another aspect than its input (a square 48x48 for a
    16:9 clip) could not be refined with its own input video: refine() refused it as "not the same clip?"
    (stage-1 frames map to another 720p bucket than the video). The stage-1 output carries its input frames,
    which match the video's size: the refinement now runs at the stage-1 frames' bucket, as upstream's
    generate_refine picks it (and as the CLI's continue --refine passes it)."""
    vf30 = VideoFrames(random_frames(24, 36, 64, seed=3), 30.0)
    kw = dict(num_frames=9, num_cond_frames=5, num_inference_steps=1, guidance_scale=1.0, generator=1, progress=False)
    out = pipe(vf30, "a cat", resolution=(48, 48), **kw)
    assert out.frames.shape[1:3] == (36, 64) and out.size == (48, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny grids' block-sparse gating warnings
        r = pipe.refine(out, "a cat", video=vf30, num_inference_steps=2, progress=False, output_type="latent")
    assert r.size == (960, 960)  # refine_bucket(48, 48)
    # a clip of another size is still refused
    other = VideoFrames(random_frames(24, 64, 36, seed=4), 30.0)
    with pytest.raises(ValueError, match="not the same clip"):
        pipe.refine(out, "a cat", video=other, num_inference_steps=2, progress=False, output_type="latent")
