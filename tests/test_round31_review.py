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


def test_block_streamer_runs_a_model_made_under_inference_mode():
    """Round 30 let a model made under ``torch.inference_mode()`` build a KV cache (inference tensors have no
    version counter), but the block streamer (memory 'balanced' / 'low') still read ``_version`` of every block
    tensor at each block's copy: the first forward raised torch's bare "Inference tensors do not track version
    counter.". Now it runs and equals the resident model."""
    import sys
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vc"))
    try:
        import torch
        from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config
        from test_dit import make_inputs, rel_l2
    finally:
        sys.path.pop(0)
    from longcat_vc.memory import BlockStreamer

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31 - 1, ())))
    with torch.inference_mode():
        m = model_from_state_dict(cfg, sd)
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.inference_mode():
        ref = m(x, t, y, mask)
    BlockStreamer(m, "cpu", pin=False).attach()
    with torch.inference_mode():
        out = m(x, t, y, mask)
        out2 = m(x, t, y, mask)  # the second step reuses / re-issues the copies by their signatures
    assert rel_l2(out.double(), ref.double()) < 1e-6 and rel_l2(out2.double(), ref.double()) < 1e-6
