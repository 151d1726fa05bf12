"""Video reading/writing: formats, frame counts, sizes, fps subsampling, atomic writes, bad input."""


import numpy as np
import pytest

from longcat_vc import video_io
from longcat_vc.video_io import (
    VideoFrames,
    VideoReadError,
    as_video_frames,
    read_video,
    subsample_stride,
    subsample_to_fps,
    write_video,
)


def _frames(n=7, h=32, w=48, seed=None):
    rng = np.random.default_rng(seed)
    # smooth content so lossy codecs stay close
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // (h + w)], -1)
    out = np.stack([(base + 10 * i + rng.integers(0, 3)) % 256 for i in range(n)]).astype(np.uint8)
    return out


@pytest.mark.parametrize("backend", ["av", "imageio-ffmpeg"])
@pytest.mark.parametrize("size", [(32, 48), (33, 47)])
def test_mp4_roundtrip(tmp_path, backend, size):
    f = _frames(9, *size)
    path = str(tmp_path / "clip.mp4")
    write_video(path, f, fps=15, backend=backend)
    v = read_video(path)
    assert v.frames.shape == f.shape and v.frames.dtype == np.uint8
    assert abs(v.fps - 15) < 1e-6
    assert np.abs(v.frames.astype(int) - f.astype(int)).mean() < 12
    # H.264 indeed
    import av

    with av.open(path) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    # no temporary file left behind
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_webm_gif_and_folder(tmp_path):
    import av
    from PIL import Image

    f = _frames(6)
    webm = str(tmp_path / "c.webm")
    with av.open(webm, "w") as c:
        s = c.add_stream("libvpx-vp9", rate=30)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for fr in f:
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    v = read_video(webm)
    assert v.frames.shape == (6, 32, 48, 3) and abs(v.fps - 30) < 1e-6

    ims = [Image.fromarray(x) for x in f]
    gif = str(tmp_path / "c.gif")
    ims[0].save(gif, save_all=True, append_images=ims[1:], duration=50, loop=0)
    v = read_video(gif)
    assert v.frames.shape == (6, 32, 48, 3) and abs(v.fps - 20) < 1e-6

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, im in enumerate(ims):  # natural order: f2 before f10
        im.save(folder / f"f{i * 4}.png")
    v = read_video(str(folder))
    assert v.fps is None
    np.testing.assert_array_equal(v.frames, f)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_video(str(tmp_path / "missing.mp4"))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty"):
        read_video(str(empty))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(VideoReadError, match="cannot read"):
        read_video(str(junk))
    (tmp_path / "nofr").mkdir()
    with pytest.raises(VideoReadError, match="no image frames"):
        read_video(str(tmp_path / "nofr"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(mixed / "a1.png")
    Image.new("RGB", (9, 8)).save(mixed / "a2.png")
    with pytest.raises(VideoReadError, match="differ in size"):
        read_video(str(mixed))
    with pytest.raises(VideoReadError, match="empty"):
        as_video_frames([])
    with pytest.raises(TypeError, match="uint8"):
        as_video_frames(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        as_video_frames(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(TypeError):
        as_video_frames(3.5)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous")

    def boom(tmp, frames, fps, crf):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video_io, "_write_av", boom)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(str(target), _frames(3), 15, backend="av")
    assert target.read_bytes() == b"previous"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    with pytest.raises(FileNotFoundError, match="output folder"):
        write_video(str(tmp_path / "nodir" / "x.mp4"), _frames(3), 15)


def test_subsampling():
    assert subsample_stride(30) == 2
    assert subsample_stride(29.97) == 2
    assert subsample_stride(24) == 2
    assert subsample_stride(60) == 4
    assert subsample_stride(15) == 1
    assert subsample_stride(8) == 1
    assert subsample_stride(None) == 1
    vf = VideoFrames(_frames(10), 30.0, "x")
    sub, stride = subsample_to_fps(vf)
    assert stride == 2 and sub.num_frames == 5 and sub.fps == 15.0
    np.testing.assert_array_equal(sub.frames, vf.frames[::2])


def test_pil_list_and_tensor_inputs():
    import torch
    from PIL import Image

    f = _frames(4)
    v = as_video_frames([Image.fromarray(x) for x in f])
    np.testing.assert_array_equal(v.frames, f)
    v = as_video_frames(torch.from_numpy(f))
    np.testing.assert_array_equal(v.frames, f)


def test_read_with_target_fps_subsamples_while_decoding(tmp_path):
    f = _frames(10)
    path = str(tmp_path / "c.mp4")
    write_video(path, f, fps=30)
    full = read_video(path)
    sub = read_video(path, target_fps=15)
    assert sub.stride == 2 and sub.fps == 15.0 and sub.num_frames == 5
    np.testing.assert_array_equal(sub.frames, full.frames[::2])
    gif = str(tmp_path / "c.gif")
    from PIL import Image

    ims = [Image.fromarray(x) for x in f]
    ims[0].save(gif, save_all=True, append_images=ims[1:], duration=20, loop=0)  # 50 fps -> stride 3
    g = read_video(gif, target_fps=15)
    assert g.stride == 3 and g.num_frames == 4
