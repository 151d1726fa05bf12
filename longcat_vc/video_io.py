"""Video reading and writing for the VC pipeline and the ``longcat-vc`` command.

Reading: video files (mp4, webm, mov, mkv, avi, m4v, ... through PyAV's bundled FFmpeg), GIFs and
animated PNG / WebP (Pillow) and folders of image frames (png/jpg/webp/bmp, natural sort order). Writing: H.264 mp4
through PyAV (its wheels bundle libx264) or, without PyAV, the FFmpeg binary that the
``imageio-ffmpeg`` wheel ships. No system ffmpeg is assumed.

Writes are atomic: the file is encoded under a hidden temporary name in the target folder and
renamed over the target only once it is complete, so an interrupted or failed run never leaves a
truncated file under the requested name.

Frames are always ``uint8 [F, H, W, 3]`` RGB numpy arrays.

Not ``diffusers.utils.load_video`` / ``export_to_video``: they return or take PIL frames without the
subsampling, frame folders and fps bookkeeping the pipeline needs, and write in place (no atomic
rename, quality scale instead of a CRF, and a resize to 16-pixel macroblocks unless told not to).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import signal
import stat
import threading
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

__all__ = [
    "VideoFrames",
    "VideoReadError",
    "read_video",
    "read_video_tags",
    "as_video_frames",
    "subsample_stride",
    "subsample_to_fps",
    "write_video",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class VideoReadError(ValueError):
    """A video that cannot be read, is empty, or has inconsistent frames."""


@dataclass
class VideoFrames:
    """Decoded frames plus their frame rate.

    Attributes:
        frames (np.ndarray): ``[F, H, W, 3]`` uint8 RGB.
        fps (float | None): frames per second; None when unknown (frame folders, raw arrays).
        source (str | None): where the frames came from (for messages).
        stride (int): source frames per kept frame when read with ``target_fps`` (1 otherwise).
    """

    frames: np.ndarray
    fps: Optional[float] = None
    source: Optional[str] = None
    stride: int = 1

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


def _natural_key(name: str):
    # isdecimal, not isdigit: "²" is a digit to isdigit but no \d, and int("²") raised naming no file
    return [int(p) if p.isdecimal() else p.lower() for p in re.split(r"(\d+)", name)]


def _check_frames(frames: np.ndarray, source: str) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoReadError(f"{source}: expected frames [F, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise VideoReadError(f"{source}: the video has no frames")
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise VideoReadError(f"{source}: frames have an empty size {tuple(frames.shape[1:3])}")
    return frames


# PIL modes with 8 bits per channel: convert("RGB") maps them without loss of range.
_EIGHT_BIT_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)


def _image_to_rgb(im, where: str) -> np.ndarray:
    """A PIL image as ``uint8 [H, W, 3]`` RGB.

    8-bit modes go through ``convert("RGB")``. 16-bit grayscale (``I;16*``, or ``I`` as Pillow may
    open a 16-bit PNG) is scaled from [0, 65535] to [0, 255] (``convert`` would clip it to white).
    Other modes (``F`` float, ``I`` 32-bit int, ...) have no fixed range: VideoReadError naming
    ``where`` and the mode.
    """
    mode = im.mode
    if mode in _EIGHT_BIT_MODES:
        # np.array: writable, as the frames of every other input (np.asarray of an image is read-only)
        return np.array(im.convert("RGB"))
    if mode.startswith("I;16") or (mode == "I" and getattr(im, "format", None) == "PNG"):
        g = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        g8 = ((g * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(g8[..., None], 3, axis=-1)
    kind = {"F": "32-bit float", "I": "32-bit integer"}.get(mode, "not 8-bit")
    raise VideoReadError(
        f"{where}: unsupported image mode {mode!r} ({kind}, no fixed range to scale to uint8); expected an "
        "8-bit image (L, LA, P, RGB, RGBA, ...) or 16-bit grayscale: convert it to 8-bit RGB first"
    )


def _exif_upright(im):
    """``im`` turned by its EXIF orientation tag (phone photos store the pixels unrotated plus the tag)
    so it comes out as viewers show it, as the display rotation of video files is applied; without
    the tag, ``im`` itself."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im


