"""Round 33 (GPU bench scripts, checked on CPU): a peak that was not the part's own, values that
made a ratio meaningless or failed only after minutes of model building, a result file lost at the
end of a run."""

import argparse
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"r33_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _refused(call, argv, flag, capsys):
    """``call(argv)`` exits 2 (argparse) with ``flag`` named on stderr."""
    with pytest.raises(SystemExit) as e:
        call(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_refine_step_timings_reset_the_peak_before_each_depth(monkeypatch):
    """time_steps read torch.cuda.max_memory_allocated without a reset: each depth's "peak_memory_gib"
    was the maximum since the process started (the check's models, an earlier deeper depth), so
    --depths 48,8 reported depth 48's peak for depth 8. The window now opens before the depth's
    model is built, ahead of any timed call."""
    import torch

    mod = _script("refine_step_gpu")
    events = []
    monkeypatch.setattr(mod, "_reset_peak", lambda device: events.append(("reset", device.type)))
    real_call = mod._Timer.__call__

    def timed(self, fn):
        events.append(("timed",))
        return real_call(self, fn)

    monkeypatch.setattr(mod._Timer, "__call__", timed)
    args = argparse.Namespace(smoke=True, upstream=None, rounds=1)
    row = mod.time_steps(args, torch.device("cpu"), 1)
    assert events and events[0] == ("reset", "cpu"), events[:3]
    assert sum(e[0] == "reset" for e in events) == 1
    assert len(row["all_ms"]["ours_cache_on"]) == 1


@pytest.mark.parametrize("argv, flag", [
    (["--rounds", "0"], "--rounds"),  # statistics.median([]) after the check and the model builds
    (["--rounds", "-2"], "--rounds"),
    (["--depths", "8,x"], "--depths"),  # a bare int() traceback
    (["--depths", "0"], "--depths"),
    (["--depths", ","], "--depths"),  # no depth: no step timings, without a word
    (["--stage-depth", "0"], "--stage-depth"),
    (["--stage-cap-gib", "nan"], "--stage-cap-gib"),  # NaN <= 0 is False: failed in the stage, after the steps
])
def test_refine_step_script_refuses_bad_values_up_front(argv, flag, capsys, tmp_path):
    _refused(_script("refine_step_gpu").main, ["--out", str(tmp_path / "r.json")] + argv, flag, capsys)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--short-steps", "0"], "--short-steps"),  # fp8 vs bf16 "final latents" were the same noise: rel L2 0.0
    (["--text-layers", "30"], "--text-layers"),  # weights scaled to 24 layers by -6 layers
    (["--text-layers", "0"], "--text-layers"),  # IndexError after the whole DiT table
    (["--steps", "-1"], "--steps"),  # ran as 0
    (["--depth", "0"], "--depth"),
])
def test_memory_modes_script_refuses_counts_that_void_its_numbers(argv, flag, capsys):
    _refused(_script("memory_modes_gpu").parse_args, ["--out", "x.json"] + argv, flag, capsys)


def test_memory_modes_script_takes_edge_counts():
    a = _script("memory_modes_gpu").parse_args(["--out", "x.json", "--steps", "0", "--text-layers", "24"])
    assert (a.steps, a.text_layers) == (0, 24)


def test_memory_modes_checks_streamed_modes_whatever_the_modes_order(tmp_path):
    """--modes low,resident ran low before resident: low's output had nothing to be compared with, and
    its row carried no equal_to_resident at all (the bit-for-bit check of the streamed mode skipped
    without a word). Resident now runs first."""
    mod = _script("memory_modes_gpu")
    out = tmp_path / "m.json"
    mod.main(["--out", str(out), "--smoke", "--depth", "1", "--variants", "distill", "--modes", "low,resident",
              "--steps", "0", "--no-fp8", "--vae", "none", "--text-layers", "1"])
    rows = json.load(open(out))["dit_rows"]
    assert [r["mode"] for r in rows] == ["resident", "low"]
    assert rows[1]["equal_to_resident"] is True


@pytest.mark.parametrize("argv, flag", [
    (["--steps-basic", "0"], "--steps-basic"),
    (["--steps-distill", "-1"], "--steps-distill"),
    (["--depth", "0"], "--depth"),
    (["--frames", "0"], "--frames"),
    (["--cond-frames", "0"], "--cond-frames"),
    (["--text-layers", "0"], "--text-layers"),
    (["--resolution", "1080p"], "--resolution"),  # a bare KeyError after every component was built
    (["--cond-frames", "13", "--input-frames", "5"], "--input-frames"),
])
def test_pipeline_e2e_script_refuses_bad_counts_up_front(argv, flag, capsys):
    _refused(_script("pipeline_e2e_gpu").parse_args, ["--out", "x"] + argv, flag, capsys)


def test_pipeline_e2e_script_takes_good_counts():
    a = _script("pipeline_e2e_gpu").parse_args(["--out", "x", "--resolution", "720p", "--input-frames", "13"])
    assert (a.resolution, a.input_frames, a.cond_frames) == ("720p", 13, 13)


