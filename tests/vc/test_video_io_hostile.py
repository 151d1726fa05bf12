"""Video reading/writing on hostile input: rotated phone clips, 16-bit / float image frames, odd fps
values for ``write_video`` and bad ``target_fps`` values for ``read_video`` / ``subsample_to_fps``."""

import math
import os
import subprocess

import numpy as np
import pytest

from longcat_vc.video_io import (
    VideoFrames,
    VideoReadError,
    as_video_frames,
    read_video,
    subsample_stride,
    subsample_to_fps,
    write_video,
)

H, W = 32, 48


def _pattern(n=8, h=H, w=W):
    """Non-symmetric frames: no flip or rotation of one equals another (a wrong turn is caught)."""
    f = np.zeros((n, h, w, 3), np.uint8)
    f[:, : h // 2, : w // 3, 0] = 255  # red block, top left
    f[:, :, w - 8 :, 2] = 255  # blue stripe, right edge
    f[:, 3 * h // 4 :, :, 1] = 200  # green band, bottom
    for i in range(n):  # a moving dot so frames differ
        f[i, 4:8, 4 + 4 * i : 8 + 4 * i] = 255
    return f


def _ffmpeg():
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # not installed, or its binary is missing
        pytest.skip(f"needs the imageio-ffmpeg ffmpeg binary: {e}")
    if not exe or not os.path.exists(exe):
        pytest.skip("needs the imageio-ffmpeg ffmpeg binary (not found)")
    return exe


def _rotated_clip(tmp_path, angle):
    """An mp4 whose frames are stored unrotated with a display-rotation flag, as phones write them."""
    ffmpeg = _ffmpeg()
    src = str(tmp_path / "in.mp4")
    write_video(src, _pattern(), fps=15)
    out = str(tmp_path / f"rot{angle}.mp4")
    # -display_rotation is an input option: it goes before -i
    subprocess.run(
        [ffmpeg, "-y", "-loglevel", "error", "-display_rotation", str(angle), "-i", src, "-c", "copy", out],
        check=True,
    )
    return ffmpeg, out


def _ffmpeg_displayed_frames(ffmpeg, path, h, w):
    """Frames as ffmpeg shows them (it applies the display rotation by default), rgb24."""
    raw = subprocess.run(
        [ffmpeg, "-loglevel", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


@pytest.mark.parametrize("angle", [90, 180, 270, -90])
def test_display_rotation_is_applied_like_ffmpeg(tmp_path, angle):
    ffmpeg, path = _rotated_clip(tmp_path, angle)
    v = read_video(path)
    h, w = (W, H) if angle % 180 else (H, W)  # quarter turns swap height and width
    assert v.frames.shape == (8, h, w, 3)
    ref = _ffmpeg_displayed_frames(ffmpeg, path, h, w)
    assert ref.shape == v.frames.shape
    assert np.abs(v.frames.astype(int) - ref.astype(int)).mean() < 2
    # subsampling while decoding keeps the rotation
    sub = read_video(path, target_fps=7.5)
    assert sub.stride == 2
    np.testing.assert_array_equal(sub.frames, v.frames[::2])


def test_display_rotation_not_a_quarter_turn_is_refused(tmp_path):
    _, path = _rotated_clip(tmp_path, 45)
    with pytest.raises(VideoReadError, match=r"rotation.*45"):
        read_video(path)


def _gray16_ramp(h=H, w=W):
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 65535 // (h * w - 1)).astype(np.uint16)


def test_16bit_png_frames_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    g16 = _gray16_ramp()
    want = np.round(g16 / 257.0).astype(np.uint8)
    folder = tmp_path / "frames16"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(g16).save(folder / f"f{i}.png")
    assert Image.open(folder / "f0.png").mode in ("I;16", "I")  # a genuine 16-bit PNG
    v = read_video(str(folder))
    assert v.frames.shape == (3, H, W, 3) and v.frames.dtype == np.uint8
    for c in range(3):
        assert np.abs(v.frames[0, :, :, c].astype(int) - want).max() <= 1
    # a ramp, not a clipped white sheet
    assert v.frames.min() == 0 and v.frames.max() == 255 and (v.frames[0, :, :, 0] == 255).mean() < 0.01

    single = read_video(str(folder / "f0.png"))
    np.testing.assert_array_equal(single.frames[0], v.frames[0])
    tif = str(tmp_path / "g16.tif")
    Image.fromarray(g16).save(tif)
    np.testing.assert_array_equal(read_video(tif).frames[0], v.frames[0])


def test_float_and_32bit_images_are_refused_with_file_and_mode(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    ftif = tmp_path / "float.tif"
    Image.fromarray(ramp).save(ftif)
    with pytest.raises(VideoReadError, match=r"float\.tif.*mode 'F'"):
        read_video(str(ftif))
    folder = tmp_path / "ffolder"
    folder.mkdir()
    Image.fromarray(ramp).save(folder / "a0.tif")
    with pytest.raises(VideoReadError, match=r"a0\.tif.*mode 'F'"):
        read_video(str(folder))
    itif = tmp_path / "int32.tif"
    Image.fromarray((ramp * 1e6).astype(np.int32)).save(itif)
    with pytest.raises(VideoReadError, match=r"int32\.tif.*mode 'I'"):
        read_video(str(itif))
    # 8-bit modes still read
    rgb = _pattern(1)[0]
    for mode in ("L", "LA", "RGBA", "P", "1", "CMYK"):
        p = tmp_path / f"im_{mode}.{'tif' if mode == 'CMYK' else 'png'}"
        Image.fromarray(rgb).convert(mode).save(p)
        v = read_video(str(p))
        assert v.frames.shape == (1, H, W, 3) and v.frames.dtype == np.uint8


@pytest.mark.parametrize("bad", [1e-4, 4e-4, True])
def test_write_video_refuses_unrepresentable_fps_and_bools(tmp_path, bad):
    # the tiny rates used to round to 0 (written as PyAV's default 24 fps); True was taken as 1 fps
    cases = [bad, np.bool_(True), 0.0, -1.0, math.inf, math.nan, np.float64("nan"), False, "15", None]
    for fps in cases:
        with pytest.raises(ValueError, match=r"fps") as ei:
            write_video(str(tmp_path / "o.mp4"), _pattern(), fps)
        assert repr(fps) in str(ei.value), (fps, str(ei.value))
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [np.float32(15), np.int64(15), np.int32(15)])
def test_write_video_accepts_numpy_scalars(tmp_path, fps):
    path = str(tmp_path / "o.mp4")
    write_video(path, _pattern(), fps)
    v = read_video(path)
    assert v.num_frames == 8 and abs(v.fps - 15) < 1e-6
    # numpy scalars (and None) are fine as target_fps too
    assert read_video(path, target_fps=None).num_frames == 8
    for t in (np.float32(7.5), np.int64(5)):
        sub = read_video(path, target_fps=t)
        assert sub.stride == round(15 / float(t))
        assert subsample_to_fps(v, t)[1] == sub.stride


BAD_FPS = [0, 0.0, -15, -math.inf, math.inf, math.nan, True, "15"]


@pytest.mark.parametrize("target_fps", BAD_FPS)
def test_read_video_validates_target_fps_before_opening(tmp_path, target_fps):
    path = str(tmp_path / "c.mp4")
    write_video(path, _pattern(), fps=30)
    with pytest.raises(ValueError, match=r"target_fps") as ei:
        read_video(path, target_fps=target_fps)
    assert not isinstance(ei.value, VideoReadError)  # the argument is at fault, not the file
    # checked before the file is looked at
    with pytest.raises(ValueError, match=r"target_fps"):
        read_video(str(tmp_path / "missing.mp4"), target_fps=target_fps)
    vf = VideoFrames(_pattern(), 30.0, "x")
    with pytest.raises(ValueError, match=r"target_fps"):
        subsample_to_fps(vf, target_fps)
    with pytest.raises(ValueError, match=r"target_fps"):
        subsample_stride(30.0, target_fps)


@pytest.mark.parametrize("fps", BAD_FPS)
def test_video_frames_fps_refuses_what_target_fps_refuses(fps):
    # one fps check serves both: VideoFrames.fps differs from target_fps only in that None (unknown) passes
    msg = r"^clip: VideoFrames.fps must be None \(unknown\) or a positive finite number"
    with pytest.raises(ValueError, match=msg):
        as_video_frames(VideoFrames(_pattern(), fps, "x"), name="clip")
    with pytest.raises(ValueError, match=r"^target_fps must be a positive finite number"):
        subsample_stride(30.0, fps)
    assert as_video_frames(VideoFrames(_pattern(), None, "x")).fps is None
    with pytest.raises(ValueError, match=r"^target_fps must be a positive finite number, got None"):
        subsample_stride(30.0, None)