def _read_image(fp: str, what: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(fp) as im:
            return _image_to_rgb(_exif_upright(im), fp)
    except VideoReadError:
        raise
    except Exception as e:  # PIL raises many types for corrupt images
        raise VideoReadError(f"{fp}: cannot read {what}: {e}") from None


def _read_frame_folder(path: str) -> VideoFrames:
    names = sorted(
        (n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")),
        key=_natural_key,
    )
    if not names:
        raise VideoReadError(
            f"{path}: folder holds no image frames (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    _check_one_image_per_frame(path, names)
    frames = []
    size = None
    for n in names:
        arr = _read_image(os.path.join(path, n), "image frame")
        if size is None:
            size = arr.shape[:2]
        elif arr.shape[:2] != size:
            raise VideoReadError(
                f"{path}: frames differ in size: {names[0]} is {size[1]}x{size[0]}, "
                f"{n} is {arr.shape[1]}x{arr.shape[0]} (width x height)"
            )
        frames.append(arr)
    return VideoFrames(_check_frames(np.stack(frames), path), None, path)


def _check_one_image_per_frame(path: str, names) -> None:
    """No two frame names with one sort key once the extension is dropped (``f_1.png`` and ``f_1.jpg``,
    ``1.png`` and ``01.png``, ``A1.png`` and ``a1.png``): both were read, interleaved in an order that
    the extension (or the listing) set, so every frame came twice or frames came in a chance order."""
    seen = {}
    for n in names:
        key = tuple(_natural_key(os.path.splitext(n)[0]))
        if key in seen:
            raise VideoReadError(
                f"{path}: {seen[key]} and {n} name the same frame (their names differ only in the extension, "
                "letter case or leading zeros), so the frame order is ambiguous; keep one image per frame"
            )
        seen[key] = n


def _is_animated(path: str) -> bool:
    """Whether the image file is an animation (animated PNG / WebP). Other multi-image files are not:
    a JPEG's second image (MPO: a phone's gain map or depth map) or a TIFF's pages are no frames of a
    clip. False when PIL cannot open it (``_read_image`` then says why)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format in ("PNG", "WEBP") and int(getattr(im, "n_frames", 1)) > 1
    except Exception:
        return False


# how long a frame of delay 0 lasts, as ffmpeg's demuxers read it: gif default_delay (10 cs, browsers too),
# apng default_fps (15). WebP: none (0 ms, as before)
_ZERO_DELAY_MS = {"GIF": 100.0, "PNG": 1000.0 / 15}


def _read_animated(path: str) -> VideoFrames:
    """The frames of a GIF or an animated PNG / WebP, with the frame rate of their mean duration. A frame
    without a delay (0) lasts as ffmpeg's demuxers (the imageio-ffmpeg reader) take it: 100 ms in a GIF (as
    browsers show it), 1/15 s in an APNG; counted as 0 ms it raised the rate (a GIF with one among 40 ms
    frames: 30 fps, not 20)."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            zero_delay = _ZERO_DELAY_MS.get(im.format, 0)
            frames, durations = [], []
            for i, fr in enumerate(ImageSequence.Iterator(im)):
                frames.append(_image_to_rgb(fr, f"{path} frame {i}"))
                durations.append(fr.info.get("duration", 0) or zero_delay)
    except VideoReadError:
        raise
    except Exception as e:
        raise VideoReadError(f"{path}: cannot read the animated image: {e}") from None
    if not frames:
        raise VideoReadError(f"{path}: the video has no frames")
    mean_ms = float(np.mean(durations)) if durations else 0.0
    fps = 1000.0 / mean_ms if mean_ms > 0 else None
    return VideoFrames(_check_frames(np.stack(frames), path), fps, path)


def _display_rotated(frame, path: str, sar=None) -> np.ndarray:
    """``frame`` (an ``av.VideoFrame``) as rgb24, turned by its display-rotation metadata (phone
    clips store frames unrotated plus a display matrix) so it comes out as ffmpeg / players show it:
    quarter turns and mirrors (hflip / vflip) of the matrix are applied, other angles refused.
    PyAV's ``frame.rotation`` is counter-clockwise degrees, as ``np.rot90``'s k quarter turns.
    A sample aspect ratio ``sar`` other than 1 (anamorphic DVD / HDV / broadcast sources: non-square
    pixels) is applied first, as players do, by resizing the width to ``round(width * sar)`` (ffmpeg's
    ``scale=iw*sar:ih``): the stored pixels were taken as square, so the model saw (and the output kept)
    a squashed or stretched picture."""
    if sar and sar != 1:
        width = max(1, int(round(frame.width * float(sar))))
        arr = frame.to_ndarray(format="rgb24", width=width, height=frame.height, interpolation="BICUBIC")
    else:
        arr = frame.to_ndarray(format="rgb24")
    rotation = getattr(frame, "rotation", 0) or 0
    quarter = int(round(rotation / 90.0))
    if abs(rotation - 90.0 * quarter) > 1e-3:
        raise VideoReadError(
            f"{path}: unsupported display rotation {rotation:g} degrees (only multiples of 90 are supported)"
        )
    matrix = _display_matrix(frame)
    if matrix is None:
        return np.ascontiguousarray(np.rot90(arr, quarter % 4)) if quarter % 4 else arr
    # the matrix maps a stored pixel (x, y) to the displayed (a*x + c*y, b*x + d*y) (libavutil/display.h);
    # a quarter-turn multiple makes it a signed permutation: a transpose or not, then a flip per axis.
    # ``frame.rotation`` alone missed a mirror: an hflip read as a half turn, a vflip not at all
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    if abs(a) + abs(d) >= abs(b) + abs(c):
        out = arr[::-1 if d < 0 else 1, ::-1 if a < 0 else 1]
    else:
        out = np.swapaxes(arr, 0, 1)[::-1 if b < 0 else 1, ::-1 if c < 0 else 1]
    return np.ascontiguousarray(out)


def _display_matrix(frame):
    """The frame's display matrix (9 int32, 16.16 fixed point) or None: none attached, or a PyAV without
    frame side data (its ``frame.rotation`` is then all that is applied)."""
    try:
        from av.sidedata.sidedata import Type

        data = frame.side_data.get(Type.DISPLAYMATRIX)
        if data is None:
            return None
        matrix = np.frombuffer(bytes(data), dtype=np.int32)
    except Exception:
        return None
    return matrix if matrix.size == 9 else None


def _main_video_stream(container):
    """The video stream FFmpeg plays: ``av_find_best_stream``'s choice, never an attached picture
    (cover art) while another video stream exists. ``streams.video[0]`` read a cover or a thumbnail
    track stored before the clip as a 1-frame "video", where ffmpeg and the imageio-ffmpeg fallback
    take the clip."""
    videos = list(container.streams.video)
    attached = 0x400  # AV_DISPOSITION_ATTACHED_PIC (PyAV's av.stream.Disposition.attached_pic)
    moving = [s for s in videos if not int(getattr(s, "disposition", 0) or 0) & attached] or videos
    best = container.streams.best("video") if hasattr(container.streams, "best") else None
    if best is not None and any(s.index == best.index for s in moving):
        return best
    return moving[0]


def _read_with_av(path: str, target_fps: Optional[float]) -> VideoFrames:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: the file has no video stream")
            stream = _main_video_stream(container)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            stride = subsample_stride(fps, target_fps) if target_fps else 1
            # decode every frame (inter-frame codecs need them) but convert only the kept ones
            sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio  # None or 0: unknown (square)
            frames = [_display_rotated(f, path, sar) for i, f in enumerate(container.decode(stream)) if i % stride == 0]
    except VideoReadError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...), OSError
        raise VideoReadError(f"{path}: cannot read video: {e}") from None
    if not frames:
        raise VideoReadError(f"{path}: the video has no frames")
    _check_same_size(frames, path)
    return VideoFrames(_check_frames(np.stack(frames), path), fps / stride if fps else None, path, stride)


def _check_same_size(frames, path: str) -> None:
    """Decoded frames of one size (a stream whose resolution changes midway, e.g. concatenated MPEG-TS
    segments, failed in ``np.stack`` with a message naming no file)."""
    size = frames[0].shape[:2]
    for i, fr in enumerate(frames):
        if fr.shape[:2] != size:
            raise VideoReadError(
                f"{path}: the frame size changes within the video: decoded frame 0 is {size[1]}x{size[0]}, "
                f"decoded frame {i} is {fr.shape[1]}x{fr.shape[0]} (width x height); re-encode it at one size"
            )


def _have_pyav() -> bool:
    """Whether PyAV imports (optional: without it the FFmpeg binary of ``imageio-ffmpeg`` is used)."""
    import importlib

    try:
        importlib.import_module("av")
    except ImportError:
        return False
    return True


def _passthrough_option(version: str) -> list:
    """ffmpeg's option for "every decoded frame once" in the given ``ffmpeg -version`` string: ``-fps_mode``
    from 5.1 on (newer builds no longer know its older name, ``-vsync``), ``-vsync`` before (4.x, e.g. a
    system ffmpeg through ``IMAGEIO_FFMPEG_EXE``: "Unrecognized option 'fps_mode'", every read failed). An
    unparsed version (a git build, "N-1234-g...") is taken as new."""
    m = re.match(r"n?(\d+)\.(\d+)", version or "")
    if m and (int(m.group(1)), int(m.group(2))) < (5, 1):
        return ["-vsync", "passthrough"]
    return ["-fps_mode", "passthrough"]


def _read_with_imageio_ffmpeg(path: str) -> VideoFrames:
    import imageio_ffmpeg

    try:
        try:
            version = imageio_ffmpeg.get_ffmpeg_version()
        except Exception:  # no binary: read_frames below says so
            version = ""
        # non-square pixels scaled to the display aspect (as the PyAV reader does); square ones pass unscaled.
        # passthrough: every decoded frame once, as PyAV gives them; ffmpeg's default for this output
        # resampled a variable-frame-rate clip to a constant rate (30 frames came out as 72, duplicates included)
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24",
                                            output_params=["-vf", "scale=round(iw*sar):ih:flags=bicubic,setsar=1",
                                                           *_passthrough_option(version)])
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in reader]
    except Exception as e:
        raise VideoReadError(f"{path}: cannot read video: {e}") from None
    if not frames:
        raise VideoReadError(f"{path}: the video has no frames")
    fps = meta.get("fps") or None
    return VideoFrames(_check_frames(np.stack(frames), path), fps, path)


