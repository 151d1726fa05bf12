"""Round 40: the VC pipeline end to end on the tiny real checkpoint (progress bars, the refinement of a
continuation run at an explicit resolution, extend's cond frames)."""

import numpy as np
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
    from longcat_vc.refine import resolve_refine_args

    vf30 = VideoFrames(random_frames(24, 36, 64, seed=3), 30.0)
    kw = dict(num_frames=9, num_cond_frames=5, num_inference_steps=1, guidance_scale=1.0, generator=1, progress=False)
    out = pipe(vf30, "a cat", resolution=(48, 48), **kw)
    assert out.frames.shape[1:3] == (36, 64) and out.size == (48, 48)
    # refine()'s checks (the 960x960 refinement itself is minutes on a CPU)
    a = resolve_refine_args(pipe, out, vf30, None, "720p", False, 0.5, 2, "latent")
    assert a["size"] == (960, 960) and a["nc"] == 10 and a["out_size"] == (36, 64)  # refine_bucket(48, 48)
    # a clip of another size is still refused, before any model work
    other = VideoFrames(random_frames(24, 64, 36, seed=4), 30.0)
    with pytest.raises(ValueError, match="not the same clip"):
        pipe.refine(out, "a cat", video=other, num_inference_steps=2, progress=False, output_type="latent")


@pytest.mark.parametrize("num_frames", [13, 9])  # 9: fewer new frames (4) than cond frames (5)
def test_extend_conditions_each_segment_on_the_decoded_frames_at_the_model_size(pipe, num_frames):
    """extend() conditioned segment k+1 on segment k's new frames after their resize to the input's size,
    resized back to the bucket for the VAE: a bicubic down/up round trip per segment (for an input at half the
    bucket size the cond pixels were 39% (rel. L2 of their variation) off the decoded frames, mean |diff| 5.3
    levels), and with fewer new frames than cond frames on the original input frame where upstream takes the
    segment's reconstruction of it. SPEC 7 and upstream's long-video demo condition on the last decoded frames;
    extend now equals chaining __call__ on the previous call's model_frames (the output still at the input's
    size)."""
    from PIL import Image

    from longcat_vc.stages import _resize_frames

    yy, xx = np.mgrid[0:16, 0:24]
    fr = np.stack([np.stack([(xx * 9 + i * 5) % 256, (yy * 13) % 256, ((xx + yy) * 7 + i) % 256], -1)
                   for i in range(9)]).astype(np.uint8)
    kw = dict(resolution=(32, 48), num_frames=num_frames, num_cond_frames=5, guidance_scale=1.0,
              num_inference_steps=2, progress=False)
    new = num_frames - 5
    seen = []
    orig = pipe.prepare_latents
    pipe.prepare_latents = lambda frames, *a, **k: (seen.append(frames[-5:].copy()), orig(frames, *a, **k))[1]
    try:
        ext = pipe.extend(fr, "a cat", segments=2, generator=torch.Generator().manual_seed(1), **kw)
    finally:
        del pipe.prepare_latents
    g = torch.Generator().manual_seed(1)
    o1 = pipe(fr, "a cat", generator=g, **kw)
    o2 = pipe(o1.model_frames, "a cat", generator=g, **kw)
    np.testing.assert_array_equal(_resize_frames(seen[1], (32, 48), Image.LANCZOS), o1.model_frames[-5:])
    expected = np.concatenate([fr, o1.frames[9:], _resize_frames(o2.model_frames[5:], (16, 24), Image.BICUBIC)])
    assert ext.frames.shape == expected.shape == (9 + 2 * new, 16, 24, 3)
    np.testing.assert_array_equal(ext.frames, expected)


def test_refine_of_an_extend_output_points_to_extend_refine(pipe):
    """refine(extend_output) said "pass its frames instead": extend's frames hold the whole input before the new
    frames, not one stage-1 clip starting with its cond frames, so following the advice with video= conditioned
    the refinement's first frames on the input's last ones (a silently wrong video). The error now points to
    extend(..., refine=True), which refines a long video window by window."""
    kw = dict(resolution=(32, 48), num_frames=9, num_cond_frames=5, guidance_scale=1.0, num_inference_steps=1,
              progress=False)
    ext = pipe.extend(random_frames(9, 32, 48), "a cat", segments=2, generator=1, **kw)
    with pytest.raises(ValueError, match=r"extend\(\.\.\., refine=True\)") as ei:
        pipe.refine(ext, "a cat", progress=False)
    assert "pass its frames instead" not in str(ei.value)


def test_read_only_frames_give_no_torch_undefined_behaviour_warning(pipe, tmp_path):
    """A single image (read_video returned it read-only, unlike every other input) or a read-only array at the
    model's size reached torch.from_numpy as is: torch warned "The given NumPy array is not writable ...
    undefined behavior" from the pipeline's internals (the refinement's stage-1 frames likewise). read_video's
    image frames are now writable and the pipeline copies a read-only array before handing it to torch."""
    import warnings

    from PIL import Image

    from longcat_vc.refine import prepare_refine_latents
    from longcat_vc.video_io import read_video

    path = str(tmp_path / "one.png")
    Image.fromarray(random_frames(1, 32, 48)[0]).save(path)
    assert read_video(path).frames.flags.writeable
    ro = random_frames(5, 32, 48)
    ro.setflags(write=False)
    kw = dict(resolution=(32, 48), num_frames=9, num_cond_frames=5, guidance_scale=1.0, num_inference_steps=1,
              progress=False, output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pipe(ro, "a cat", generator=1, **kw)
        prepare_refine_latents(pipe, ro, None, (64, 64), 10, 0, 0.5, torch.Generator().manual_seed(0))
