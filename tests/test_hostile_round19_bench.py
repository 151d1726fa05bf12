"""Round 19 (bench audit): values of a flag dropped without a word, the MFU denominator in another
dtype than the run's, bad flag values of bench/pipeline_e2e_gpu.py accepted."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ctx(**kw):
    from bench.suites import Context

    return Context(device=torch.device("cpu"), dtype=torch.float32, log=lambda m: None, **kw)


@pytest.mark.parametrize("suite", ["cache", "cached-attn"])
def test_cond_frames_that_do_not_fit_the_grid_are_reported_skipped(suite):
    """--cond-frames 13,97 on a 24-latent grid: 97 frames are 25 latents, no noisy latent left. The suites
    timed 13 alone and said nothing of 97 (the run exited 0 as if it had measured what was asked)."""
    from bench.suites import load_suite

    cs = load_suite(suite).cases(_ctx(quick=True, cond_frames=(13, 97)))
    timed = {c.params["cond_frames"] for c in cs if not c.skip}
    left = [c for c in cs if c.params.get("cond_frames") == 97]
    assert timed == {13}
    assert left and all(c.skip and "97 cond frames" in c.skip and "no noisy latent" in c.skip for c in left), \
        [(c.name, c.skip) for c in left]
    assert all(c.params.get("cond_latents") == 25 for c in left)


def test_cli_names_the_cond_frames_it_could_not_run(capsys):
    from bench.cli import main

    rc = main(["--quick", "--suite", "cache", "--cond-frames", "13,97", "--no-write"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "97 cond frames = 25 cond latents leave no noisy latent" in out
    assert "3 skipped" in out  # cache off, on and build of the 97-frame case


def test_mfu_denominator_is_measured_in_the_runs_dtype(monkeypatch):
    """MFU was the run's TFLOP/s over a bf16 matmul whatever --dtype said: an fp32 (no TF32) DiT step at
    its own peak read ~7% MFU on an H100. The ceiling is measured in the dtype the suites run."""
    from bench import cli

    seen = {}

    class _Stop(Exception):
        pass

    def fake_peak(device, dtype):
        seen["args"] = (device, dtype)
        raise _Stop

    monkeypatch.setattr(cli, "_device", lambda arg: torch.device("cuda"))
    monkeypatch.setattr(cli._machine, "machine_header", lambda device: {"device_slug": "x", "date": "d"})
    monkeypatch.setattr(cli._machine, "format_header", lambda header: "")
    monkeypatch.setattr(cli, "_timing_peak", fake_peak)
    for flag, dtype in (("fp32", torch.float32), ("fp16", torch.float16), (None, torch.bfloat16)):
        seen.clear()
        with pytest.raises(_Stop):
            cli.main(["--quick", "--no-write"] + (["--dtype", flag] if flag else []))
        assert seen["args"] == (torch.device("cuda"), dtype)


def _e2e():
    spec = importlib.util.spec_from_file_location("pipeline_e2e_gpu", os.path.join(ROOT, "bench", "pipeline_e2e_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, msg", [
    (["--cache", "of"], "--cache"),  # ran the cache-off run alone, recorded as what was asked
    (["--cache", "on,on"], "--cache"),
    (["--cache", ","], "--cache"),
    (["--modes", "distil"], "--modes"),  # refused only after building every component (minutes on the GPU)
    (["--modes", "basic,basic"], "--modes"),
])
def test_pipeline_e2e_script_refuses_bad_lists(argv, msg, capsys):
    with pytest.raises(SystemExit):
        _e2e().parse_args(["--out", "x"] + argv)
    assert msg in capsys.readouterr().err


def test_pipeline_e2e_script_takes_good_lists():
    a = _e2e().parse_args(["--out", "x", "--cache", "off", "--modes", "distill"])
    assert (a.cache, a.modes) == ("off", "distill")