def _as_real(value) -> Optional[float]:
    """``value`` as a float when it is a real number (numpy scalars included) but not a bool, else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):  # an int beyond float range, say
        return None


def _check_fps(fps, what: str, *, optional: bool = False) -> Optional[float]:
    """``fps`` as a positive finite float, or None when ``optional`` and ``fps`` is None; ValueError
    naming ``what`` otherwise (bools and strings refused). Checks ``target_fps`` and ``VideoFrames.fps``
    (optional: None means unknown; a negative, zero, NaN or infinite rate was taken as unknown without a
    word, so the frames were not subsampled; a string failed inside numpy)."""
    if optional and fps is None:
        return None
    value = _as_real(fps)
    if value is None or not math.isfinite(value) or value <= 0:
        none = "None (unknown) or " if optional else ""
        raise ValueError(f"{what} must be {none}a positive finite number, got {fps!r}")
    return value


def read_video(path: Union[str, os.PathLike], *, target_fps: Optional[float] = None) -> VideoFrames:
    """Read the frames of a video file, a GIF or a folder of image frames.

    Args:
        path: a video file (mp4/webm/mov/...), a ``.gif`` or animated PNG / WebP, a single image, or
            a folder of images.
        target_fps: keep every ``round(fps / target_fps)``-th frame (``subsample_to_fps``), done
            while decoding so a long high-rate video never sits in memory whole. None: all frames.

    Returns:
        VideoFrames with ``frames [F, H, W, 3]`` uint8 and ``fps`` (None for folders and images).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VideoReadError (a ValueError): unreadable, empty, or frames of different sizes.
        ValueError: ``target_fps`` is neither None nor a positive finite number (checked first).
    """
    if target_fps is not None:
        target_fps = _check_fps(target_fps, "target_fps")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"input video not found: {path}")
    if os.path.isdir(path):
        return _read_frame_folder(path)
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # a pipe (/dev/stdin) has size 0 and is read as a stream
        raise VideoReadError(f"{path}: the file is empty")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gif" or (ext in IMAGE_EXTENSIONS and _is_animated(path)):  # else only the first frame was read
        vf = _read_animated(path)
        return subsample_to_fps(vf, target_fps)[0] if target_fps else vf
    if ext in IMAGE_EXTENSIONS:
        arr = _read_image(path, "image")
        return VideoFrames(_check_frames(arr[None], path), None, path)
    if _have_pyav():
        return _read_with_av(path, target_fps)
    vf = _read_with_imageio_ffmpeg(path)
    return subsample_to_fps(vf, target_fps)[0] if target_fps else vf


def read_video_tags(path: Union[str, os.PathLike]) -> dict:
    """The container metadata of a video file (``write_video(tags=...)``), ``{}`` for a folder, an image, a
    file PyAV cannot open, or without PyAV."""
    path = os.fspath(path)
    if os.path.isdir(path) or os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS + (".gif",) or not _have_pyav():
        return {}
    import av

    try:
        with av.open(path) as container:
            return dict(container.metadata)
    except Exception:  # unreadable: read_video says why
        return {}


def as_video_frames(video, *, name: str = "video") -> VideoFrames:
    """Normalise the pipeline's accepted inputs to ``VideoFrames``.

    Accepts a path (str / PathLike: read with ``read_video``), a ``VideoFrames``, a list of PIL
    images, or an array ``[F, H, W, 3]`` uint8 (numpy or torch). Lists and arrays carry no frame
    rate (``fps=None``).
    """
    if isinstance(video, VideoFrames):
        arr = np.asarray(video.frames)
        if arr.dtype != np.uint8:  # float [0, 1] or uint16 frames would be read as near-black
            raise TypeError(f"{name}: VideoFrames.frames must be uint8 [F, H, W, 3], got dtype {arr.dtype}")
        stride = video.stride
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"{name}: VideoFrames.stride must be an int >= 1 (source frames per kept frame), "
                             f"got {stride!r}")
        fps = _check_fps(video.fps, f"{name}: VideoFrames.fps", optional=True)
        return VideoFrames(_check_frames(arr, video.source or name), fps, video.source, int(stride))
    if isinstance(video, (str, os.PathLike)):
        return read_video(video)
    try:
        import torch

        if isinstance(video, torch.Tensor):
            if video.dtype != torch.uint8:  # bf16 failed in .numpy() with "Got unsupported ScalarType BFloat16"
                raise TypeError(f"{name}: frame tensor must be uint8 [F, H, W, 3], got dtype {video.dtype}")
            video = video.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8:
            raise TypeError(f"{name}: frame array must be uint8 [F, H, W, 3], got dtype {video.dtype}")
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{name}: frame array must be [F, H, W, 3], got shape {tuple(video.shape)}")
        return VideoFrames(_check_frames(video, name), None, None)
    if isinstance(video, (list, tuple)):
        if len(video) == 0:
            raise VideoReadError(f"{name}: the list of frames is empty")
        from PIL import Image

        arrs = []
        for i, im in enumerate(video):
            if isinstance(im, Image.Image):
                arrs.append(_image_to_rgb(im, f"{name}[{i}]"))
            elif isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 and im.shape[-1] == 3:
                arrs.append(im)
            else:
                # "got ndarray" for a [H, W, 4] or float array named the one thing that was right
                what = type(im).__name__
                if hasattr(im, "dtype") and hasattr(im, "shape"):
                    what += f" of dtype {im.dtype} and shape {tuple(im.shape)}"
                raise TypeError(f"{name}[{i}]: expected a PIL image or a uint8 [H, W, 3] array, got {what}")
            if arrs[-1].shape != arrs[0].shape:
                raise VideoReadError(
                    f"{name}: frames differ in size: frame 0 is {arrs[0].shape[:2]}, frame {i} is {arrs[-1].shape[:2]}"
                )
        return VideoFrames(_check_frames(np.stack(arrs), name), None, None)
    raise TypeError(
        f"{name}: expected a path, a list of PIL images or a uint8 [F, H, W, 3] array, got {type(video).__name__}"
    )


def subsample_stride(src_fps: Optional[float], target_fps: float = 15.0) -> int:
    """Frame stride that brings ``src_fps`` to about ``target_fps``: ``max(1, round(src / target))``.

    Unknown fps (None) gives 1. ``target_fps`` must be a positive finite number (ValueError).
    """
    target_fps = _check_fps(target_fps, "target_fps")
    if src_fps is None or not np.isfinite(src_fps) or src_fps <= 0:
        return 1
    return max(1, int(round(src_fps / target_fps)))


def subsample_to_fps(video: VideoFrames, target_fps: float = 15.0) -> Tuple[VideoFrames, int]:
    """Keep every ``stride``-th frame (SPEC 7: stride = round(src_fps / 15)).

    Returns the subsampled frames (fps divided by the stride) and the stride.
    """
    stride = subsample_stride(video.fps, target_fps)
    if stride == 1:
        return video, 1
    fps = video.fps / stride if video.fps else None
    return VideoFrames(video.frames[::stride], fps, video.source, video.stride * stride), stride


def _temp_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(base)
    return os.path.join(folder, f".{stem}.partial-{os.getpid()}{ext or '.mp4'}")


CRF_RANGE = (0, 51)  # x264's constant rate factor


def check_crf(crf, name: str = "crf") -> int:
    """``crf`` as an int in x264's range [0, 51] (TypeError / ValueError naming ``name``)."""
    if isinstance(crf, bool) or not isinstance(crf, (int, np.integer)):
        raise TypeError(f"{name}: expected an int in [{CRF_RANGE[0]}, {CRF_RANGE[1]}], got {crf!r}")
    if not CRF_RANGE[0] <= int(crf) <= CRF_RANGE[1]:
        raise ValueError(f"{name}: expected an int in [{CRF_RANGE[0]}, {CRF_RANGE[1]}] (x264), got {crf}")
    return int(crf)


