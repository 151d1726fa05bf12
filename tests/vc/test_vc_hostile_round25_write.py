"""Hostile round 25: the writing side of ``video_io`` (write_video's backends)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("imageio_ffmpeg")
resource = pytest.importorskip("resource")  # RLIMIT_FSIZE: POSIX only

from longcat_vc.video_io import read_video, write_video  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGXFSZ"), reason="needs SIGXFSZ / RLIMIT_FSIZE")
def test_imageio_ffmpeg_failed_encode_raises_and_keeps_old_output(tmp_path):
    # The fallback backend never looked at ffmpeg's exit status: an ffmpeg that failed part way (here a
    # file-size limit, as a full disk would) left a truncated mp4 (no moov) that was renamed over the
    # existing output with no error.
    out = tmp_path / "out.mp4"
    out.write_bytes(b"OLD")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from longcat_vc.video_io import write_video
        frames = np.random.default_rng(0).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG (ffmpeg too)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
        try:
            write_video({str(out)!r}, frames, 15, backend="imageio-ffmpeg")
        except Exception as e:
            print("RAISED", type(e).__name__, e)
            sys.exit(3)
        print("NO ERROR")
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "out.mp4" in r.stdout
    assert out.read_bytes() == b"OLD"
    assert os.listdir(tmp_path) == ["out.mp4"]  # no temporary file left either


@pytest.mark.parametrize("shape,fps", [((1, 64, 64), 15.0), ((5, 33, 47), 30000 / 1001), ((3, 2, 2), 12.5)])
def test_imageio_ffmpeg_roundtrip_still_writes(tmp_path, shape, fps):
    # the completeness check added for the failure above must pass every good write (1 frame, odd sizes,
    # fractional rates)
    frames = np.random.default_rng(1).integers(0, 256, shape + (3,), dtype=np.uint8)
    p = tmp_path / "ok.mp4"
    write_video(p, frames, fps, backend="imageio-ffmpeg")
    v = read_video(p)
    assert v.frames.shape == frames.shape
    assert v.fps == pytest.approx(fps, rel=1e-6)
