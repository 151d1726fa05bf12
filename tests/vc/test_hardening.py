"""Hostile-input tests of longcat_vc (issue 13): stale KV caches (class 3), loaded files that do not
match what they claim (class 4), the CLI destroying input or finding problems late and interrupted
writes (class 5), NaN LoRA multipliers and dtype strings (class 7). Properties where the input
space is wide (hypothesis, modest example counts; see tests/conftest.py)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from test_dit import make_inputs
from tiny_ckpt import (
    LORA_TARGETS_CFG_STEP,
    model_from_state_dict,
    random_state_dict,
    tiny_config,
    write_longcat_lora,
    write_upstream_dit,
)

from longcat_vc.dit import LongCatDiT
from longcat_vc.loading import CheckpointError, load_dit, resolve_dit_dir


@pytest.fixture(scope="module")
def base():
    cfg = tiny_config()
    return cfg, random_state_dict(cfg, seed=3)


# ----------------------------------------------------------------------------- class 3: stale KV cache


CHANGES = ["enable", "disable", "fuse", "unfuse", "multiplier", "reload_lora", "load_state_dict", "edit_weight",
           "replace_param", "bsa"]


def _apply(change, m, lora, sd):
    if change in ("multiplier", "load_state_dict") and any(getattr(x, "lora_fused", None) for x in m.modules()):
        # refused while fused (the unfuse would subtract another delta): unfuse, then change
        with pytest.raises(RuntimeError, match="fused"):
            if change == "multiplier":
                m.blocks[0].attn.qkv.lora_adapters["a"].multiplier = 0.3
            else:
                m.load_state_dict(sd)
        m.unfuse_lora()
    if change == "enable":
        m.enable_loras(["a"])
    elif change == "disable":
        m.disable_loras()
    elif change == "fuse":
        m.fuse_lora()
    elif change == "unfuse":
        m.unfuse_lora()
    elif change == "multiplier":
        m.blocks[0].attn.qkv.lora_adapters["a"].multiplier = 0.3
    elif change == "reload_lora":
        m.load_lora(lora, "a", multiplier=2.0)
    elif change == "load_state_dict":
        m.load_state_dict(sd)
    elif change == "edit_weight":
        with torch.no_grad():
            m.final_layer.linear.weight.mul_(1.01)
    elif change == "bsa":
        # on (the cache was built with it off): a toggle applied twice would be no change at all
        # (hypothesis drew ["bsa", "bsa"] once in CI and the fresh cache was rightly accepted)
        m.config.enable_bsa = True
        m.config.bsa_params = {"sparsity": 0.5, "chunk_3d_shape_q": [1, 2, 2]}
    else:
        m.final_layer.linear.weight = torch.nn.Parameter(m.final_layer.linear.weight.detach().clone())


@settings(max_examples=8)
@given(changes=st.lists(st.sampled_from(CHANGES), min_size=1, max_size=3))
@example(changes=["bsa", "bsa"])
def test_stale_kv_cache_is_refused_after_any_change(tmp_path_factory, base, changes):
    cfg, sd = base
    lora = str(tmp_path_factory.mktemp("lora") / "a.safetensors")
    write_longcat_lora(lora, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=5)
    m = model_from_state_dict(cfg, copy.deepcopy(sd))
    m.config = copy.deepcopy(m.config)  # the "bsa" change edits it
    m.load_lora(lora, "a")
    m.enable_loras(["a"])
    if "unfuse" in changes[:1]:
        m.fuse_lora()
    x, t, y, mask = make_inputs(cfg, B=1, T=3)
    with torch.no_grad():
        cache = m.build_kv_cache(x[:, :, :1])
        m(x[:, :, 1:], t, y, mask, kv_cache=cache)  # fresh: accepted
        for ch in changes:
            _apply(ch, m, lora, sd)
        with pytest.raises(ValueError, match="kv_cache: stale"):
            m(x[:, :, 1:], t, y, mask, kv_cache=cache)
        fresh = m.build_kv_cache(x[:, :, :1])
        out = m(x[:, :, 1:], t, y, mask, kv_cache=fresh)
        off = m(x, torch.stack([torch.zeros_like(t), t, t], 1), y, mask, num_cond_latents=1)[:, :, 1:]
    assert torch.allclose(out, off, atol=1e-4, rtol=1e-4), "rebuilt cache disagrees with cache off"


for _change in CHANGES:  # every kind of change at least once, whatever hypothesis draws
    test_stale_kv_cache_is_refused_after_any_change = example(changes=[_change])(
        test_stale_kv_cache_is_refused_after_any_change)


def test_kv_cache_stays_fresh_under_block_streaming(tmp_path, base):
    """The memory modes' streamer moves every block's parameters (``.data``) and the active LoRA
    tensors between CPU homes and device copies each forward: values unchanged, so a cache built
    before or while streaming stays fresh step after step; a real change is still found."""
    from longcat_vc.memory import BlockStreamer

    cfg, sd = base
    lora = str(tmp_path / "a.safetensors")
    write_longcat_lora(lora, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=5)
    m = model_from_state_dict(cfg, copy.deepcopy(sd))
    m.load_lora(lora, "a")
    m.enable_loras(["a"])  # active, unfused: the streamer swaps its down/up tensors too
    x, t, y, mask = make_inputs(cfg, B=1, T=3)
    with torch.no_grad():
        before = m.build_kv_cache(x[:, :, :1])
        for p in m.parameters():  # what attach does with CUDA (pinned homes) and .to() does: new storage
            p.data = p.data.clone()
        streamer = BlockStreamer(m, "cpu", pin=False).attach()
        try:
            cache = m.build_kv_cache(x[:, :, :1])
            outs = [m(x[:, :, 1:], t, y, mask, kv_cache=c) for c in (cache, cache, before)]
            m.blocks[0].attn.qkv.lora_adapters["a"].multiplier = 0.5
            with pytest.raises(ValueError, match="kv_cache: stale.*LoRA"):
                m(x[:, :, 1:], t, y, mask, kv_cache=cache)
        finally:
            streamer.detach()
    assert torch.equal(outs[0], outs[1]) and torch.allclose(outs[0], outs[2])


# ----------------------------------------------------------------------------- class 4: loaded files


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.float16])
def test_checkpoint_tensor_of_another_dtype_is_refused(tmp_path, base, bad_dtype):
    cfg, sd = base
    folder = str(tmp_path / "dit")
    write_upstream_dit(folder, cfg, sd, shards=1)
    (f,) = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors")]
    tensors = load_file(f)
    key = "final_layer.linear.weight"
    tensors[key] = tensors[key].to(bad_dtype)
    save_file(tensors, f)
    for dtype in (None, torch.float32):
        with pytest.raises(CheckpointError, match=key):
            load_dit(folder, dtype=dtype, cls=LongCatDiT)


def test_dit_and_transformer_both_present_is_ambiguous(tmp_path, base):
    cfg, sd = base
    write_upstream_dit(str(tmp_path / "dit"), cfg, sd, shards=1)
    write_upstream_dit(str(tmp_path / "transformer"), cfg, sd, shards=1)
    with pytest.raises(CheckpointError, match="both"):
        resolve_dit_dir(str(tmp_path))
    assert resolve_dit_dir(str(tmp_path / "dit")).endswith("dit")  # explicit choice works


@settings(max_examples=10)
@given(shape=st.sampled_from([(2,), (1, 2), (3, 1)]), value=st.sampled_from([0.5, float("nan"), float("inf")]))
def test_lora_alpha_scale_must_be_a_finite_scalar(tmp_path_factory, base, shape, value):
    cfg, sd = base
    p = str(tmp_path_factory.mktemp("alpha") / "a.safetensors")
    t = write_longcat_lora(p, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=4)
    key = next(k for k in t if k.endswith("alpha_scale"))
    t[key] = torch.full(shape, value) if value == value and value != float("inf") else torch.tensor(value)
    if t[key].numel() == 1 and value == 0.5:
        return  # a finite scalar is fine
    save_file({k: v.contiguous() for k, v in t.items()}, p)
    m = model_from_state_dict(cfg, sd)
    with pytest.raises(ValueError, match="alpha_scale"):
        m.load_lora(p, "a")


@pytest.mark.parametrize("mult", [float("nan"), float("inf"), "1.0"])
def test_nan_lora_multiplier_is_refused(tmp_path, base, mult):
    cfg, sd = base
    p = str(tmp_path / "a.safetensors")
    write_longcat_lora(p, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=4)
    m = model_from_state_dict(cfg, sd)
    with pytest.raises((ValueError, TypeError), match="multiplier"):
        m.load_lora(p, "a", multiplier=mult)
    m.load_lora(p, "a")
    with pytest.raises((ValueError, TypeError), match="multiplier"):
        m.blocks[0].attn.qkv.lora_adapters["a"].multiplier = mult


@pytest.mark.parametrize("dtype", ["bf16", "float32", torch.int32])
def test_dtype_string_is_a_dtype_error(tmp_path, base, dtype):
    cfg, sd = base
    write_upstream_dit(str(tmp_path / "dit"), cfg, sd, shards=1)
    with pytest.raises(TypeError, match="dtype"):
        load_dit(str(tmp_path), dtype=dtype, cls=LongCatDiT)
    with pytest.raises(TypeError, match="dtype"):
        LongCatDiT(cfg, dtype=dtype)


# ----------------------------------------------------------------------------- class 5: CLI and writes


@pytest.fixture
def video(tmp_path):
    from longcat_vc.video_io import write_video

    p = str(tmp_path / "in.mp4")
    write_video(p, np.zeros((9, 32, 48, 3), np.uint8), fps=15)
    return p


def _run_cli(capsys, argv, monkeypatch):
    """Runs the CLI with model loading made to fail loudly: every error below must come first."""
    from vc_components import run_cli_without_loading

    return run_cli_without_loading(capsys, argv, monkeypatch)


@pytest.mark.parametrize("case", ["out_is_input", "crf", "crf_neg", "zero_res", "odd_res", "unwritable", "few_frames",
                                  "timings_is_out", "bad_device"])
def test_cli_finds_bad_arguments_before_loading(tmp_path, capsys, monkeypatch, video, case):
    out = str(tmp_path / "o.mp4")
    argv = ["continue", video, "--prompt", "a", "--checkpoint", str(tmp_path), "--out", out, "--cond-frames", "5",
            "--frames", "9"]
    expect = None
    if case == "out_is_input":
        argv[argv.index(out)] = video
        expect = "overwritten"
    elif case == "crf":
        argv += ["--crf", "99"]
        expect = "--crf"
    elif case == "crf_neg":
        argv += ["--crf", "-1"]
        expect = "--crf"
    elif case == "zero_res":
        argv += ["--resolution", "0x0"]
        expect = "--resolution"
    elif case == "odd_res":
        argv += ["--resolution", "40x48"]
        expect = "multiples of 16"
    elif case == "unwritable":
        ro = tmp_path / "ro"
        ro.mkdir()
        if os.geteuid() == 0:
            # root ignores permission bits: a path under a regular file is unwritable for anyone
            (tmp_path / "file").write_text("x")
            argv[argv.index(out)] = str(tmp_path / "file" / "o.mp4")
            expect = "is a file, not a folder"  # round 29: was "folder does not exist", for a path that exists
        else:
            ro.chmod(0o500)
            argv[argv.index(out)] = str(ro / "o.mp4")
            expect = "cannot write"
    elif case == "few_frames":
        argv[argv.index("5")] = "13"
        argv[argv.index("9")] = "17"
        expect = "fewer than --cond-frames 13"
    elif case == "timings_is_out":
        argv += ["--timings-json", out]
        expect = "--timings-json"
    elif case == "bad_device":
        argv += ["--device", "nonsense"]
        expect = "--device"
    rc, err = _run_cli(capsys, argv, monkeypatch)
    assert rc != 0 and expect in err, err
    if case == "few_frames":
        assert video in err
    assert os.path.getsize(video) > 0  # input untouched


@pytest.mark.parametrize("case", ["refine_out_is_stage1", "refine_out_is_video", "refine_timings_is_video",
                                  "refine_res", "refine_crf", "continue_refine_out_is_input", "fp8_cpu"])
def test_cli_new_commands_and_flags_checked_before_loading(tmp_path, capsys, monkeypatch, video, case):
    """The refine subcommand and the --refine / --memory / --fp8 / --vae-tiling flags go through the
    same checks before any weights load (an output never overwrites an input)."""
    from longcat_vc.refine import REFINEMENT_LORA_FILE

    ckpt = tmp_path / "ckpt"
    (ckpt / os.path.dirname(REFINEMENT_LORA_FILE)).mkdir(parents=True)
    (ckpt / REFINEMENT_LORA_FILE).write_bytes(b"")  # present (its content is read after the checks)
    stage1 = str(tmp_path / "s1.mp4")
    with open(video, "rb") as f, open(stage1, "wb") as g:
        g.write(f.read())
    out = str(tmp_path / "o.mp4")
    refine = ["refine", stage1, "--video", video, "--checkpoint", str(ckpt), "--out", out, "--device", "cpu"]
    cont = ["continue", video, "--prompt", "a", "--checkpoint", str(ckpt), "--out", out, "--cond-frames", "5",
            "--frames", "9", "--device", "cpu", "--memory", "low", "--vae-tiling"]
    argv, expect = {
        "refine_out_is_stage1": ([stage1 if a == out else a for a in refine], "overwritten"),
        "refine_out_is_video": ([video if a == out else a for a in refine], "overwritten"),
        "refine_timings_is_video": (refine + ["--timings-json", video], "--timings-json"),
        "refine_res": (refine + ["--resolution", "720x1280"], "multiples of 64"),
        "refine_crf": (refine + ["--crf", "52"], "--crf"),
        "continue_refine_out_is_input": ([video if a == out else a for a in cont] + ["--refine"], "overwritten"),
        "fp8_cpu": (cont + ["--fp8"], "--fp8"),
    }[case]
    rc, err = _run_cli(capsys, argv, monkeypatch)
    assert rc == 2 and expect in err, err
    assert os.path.getsize(video) > 0 and os.path.getsize(stage1) > 0  # inputs untouched


_SIGTERM_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from longcat_vc import video_io

    real = video_io._write_av
    def slow(tmp, frames, fps, crf):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        print("WRITING", flush=True)
        time.sleep(30)
    video_io._write_av = slow
    video_io.write_video(sys.argv[1], np.zeros((2, 16, 16, 3), np.uint8), 15, backend="av")
""")