@contextlib.contextmanager
def atomic_output(path: str):
    """Yields a temporary path in ``path``'s folder; renamed onto ``path`` (``os.replace``) when the
    block completes. On an exception, and on SIGTERM / SIGINT / SIGHUP while inside, the temporary
    file is removed first; a signal is then re-delivered with its previous handler (so the process
    still ends, or the caller's handler still runs), leaving no partial file behind."""
    tmp = _temp_name(path)
    handlers = {}

    def cleanup() -> None:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass

    def on_signal(signum, frame):  # noqa: ARG001
        cleanup()
        for sig, old in handlers.items():
            signal.signal(sig, old)
        handlers.clear()
        os.kill(os.getpid(), signum)  # re-delivered to the restored handler

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                handlers[sig] = signal.signal(sig, on_signal)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        cleanup()
        raise
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


_RATE_MAX_DENOMINATOR = 1001  # mp4 frame rates as fractions: 30000/1001 (29.97) and the like


def _frame_rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(_RATE_MAX_DENOMINATOR)


def _check_write_fps(fps) -> float:
    """``fps`` as a float: any real number (numpy scalars too) but bool, finite, positive, and close
    (1%) to its frame-rate fraction (tiny rates such as 1e-4 round to 0, which PyAV would silently
    replace with its default 24 fps). ValueError naming ``fps`` otherwise."""
    value = _as_real(fps)
    if value is None:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    rate = _frame_rate(value)
    if rate == 0 or abs(float(rate) - value) > 0.01 * value:
        raise ValueError(
            f"fps must be at least 1/{_RATE_MAX_DENOMINATOR} (the frame rate is stored as a fraction with a "
            f"denominator of at most {_RATE_MAX_DENOMINATOR}), got {fps!r}"
        )
    return value


