"""Round 49: loose ends of the ``longcat-vc`` command line (absurd --frames / --segments, --input-fps 1e300's
message, what --steps sets with --refine); each test fails on the code before."""

import re
import types

import pytest

from longcat_vc import cli
from vc_components import CLI_RUN as RUN, cli_fixtures, run_cli_without_loading

GiB = 1024 ** 3


ckpt, video = cli_fixtures()


def _with(run, flag, value):
    run = list(run)
    run[run.index(flag) + 1] = value
    return run


def test_absurd_frames_refused_before_the_load_naming_the_limit(ckpt, video, tmp_path, capsys, monkeypatch):
    """``--frames 2000001`` on cpu loaded the weights and ran the DiT for minutes (full attention over 4M tokens
    of the tiny checkpoint) before failing; it is now refused before the load (exit 2), naming --frames, the
    memory it needs and the most frames that fit."""
    monkeypatch.setattr(cli, "_available_host_bytes", lambda: 8 * GiB, raising=False)
    rc, err = run_cli_without_loading(capsys, ["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out",
                                               str(tmp_path / "o.mp4")] + _with(RUN, "--frames", "2000001"),
                                      monkeypatch)
    assert rc == 2, err
    assert "--frames 2000001" in err and "GiB" in err, err
    most = int(re.search(r"at most --frames (\d+) fits", err).group(1))
    assert 9 <= most < 2000001 and (most - 1) % 4 == 0, err
    # the limit it names passes the check (and goes on to the load)
    rc, err = run_cli_without_loading(capsys, ["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out",
                                               str(tmp_path / "o.mp4")] + _with(RUN, "--frames", str(most)),
                                      monkeypatch)
    assert rc == 1 and "weights were loaded" in err, err


def test_absurd_segments_refused_before_the_load(ckpt, video, tmp_path, capsys, monkeypatch):
    """``extend --segments 10**9`` (each segment's frames kept for the output) ran until the host memory ran out;
    it is now refused before the load, naming --segments and how many fit."""
    monkeypatch.setattr(cli, "_available_host_bytes", lambda: 8 * GiB, raising=False)
    rc, err = run_cli_without_loading(capsys, ["extend", video, "--prompt", "a", "--segments", str(10**9),
                                               "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4")] + RUN,
                                      monkeypatch)
    assert rc == 2, err
    assert "--segments 1000000000" in err and re.search(r"at most --segments \d+ fit", err), err


@pytest.mark.parametrize("res,hw,frames,segments,on_cpu", [
    ("480p", (480, 832), 93, 1, False), ("720p", (704, 1280), 93, 1, False), ("720p", (704, 1280), 93, 20, False),
    ("480p", (480, 832), 93, 1, True)])
def test_upstream_shapes_are_far_below_the_bound(res, hw, frames, segments, on_cpu):
    """Guard: what a real run at 480p / 720p with upstream's 93 frames and 13 cond frames counts (the released
    48-layer DiT; a 10 s 720p input at 15 fps; extend with 20 segments) stays far below a machine's memory."""
    from longcat_vc.config import DiTConfig

    cfg = DiTConfig()
    args = types.SimpleNamespace(cond_frames=13, refine=False, guidance=None, mode="basic", no_kv_cache=False)
    video = types.SimpleNamespace(num_frames=150, height=720, width=1280)
    need = cli._run_bytes(cfg, args, video, hw, frames, segments, on_cpu, 4 if on_cpu else 2)
    assert need < (40 if on_cpu else 16) * GiB, need / GiB


def test_input_fps_1e300_message_has_no_300_digit_stride(ckpt, video, tmp_path, capsys, monkeypatch):
    """``--input-fps 1e300``: the "fewer than --cond-frames" refusal printed the step between kept frames as a
    299-digit integer ("every 6666...344th frame"); it is now 3 significant digits, and names --input-fps."""
    rc, err = run_cli_without_loading(capsys, ["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out",
                                               str(tmp_path / "o.mp4"), "--input-fps", "1e300"] + RUN, monkeypatch)
    assert rc == 2, err
    assert max(len(d) for d in re.findall(r"\d+", err)) < 12, err
    assert "--input-fps" in err and "--cond-frames" in err, err


def test_steps_help_says_refine_sets_only_stage_1():
    """``continue --refine --steps N``: --steps sets stage 1 only (the refinement runs its own 50-step schedule,
    SPEC 11), which the help did not say; it now does and points to ``refine --steps``, whose help says what it
    sets (the base schedule entered at --t-thresh: 5 DiT steps at 50)."""
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for cmd in ("continue", "extend"):
        h = next(a.help for a in subs[cmd]._actions if a.dest == "steps")
        assert "--refine" in h and "refine --steps" in h, h
    h = next(a.help for a in subs["refine"]._actions if a.dest == "steps")
    assert "--t-thresh" in h and "5 DiT steps" in h, h


def test_frames_beyond_the_gpu_refused_before_the_load(ckpt, video, tmp_path, capsys, monkeypatch):
    """``--frames 2000001`` on CUDA: the load-time fit check estimates 480p / 93 frames whatever --frames says, so
    the weights loaded and the run ran out of GPU memory after the load; a run whose ``memory='low'`` estimate at
    its own shape exceeds the GPU's total memory is now refused before the load, naming the most frames that fit.
    (A CPU stands in for a 12 GiB GPU.)"""
    import torch

    monkeypatch.setattr(cli, "_device", lambda args: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=12 * GiB))
    monkeypatch.setattr(cli, "_available_host_bytes", lambda: 1024 * GiB)  # the host has room: the GPU is the bound
    argv = ["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4")]
    rc, err = run_cli_without_loading(capsys, argv + _with(RUN, "--frames", "2000001"), monkeypatch)
    assert rc == 2 and "--frames 2000001" in err and "cuda memory even in --memory low" in err, err
    most = int(re.search(r"at most --frames (\d+) fits", err).group(1))
    rc, err = run_cli_without_loading(capsys, argv + _with(RUN, "--frames", str(most)), monkeypatch)
    assert rc == 1 and "weights were loaded" in err, err


def test_upstream_shapes_fit_a_24_gib_gpu_in_low():
    """Guard: the GPU bound (``memory='low'`` at the run's shape) keeps 480p / 720p at 93 frames, 13 cond, CFG,
    far inside a 24 GiB card."""
    from longcat_vc.config import DiTConfig
    from longcat_vc.memory import estimate_peak_bytes

    for hw in ((480, 832), (704, 1280)):
        assert estimate_peak_bytes(DiTConfig(), "low", height=hw[0], width=hw[1])["peak"] < 20 * GiB