def test_sigterm_during_write_leaves_nothing(tmp_path):
    out = tmp_path / "o.mp4"
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert p.stdout.readline().strip() == "WRITING"
        assert any(n.startswith(".o.partial") for n in os.listdir(tmp_path))
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == -signal.SIGTERM  # the signal still ends the process
    assert os.listdir(tmp_path) == []  # no partial, no output


def test_write_video_refuses_bad_crf_before_writing(tmp_path):
    from longcat_vc.video_io import write_video

    for crf in (52, -1, 1.5, True):
        with pytest.raises((TypeError, ValueError), match="crf"):
            write_video(str(tmp_path / "o.mp4"), np.zeros((2, 16, 16, 3), np.uint8), 15, crf=crf)
    assert os.listdir(tmp_path) == []


def test_lora_with_an_integer_tensor_is_refused(tmp_path, base):
    cfg, sd = base
    p = str(tmp_path / "a.safetensors")
    t = write_longcat_lora(p, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=4)
    key = next(k for k in t if k.endswith("lora_down.weight"))
    t[key] = (t[key] * 100).to(torch.int64)
    save_file({k: v.contiguous() for k, v in t.items()}, p)
    m = model_from_state_dict(cfg, sd)
    with pytest.raises(ValueError, match="non-floating"):
        m.load_lora(p, "a")