def _write_av(tmp: str, frames: np.ndarray, fps: float, crf: int, tags: Optional[dict] = None) -> None:
    import av

    h, w = frames.shape[1:3]
    # yuv420p needs even sizes; odd sizes keep every pixel with 4:4:4 chroma (still H.264).
    pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    rate = _frame_rate(fps)
    with av.open(tmp, mode="w", format="mp4") as container:
        container.metadata.update(tags or {})
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        # mbtree off: with it PyAV's libx264 encoded the same frames to different bytes from run to
        # run (decoded pixels up to 25 apart), so a fixed --seed did not reproduce the file
        stream.options = {"crf": str(int(crf)), "x264-params": "mbtree=0"}
        for fr in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_imageio_ffmpeg(tmp: str, frames: np.ndarray, fps: float, crf: int, target: Optional[str] = None,
                          tags: Optional[dict] = None) -> None:
    import imageio_ffmpeg

    h, w = frames.shape[1:3]
    pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    writer = imageio_ffmpeg.write_frames(
        tmp,
        (w, h),
        fps=fps,
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out=pix_fmt,
        # mbtree off as in the PyAV writer: the two backends encode with the same x264 settings
        output_params=["-crf", str(int(crf)), "-x264-params", "mbtree=0", "-f", "mp4",
                       *[a for k, v in (tags or {}).items() for a in ("-metadata", f"{k}={v}")]],
        macro_block_size=1,
    )
    writer.send(None)
    for fr in frames:
        writer.send(np.ascontiguousarray(fr))
    writer.close()
    # imageio-ffmpeg does not check ffmpeg's exit status: an ffmpeg that failed part way (full disk, size
    # limit) left a truncated mp4 that was renamed over the output with no error. Check the file is whole.
    what = f"write_video: {target or tmp}: ffmpeg (imageio-ffmpeg) failed (full disk?), the output is left as it was"
    try:
        n, _ = imageio_ffmpeg.count_frames_and_secs(tmp)
    except Exception as e:
        last = [ln for ln in str(e).splitlines() if ln.strip()][-1:]
        raise OSError(f"{what}: its file does not read back{': ' + last[0] if last else ''}") from None
    if n != len(frames):
        raise OSError(f"{what}: its file holds {n} of the {len(frames)} frames")