@pytest.mark.parametrize("argv, flag", [
    (["--rounds", "0"], "--rounds"),  # ValueError from interleaved() after the inputs were built
    (["--budget", "nan"], "--budget"),  # int(nan) inside reps_for, after the warm-up
    (["--budget", "-1"], "--budget"),
    (["--budget", "inf"], "--budget"),
])
def test_ab_parser_refuses_bad_rounds_and_budget(argv, flag, capsys):
    from bench.timing import ab_parser

    _refused(ab_parser("doc", budget=1.0, cases="a").parse_args, ["--out", "x"] + argv, flag, capsys)


def test_ab_parser_takes_good_values():
    from bench.timing import ab_parser

    a = ab_parser("doc", budget=1.0, cases="a").parse_args(["--out", "x", "--rounds", "2", "--budget", "0"])
    assert (a.rounds, a.budget) == (2, 0.0)


def test_wan_step_script_makes_its_out_folder_before_timing(tmp_path, monkeypatch):
    """The JSON was opened only after the check, the step timings and the lse timings: a --out in a
    folder that did not exist was a FileNotFoundError at the end, every number lost."""
    pytest.importorskip("diffusers")
    import bench.machine

    class Stop(Exception):
        pass

    def stop(device):
        raise Stop

    monkeypatch.setattr(bench.machine, "machine_header", stop)
    out = tmp_path / "new" / "deeper" / "wan.json"
    with pytest.raises(Stop):
        _script("wan_step_gpu").main(["--out", str(out)])
    assert out.parent.is_dir()


def test_refine_stage_warms_up_every_kind_it_times(monkeypatch):
    """The stage warm-up ran "ours" (BSA + KV cache) alone: the dense path's attention kernels were
    compiled inside its timed run, so speedup_total / speedup_denoise (dense / ours) carried the
    dense path's first-call cost in our favour. Each timed kind now has an untimed warm-up first."""
    pytest.importorskip("diffusers")
    import numpy as np
    import torch

    import longcat_vc.refine as refine_mod
    from longcat_vc.pipeline import VideoContinuationPipeline

    mod = _script("refine_step_gpu")
    real_state = refine_mod.refine_state
    calls = []

    class Out:
        def __init__(self, steps):
            self.timings = {"denoise_steps": [0.1] * steps, "total": 1.0, "denoise": 0.5}
            self.latents = torch.zeros(1, 16, 2, 4, 4)
            self.frames = np.zeros((5, 8, 8, 3), np.uint8)

    def fake_refine(self, frames, prompt, **kw):
        kind = "ours" if kw["use_kv_cache"] else ("dense" if refine_mod.refine_state is not real_state else "other")
        calls.append((kind, kw["num_inference_steps"]))
        return Out(kw["num_inference_steps"])

    monkeypatch.setattr(VideoContinuationPipeline, "refine", fake_refine)
    args = argparse.Namespace(smoke=True, stage_memory="resident", stage_cap_gib=None, kinds=["ours", "dense"],
                              stage_steps=3)
    res = mod.time_stage(args, torch.device("cpu"), 1)
    timed = [k for k, n in calls if n == 3]  # --stage-steps 3; warm-ups run 2 steps
    assert timed == ["ours", "dense"] and calls[-2:] == [("ours", 3), ("dense", 3)], calls
    assert {k for k, n in calls[:-2] if n == 2} == {"ours", "dense"}, calls
    assert set(res["runs"]) == {"ours", "dense"}


def _standin(monkeypatch):
    from bench.upstream import flash_attn_or_standin

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # "not installed"; restored after the test
    assert "stand-in" in flash_attn_or_standin()
    return sys.modules["flash_attn"]


def _ref_attn(q, k, v, scale):
    """fp64 softmax attention, [S, H, D] in and out."""
    q, k, v = (z.double().transpose(0, 1) for z in (q, k, v))
    return (((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v).transpose(0, 1)


def test_flash_attn_standin_honours_softmax_scale_in_varlen(monkeypatch):
    """The varlen stand-in took softmax_scale into **kwargs and ran SDPA at 1/sqrt(D): a caller's
    scale was dropped and upstream's output was that of another attention, without a word."""
    import torch

    fa = _standin(monkeypatch)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    q, k, v = (torch.randn(11, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, softmax_scale=0.05)
    ref = torch.cat([_ref_attn(q[a:b], k[a:b], v[a:b], 0.05) for a, b in ((0, 4), (4, 11))])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(4, 0)), dict(softcap=30.0), dict(dropout_p=0.1)])
def test_flash_attn_standin_refuses_options_it_cannot_honour(monkeypatch, kw):
    """causal=True (and windows, softcap, dropout) went into **kwargs: the stand-in returned full
    non-causal attention as if the option had been applied."""
    import torch

    fa = _standin(monkeypatch)
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(NotImplementedError, match=next(iter(kw))):
        fa.flash_attn_func(q, q, q, **kw)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=next(iter(kw))):
        fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 6, 6, **kw)
    fa.flash_attn_func(q, q, q, causal=False, window_size=(-1, -1), dropout_p=0.0)  # defaults pass
