"""Round 31 review of rounds 26-30: what their changes broke."""

import pytest


def _fallback_read_params(tmp_path, monkeypatch, version):
    """The output_params the imageio-ffmpeg fallback reader passes to ffmpeg reporting ``version``."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    from longcat_vc import video_io

    seen = {}

    def fake_read_frames(path, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_version", lambda: version)
    monkeypatch.setattr(imageio_ffmpeg, "read_frames", fake_read_frames)
    monkeypatch.setattr(video_io, "_have_pyav", lambda: False)
    src = tmp_path / "in.mp4"
    src.write_bytes(b"\0" * 16)
    with pytest.raises(video_io.VideoReadError):
        video_io.read_video(str(src))
    return seen["output_params"]


@pytest.mark.parametrize("version, option", [
    ("4.4.2-0ubuntu0.22.04.1", "-vsync"), ("n5.0.1", "-vsync"), ("5.1.2", "-fps_mode"),
    ("n9.0.2-17-g2a571b6068-20260930", "-fps_mode"), ("N-112345-gdeadbeef", "-fps_mode")])
def test_imageio_ffmpeg_fallback_passthrough_option_fits_the_ffmpeg_version(tmp_path, monkeypatch, version, option):
    """Round 29 made the fallback reader pass ``-fps_mode passthrough``, an option ffmpeg has only from 5.1
    on: with an older ffmpeg (a system 4.4 through IMAGEIO_FFMPEG_EXE, an old imageio-ffmpeg) every read
    failed with "Unrecognized option 'fps_mode'"; newer ffmpeg builds no longer know ``-vsync``. The option
    now follows the binary's version."""
    params = _fallback_read_params(tmp_path, monkeypatch, version)
    assert option in params and params[params.index(option) + 1] == "passthrough"
    other = "-fps_mode" if option == "-vsync" else "-vsync"
    assert other not in params