MP4_EXTENSIONS = (".mp4", ".m4v", ".mov")  # what write_video's mp4 container may be named


def _check_not_a_folder(path: str) -> None:
    """The output is a file name: an existing folder (or a path ending in a separator) failed only after
    the encode, in the rename, naming the temporary file (for "out/" one written beside "out")."""
    if os.path.isdir(path) or path.endswith((os.sep, "/")):
        raise IsADirectoryError(f"write_video: path must be a file, got the folder {path}")


def write_video(
    path: Union[str, os.PathLike],
    frames,
    fps: float = 15.0,
    *,
    crf: int = 18,
    backend: str = "auto",
    tags: Optional[dict] = None,
) -> str:
    """Encode frames as an H.264 mp4, atomically.

    Args:
        path: output file (``.mp4``, ``.m4v``, ``.mov`` or no extension; another one is a ValueError: the
            file is always an mp4); its folder must exist.
        frames: ``[F, H, W, 3]`` uint8 array or a list of such frames / PIL images.
        fps (float): frame rate (15 for LongCat-Video output); any real number >= 1/1001 (numpy
            scalars too, not bool), else ValueError.
        crf (int): x264 constant rate factor (18 as upstream's demos).
        backend (str): ``"av"``, ``"imageio-ffmpeg"`` or ``"auto"`` (PyAV if importable).
        tags (dict | None): container metadata, ``{"comment": "..."}`` (mp4 keeps the standard keys:
            title, comment, ...); read back with ``read_video_tags``.

    Returns:
        The path written. On any failure the temporary file is removed and the target untouched.
    """
    path = os.fspath(path)
    vf = as_video_frames(frames, name="frames")
    _check_not_a_folder(path)
    ext = os.path.splitext(path)[1]
    if ext and ext.lower() not in MP4_EXTENSIONS:  # an mp4 named .gif / .webm / .png was written without a word
        raise ValueError(f"write_video: path must name an mp4 file ({', '.join(MP4_EXTENSIONS)}): H.264 is written "
                         f"in an mp4 container, got {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):  # "in.mp4/out.mp4": it exists, as a file
        raise NotADirectoryError(f"write_video: {folder} is a file, not a folder, so {path} cannot be written there")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    fps = _check_write_fps(fps)
    if backend not in ("auto", "av", "imageio-ffmpeg"):
        raise ValueError(f"backend must be 'auto', 'av' or 'imageio-ffmpeg', got {backend!r}")
    crf = check_crf(crf)
    if backend == "auto":
        backend = "av" if _have_pyav() else "imageio-ffmpeg"
    with atomic_output(path) as tmp:
        extra = {"tags": dict(tags)} if tags else {}
        if backend == "av":
            _write_av(tmp, vf.frames, fps, crf, **extra)
        else:
            _write_imageio_ffmpeg(tmp, vf.frames, fps, crf, target=path, **extra)
    return path
