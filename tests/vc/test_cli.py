"""The ``longcat-vc`` command end to end on a tiny checkpoint, and its handling of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from longcat_vc import cli
from longcat_vc.video_io import read_video, write_video
from vc_components import write_full_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ["--mode", "distill", "--steps", "1", "--frames", "9", "--cond-frames", "5", "--resolution", "32x48",
        "--dtype", "fp32", "--device", "cpu", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    write_full_checkpoint(root, seed=2)
    return root


@pytest.fixture(scope="module")
def in_video(tmp_path_factory):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (7, 36, 52, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("in") / "in.mp4")
    write_video(path, frames, fps=15)
    return path


def _main(capsys, argv):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_continue_end_to_end(ckpt, in_video, tmp_path, capsys):
    out = str(tmp_path / "out.mp4")
    tj = str(tmp_path / "t.json")
    rc, _, err = _main(capsys, ["continue", in_video, "--prompt", "a red car", "--checkpoint", ckpt, "--out", out,
                                "--timings-json", tj] + FAST)
    assert rc == 0, err
    v = read_video(out)
    assert v.frames.shape == (7 + 4, 36, 52, 3) and v.fps == 15.0
    assert "timings (s):" in err and "denoise" in err and "cache build" in err
    assert "wrote" in err and "11 frames (7 input + 4 new)" in err
    rc, _, err = _main(capsys, ["continue", in_video, "--prompt", "a red car", "--checkpoint", ckpt, "--out", out]
                       + FAST + ["--frames", "11"])
    assert rc == 0 and "--frames 11 is not 4k+1; using 9" in err and "Warning" not in err
    t = json.load(open(tj))
    assert t["seed"] == 3 and t["timings"]["steps"] == 1 and t["size"] == [32, 48]
    assert sorted(os.listdir(tmp_path)) == ["out.mp4", "t.json"]  # no temporary files left


def test_extend_end_to_end_and_seed_reproducible(ckpt, in_video, tmp_path, capsys):
    out = str(tmp_path / "long.mp4")
    rc, _, err = _main(capsys, ["extend", in_video, "--prompt", "a red car", "--prompt", "a blue car",
                                "--checkpoint", ckpt, "--out", out, "--no-kv-cache"] + FAST)
    assert rc == 0, err
    v = read_video(out)
    assert v.frames.shape == (7 + 2 * 4, 36, 52, 3)
    # the same seed with the cache on gives the same video (fp32, guidance 1)
    out2 = str(tmp_path / "long2.mp4")
    rc, _, err = _main(capsys, ["extend", in_video, "--prompt", "a red car", "--prompt", "a blue car",
                                "--checkpoint", ckpt, "--out", out2] + FAST)
    assert rc == 0, err
    v2 = read_video(out2)
    assert np.abs(v.frames.astype(int) - v2.frames.astype(int)).mean() < 0.5


def _bad(capsys, argv, code=None):
    rc, out, err = _main(capsys, argv)
    assert rc != 0
    if code is not None:
        assert rc == code
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("longcat-vc: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_bad_inputs(ckpt, in_video, tmp_path, capsys):
    out = str(tmp_path / "o.mp4")
    base = ["--prompt", "a", "--checkpoint", ckpt, "--out", out] + FAST

    msg = _bad(capsys, ["continue", str(tmp_path / "missing.mp4")] + base)
    assert "input not found" in msg
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert "empty" in _bad(capsys, ["continue", str(empty)] + base)
    junk = tmp_path / "junk.webm"
    junk.write_bytes(b"\x1aE\xdf\xa3 not really webm" * 10)
    assert "cannot read video" in _bad(capsys, ["continue", str(junk)] + base)

    short = str(tmp_path / "short.mp4")
    write_video(short, np.zeros((3, 32, 48, 3), np.uint8), fps=15)
    msg = _bad(capsys, ["continue", short] + base)  # found before the model loads, with the path
    assert "fewer than --cond-frames 5" in msg and short in msg

    assert "--frames (5) must be greater than --cond-frames (5)" in _bad(
        capsys, ["continue", in_video] + base + ["--frames", "5"], code=2)
    assert "--cond-frames must be 4k+1" in _bad(capsys, ["continue", in_video] + base + ["--cond-frames", "6"], 2)
    assert "--guidance must be >= 1" in _bad(capsys, ["continue", in_video] + base + ["--guidance", "0.5"], 2)
    assert "--out must be an .mp4" in _bad(
        capsys, ["continue", in_video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.avi")] + FAST)
    assert "multiples of 16" in _bad(capsys, ["continue", in_video] + base + ["--resolution", "30x48"])
    # --fuse-lora with --mode basic was ignored silently (basic runs no LoRA); refused before loading
    assert "--fuse-lora applies to --mode distill" in _bad(
        capsys, ["continue", in_video] + base + ["--mode", "basic", "--fuse-lora"], code=2)

    nock = tmp_path / "ck"
    nock.mkdir()
    msg = _bad(capsys, ["continue", in_video, "--prompt", "a", "--checkpoint", str(nock), "--out", out] + FAST)
    assert "vae/config.json" in msg and "lora/cfg_step_lora.safetensors" in msg
    assert not os.path.exists(out)


@pytest.mark.parametrize("argv", [["--resolution", "1080p"], ["--mode", "turbo"]])
def test_bad_choices_exit_2_with_usage(ckpt, in_video, tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as ei:
        cli.main(["continue", in_video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4")] + argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_oom_in_cache_hints_offload_and_leaves_no_output(ckpt, in_video, tmp_path, capsys, monkeypatch):
    from longcat_vc import LongCatDiT

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.90 GiB")

    monkeypatch.setattr(LongCatDiT, "build_kv_cache", oom)
    out = str(tmp_path / "o.mp4")
    msg = _bad(capsys, ["continue", in_video, "--prompt", "a", "--checkpoint", ckpt, "--out", out] + FAST, code=1)
    assert "--offload-kv-cache" in msg and "KV cache" in msg
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_output(ckpt, in_video, tmp_path, capsys, monkeypatch):
    from longcat_vc import video_io

    def boom(tmp, frames, fps, crf):
        open(tmp, "wb").write(b"half a video")
        raise OSError("disk full")

    monkeypatch.setattr(video_io, "_write_av", boom)
    out = str(tmp_path / "o.mp4")
    msg = _bad(capsys, ["continue", in_video, "--prompt", "a", "--checkpoint", ckpt, "--out", out] + FAST, code=1)
    assert "disk full" in msg
    assert os.listdir(tmp_path) == []


def test_subprocess_bad_input_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "longcat_vc.cli", "continue", str(tmp_path / "nope.mp4"), "--prompt", "a",
         "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o.mp4")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == f"longcat-vc: error: input not found: {tmp_path / 'nope.mp4'}"


def test_console_script_declared():
    try:
        import tomllib
    except ImportError:  # python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        proj = tomllib.load(f)
    assert proj["project"]["scripts"]["longcat-vc"] == "longcat_vc.cli:main"


def test_allocator_default_respects_the_user():
    """Expandable segments by default; a user's own allocator setting (either name) is kept."""
    env = {}
    cli._allocator_default(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        env = {name: "max_split_size_mb:128"}
        cli._allocator_default(env)
        assert env == {name: "max_split_size_mb:128"}


def test_main_sets_the_allocator_default(monkeypatch, capsys):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # set first: teardown restores the original
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    rc, _, _ = _main(capsys, ["continue", "/nonexistent.mp4", "--prompt", "x", "--checkpoint", "/nonexistent",
                              "--out", "/tmp/never.mp4"])
    assert rc != 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
