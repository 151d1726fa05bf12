"""Hostile-user round 19: the user-facing edges of reading inputs (videos, frame folders, checkpoint
components). Each test fails on the code before its fix.

- A video file whose first video stream is a still (cover art / a thumbnail track, e.g. an mkv
  holding a picture track before the clip): PyAV's path read ``streams.video[0]``, so the "video"
  was the cover, 1 frame at its size, while FFmpeg itself (and the imageio-ffmpeg fallback) take the
  clip (``av_find_best_stream``).
- A frame folder holding two images of one frame (``f_1.png`` and ``f_1.jpg``, or ``1.png`` and
  ``01.png``): both were read, interleaved in an order set by the extension, doubling frames (or
  ordering them by chance) without a word.
- A frame folder with a file name holding a digit-like character that is no decimal digit
  (``"²"``) between digits: the natural sort's ``int("²")`` raised a bare ValueError naming no file.
- A ``text_encoder/`` or ``vae/`` checkpoint missing tensors (another model's folder, a hand-made
  conversion): transformers / diffusers initialised them at random with a log line the CLI
  silences, and the pipeline ran on a random text encoder or VAE. The DiT loads strictly; now
  these two name their missing tensors too.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from vc_components import random_frames, write_full_checkpoint

from longcat_vc import video_io
from longcat_vc.video_io import VideoReadError, read_video


# ------------------------------------------------------------------------------ video stream choice


def _mkv_with_a_still_track_first(path: str, clip: np.ndarray) -> None:
    import av

    with av.open(path, mode="w", format="matroska") as c:
        still = c.add_stream("mjpeg", rate=1)
        still.width, still.height, still.pix_fmt = 32, 32, "yuvj420p"
        video = c.add_stream("libx264", rate=15)
        video.width, video.height, video.pix_fmt = clip.shape[2], clip.shape[1], "yuv420p"
        cover = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8), format="rgb24").reformat(
            format="yuvj420p")
        for p in still.encode(cover):
            c.mux(p)
        for p in still.encode():
            c.mux(p)
        for fr in clip:
            for p in video.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in video.encode():
            c.mux(p)


def test_a_still_track_before_the_clip_is_not_read_as_the_video(tmp_path, monkeypatch):
    pytest.importorskip("av")
    clip = random_frames(20, 48, 64, 0)
    path = str(tmp_path / "with_cover.mkv")
    _mkv_with_a_still_track_first(path, clip)

    vf = read_video(path)
    assert (vf.num_frames, vf.height, vf.width) == (20, 48, 64)  # was 1 frame of 32x32: the cover
    assert vf.fps == pytest.approx(15.0)
    assert read_video(path, target_fps=7.5).num_frames == 10

    # the FFmpeg binary's own choice (the fallback without PyAV) agrees
    pytest.importorskip("imageio_ffmpeg")
    monkeypatch.setattr(video_io, "_have_pyav", lambda: False)
    assert read_video(path).frames.shape[:3] == (20, 48, 64)


def test_a_video_with_one_stream_is_read_as_before(tmp_path):
    pytest.importorskip("av")
    clip = random_frames(9, 32, 48, 1)
    path = video_io.write_video(str(tmp_path / "a.mp4"), clip, 15)
    vf = read_video(path)
    assert (vf.num_frames, vf.height, vf.width) == (9, 32, 48)


# ------------------------------------------------------------------------------ frame folders


def _save(folder, name, value, size=(16, 24)):
    Image.fromarray(np.full(size + (3,), value, np.uint8)).save(os.path.join(folder, name))


@pytest.mark.parametrize("names", [
    ["f_1.png", "f_1.jpg", "f_2.png", "f_2.jpg"],  # one frame in two formats
    ["1.png", "01.png", "2.png"],  # two names of frame 1
    ["Frame1.png", "frame1.png", "frame2.png"],  # two spellings of frame 1 (a case-sensitive file system)
])
def test_a_frame_folder_with_two_images_of_one_frame_is_refused(tmp_path, names):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, n in enumerate(names):
        _save(str(folder), n, 10 * i)
    if len(os.listdir(folder)) < len(names):
        pytest.skip("case-insensitive file system")
    with pytest.raises(VideoReadError, match=r"(?s)same frame.*keep one"):
        read_video(str(folder))


def test_a_frame_folder_of_distinct_frames_reads_in_natural_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (1, 2, 10):
        _save(str(folder), f"frame_{i}.png", i)
    (folder / "notes.txt").write_text("not a frame")
    (folder / "frame_1.json").write_text("{}")  # not an image: no second frame 1
    vf = read_video(str(folder))
    assert vf.frames[:, 0, 0, 0].tolist() == [1, 2, 10]


def test_a_frame_name_with_a_non_decimal_digit_sorts_instead_of_crashing(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    _save(str(folder), "f1\u00b22.png", 5)  # "f1²2.png": "²" isdigit() but int() refuses it
    _save(str(folder), "f2.png", 7)
    vf = read_video(str(folder))  # was ValueError: invalid literal for int() with base 10: '²'
    assert vf.frames[:, 0, 0, 0].tolist() == [5, 7]


# ------------------------------------------------------------------------------ checkpoint components


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("r19ckpt"))
    write_full_checkpoint(root)
    return root


def _copy_without(root: str, dst: str, sub: str, fname: str, drop) -> str:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(root, dst)
    path = os.path.join(dst, sub, fname)
    sd = load_file(path)
    gone = [k for k in sd if drop(k)]
    assert gone
    save_file({k: v for k, v in sd.items() if k not in gone}, path, metadata={"format": "pt"})
    return dst


def _load(root):
    from longcat_vc.pipeline import VideoContinuationPipeline

    return VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                     progress=False)


def test_the_pipeline_loads_the_full_tiny_checkpoint(ckpt_root):
    assert _load(ckpt_root) is not None


def test_a_text_encoder_missing_tensors_is_refused(ckpt_root, tmp_path):
    from longcat_vc.loading import CheckpointError

    root = _copy_without(ckpt_root, str(tmp_path / "ck"), "text_encoder", "model.safetensors",
                         lambda k: "final_layer_norm" in k)
    with pytest.raises(CheckpointError, match=r"(?s)the text encoder checkpoint lacks 1 tensor.*encoder\.final_layer_norm\.weight"):
        _load(root)  # was loaded with a random final norm


def test_a_vae_missing_tensors_is_refused(ckpt_root, tmp_path):
    from longcat_vc.loading import CheckpointError

    root = _copy_without(ckpt_root, str(tmp_path / "ck"), "vae", "diffusion_pytorch_model.safetensors",
                         lambda k: k.startswith("decoder.conv_in."))
    with pytest.raises(CheckpointError, match=r"(?s)the VAE checkpoint lacks 2 tensor.*decoder\.conv_in\.bias"):
        _load(root)  # was loaded with a random decoder input conv
