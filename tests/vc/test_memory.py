"""Memory modes (issue 17): the block streamer visits the blocks in order, frees them, handles the
KV cache and LoRA (fused and unfused) and gives the resident result bit for bit; every mode of the
pipeline gives the resident result; the fit check names what a mode needs and which mode fits.

On CPU the streamer's copies are synchronous (no CUDA streams): these tests check order, freeing
and exactness; the overlap of copies with compute and the peak memory are GPU facts
(``bench/memory_modes_gpu.py``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from longcat_vc.config import DiTConfig
from longcat_vc.memory import (
    MEMORY_MODES,
    BlockStreamer,
    MemoryModeError,
    check_memory_fits,
    estimate_peak_bytes,
    memory_plan,
)
from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora

GiB = 2**30


def _models(depth=3, seed=None):
    cfg = tiny_config(depth=depth)
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()) if seed is None else seed)
    return cfg, model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)


def _step(model, cfg, x, t, y, mask, c, *, offload=False):
    with torch.no_grad():
        cache = model.build_kv_cache(x[:1, :, :c], offload=offload)
        on = model(x[:, :, c:], t, y, mask, kv_cache=cache)
        ts = t[:, None].repeat(1, x.shape[2])
        ts[:, :c] = 0
        off = model(x, ts, y, mask, num_cond_latents=c)
    return cache, on, off


def _nan_free_equal(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.equal(a, b), f"max abs diff {(a - b).abs().max().item()}"


@pytest.mark.parametrize("offload", [False, True])
def test_streamer_exact_with_kv_cache(offload):
    cfg, ref, streamed = _models()
    x, t, y, mask = make_inputs(cfg, B=2, T=4, shared_cond=2)
    cache_r, on_r, off_r = _step(ref, cfg, x, t, y, mask, 2, offload=offload)
    BlockStreamer(streamed, "cpu").attach()
    cache_s, on_s, off_s = _step(streamed, cfg, x, t, y, mask, 2, offload=offload)
    for a, b in zip(cache_r.keys + cache_r.values, cache_s.keys + cache_s.values):
        _nan_free_equal(a, b)
    _nan_free_equal(on_r, on_s)
    _nan_free_equal(off_r, off_s)


def test_streamer_order_and_freeing():
    cfg, _, model = _models(depth=4)
    homes = {}
    streamer = BlockStreamer(model, "cpu").attach()
    for i, blk in enumerate(model.blocks):
        homes[i] = {n: p.data_ptr() for n, p in blk.named_parameters()}
    seen = []

    def probe(i):
        def hook(module, args):
            # During block i: its parameters are the loaded copies, every other block's are at home.
            for j, blk in enumerate(model.blocks):
                moved = [p.data_ptr() != homes[j][n] for n, p in blk.named_parameters()]
                assert all(moved) if j == i else not any(moved), (i, j, moved)
            seen.append(i)

        return hook

    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(probe(i))  # registered after the streamer's: runs after it
    streamer.log = []
    x, t, y, mask = make_inputs(cfg, B=2, T=3)
    with torch.no_grad():
        out = model(x, t, y, mask)
    assert torch.isfinite(out).all()
    assert seen == [0, 1, 2, 3]
    attach_free = [e for e in streamer.log if e[0] != "load"]
    assert attach_free == [(k, i) for i in range(4) for k in ("attach", "free")]
    # each block is loaded once, one block ahead of its use; block 0 is prefetched for the next step
    loads = [i for k, i in streamer.log if k == "load"]
    assert loads == [0, 1, 2, 3, 0]
    assert streamer.log.index(("load", 1)) < streamer.log.index(("attach", 1))
    assert streamer.log.index(("load", 2)) > streamer.log.index(("attach", 1))
    for i, blk in enumerate(model.blocks):  # all freed: parameters back at their CPU copies
        assert {n: p.data_ptr() for n, p in blk.named_parameters()} == homes[i]
    assert set(streamer._loaded) == {0} and not streamer._active
    streamer.release()
    assert not streamer._loaded
    # a second step uses the prefetched block 0 (no extra load of it before its attach)
    streamer.log = []
    with torch.no_grad():
        out2 = model(x, t, y, mask)
    _nan_free_equal(out, out2)
    assert streamer.log[0] == ("load", 0)  # released above, so loaded again
    streamer.log = []
    with torch.no_grad():
        model(x, t, y, mask)
    assert streamer.log[0] == ("attach", 0)


def test_streamer_exception_in_a_block_leaves_blocks_at_home():
    cfg, ref, model = _models()
    streamer = BlockStreamer(model, "cpu").attach()
    homes = [{n: p.data_ptr() for n, p in blk.named_parameters()} for blk in model.blocks]
    x, t, y, mask = make_inputs(cfg, B=2, T=3)

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    model.blocks[1].ffn.forward = boom
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated"):
        model(x, t, y, mask)
    del model.blocks[1].ffn.forward
    assert not streamer._active
    for blk, home in zip(model.blocks, homes):
        assert {n: p.data_ptr() for n, p in blk.named_parameters()} == home
    with torch.no_grad():
        _nan_free_equal(ref(x, t, y, mask), model(x, t, y, mask))


@pytest.mark.parametrize("where", ["forward", "forward_kv_only"])
def test_streamer_exception_in_a_block_drops_the_prefetched_copies(where):
    # an OOM in block 1 (or in the cache build's last block) left block 2 (block 0) prefetched on the
    # device until the next call: the memory the caller needs to recover was still held
    cfg, _, model = _models()
    streamer = BlockStreamer(model, "cpu").attach()
    x, t, y, mask = make_inputs(cfg, B=2, T=3)

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    broken = 1 if where == "forward" else 2
    target = model.blocks[1].ffn if where == "forward" else model.blocks[2].adaLN_modulation
    target.forward = boom
    streamer.log = []
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated"):
        if where == "forward":
            model(x, t, y, mask)
        else:
            model.build_kv_cache(x[:1, :, :1])
    del target.forward
    prefetched = (broken + 1) % 3
    assert ("load", prefetched) in streamer.log and streamer.log[-1] == ("free", broken)
    assert not streamer._loaded and not streamer._active
    streamer.log = []
    with torch.no_grad():
        model(x, t, y, mask)
    assert streamer.log[0] == ("load", 0)


def test_streamer_detach_restores_module():
    cfg, ref, model = _models()
    streamer = BlockStreamer(model, "cpu").attach()
    with pytest.raises(ValueError, match="already has a block streamer"):
        BlockStreamer(model, "cpu").attach()
    streamer.detach()
    assert model._block_streamer is None and "forward_kv_only" not in model.blocks[-1].__dict__
    x, t, y, mask = make_inputs(cfg, B=2, T=3)
    with torch.no_grad():
        _nan_free_equal(ref(x, t, y, mask), model(x, t, y, mask))
    assert not model.blocks[0]._forward_pre_hooks


def test_streamer_keeps_and_restores_activation_checkpointing():
    # checkpointing put its forward on the instance before attach(): the streamer wrapped the class's forward
    # (checkpointing silently off while attached) and detach() deleted it (off for good)
    from longcat_vc.training import enable_activation_checkpointing

    cfg, ref, model = _models()
    enable_activation_checkpointing(model)
    own = [blk.__dict__["forward"] for blk in model.blocks]
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    streamer = BlockStreamer(model, "cpu").attach()
    x, t, y, mask = make_inputs(cfg, B=1, T=3)
    streamer.log = []
    orig, torch.utils.checkpoint.checkpoint = torch.utils.checkpoint.checkpoint, counting
    try:
        out = model(x, t, y, mask)  # grad on: checkpointed blocks, streamed
    finally:
        torch.utils.checkpoint.checkpoint = orig
    assert len(calls) == len(model.blocks)
    assert [e for e in streamer.log if e[0] == "attach"] == [("attach", i) for i in range(len(model.blocks))]
    with torch.no_grad():
        _nan_free_equal(ref(x, t, y, mask), out.detach())
    streamer.detach()
    assert [blk.__dict__.get("forward") for blk in model.blocks] == own


def test_streamer_bad_args():
    cfg, _, model = _models()
    with pytest.raises(ValueError, match="prefetch"):
        BlockStreamer(model, "cpu", prefetch=-1)
    with pytest.raises(TypeError, match="blocks"):
        BlockStreamer(torch.nn.Linear(2, 2), "cpu")


@pytest.mark.parametrize("fuse", [False, True])
def test_streamer_lora_fused_and_unfused(tmp_path, fuse):
    cfg, ref, model = _models()
    path = str(tmp_path / "lora.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=int(torch.randint(0, 999, ()).item()))
    streamer = BlockStreamer(model, "cpu").attach()
    x, t, y, mask = make_inputs(cfg, B=2, T=4, shared_cond=1)
    with torch.no_grad():
        base = model(x, t, y, mask)  # leaves block 0 prefetched without LoRA
    for m in (ref, model):
        m.load_lora(path, "r")
        m.enable_loras(["r"])
        if fuse:
            m.fuse_lora()
    streamer.log = []
    _, on_r, off_r = _step(ref, cfg, x, t, y, mask, 1)
    _, on_s, off_s = _step(model, cfg, x, t, y, mask, 1)
    _nan_free_equal(on_r, on_s)
    _nan_free_equal(off_r, off_s)
    assert not torch.allclose(off_s, base, atol=1e-4)  # the LoRA took effect through the stream
    # the stale prefetched block 0 (old weights / no adapters) was copied again before its use
    assert streamer.log[:2] == [("load", 0), ("attach", 0)]
    if not fuse:
        # adapter tensors streamed with the block and back at their CPU copies afterwards
        a = model.blocks[0].attn.qkv.lora_active[0]
        assert a.down.device.type == "cpu"
        seen = []
        h = model.blocks[1].register_forward_pre_hook(
            lambda mod, args: seen.append(mod.attn.qkv.lora_active[0].down))
        with torch.no_grad():
            model(x, t, y, mask)
        h.remove()
        assert seen and seen[0].data_ptr() != model.blocks[1].attn.qkv.lora_active[0].down.data_ptr()
    for m in (ref, model):
        m.disable_loras()
    with torch.no_grad():
        _nan_free_equal(ref(x, t, y, mask), model(x, t, y, mask))


# ====================================================================== estimate and fit check
def test_modes_and_plan_names():
    assert MEMORY_MODES == ("resident", "balanced", "low")
    assert memory_plan("low").offload_kv_cache and not memory_plan("balanced").offload_kv_cache
    with pytest.raises(ValueError, match="resident"):
        memory_plan("tiny")


def test_estimate_orders_modes_and_matches_h200_measurement():
    cfg = DiTConfig.longcat_video()
    est = {m: estimate_peak_bytes(cfg, m) for m in MEMORY_MODES}
    assert est["resident"]["peak"] > est["balanced"]["peak"] > est["low"]["peak"]
    # the H200 measurement: one 480p step, weights 25.3 + cache 4.6 -> 35.7 GiB (DiT only)
    r = est["resident"]
    te_vae = r["text"] - 25.3 * GiB  # the text stage holds the DiT weights + text encoder + VAE
    assert 34.5 * GiB < r["denoise"] - te_vae < 37.5 * GiB, (r["denoise"] - te_vae) / GiB
    assert est["balanced"]["peak"] < 16 * GiB and est["low"]["peak"] < est["balanced"]["peak"]
    # fp8 weights: ~half the resident DiT bytes
    fp8 = estimate_peak_bytes(cfg, "resident", fp8=True)
    saved = (est["resident"]["peak"] - fp8["peak"]) / GiB
    assert 11 < saved < 13.5, saved
    # 720p refinement (704x1280, 2x frames, 26 cond, no CFG) stays under 48 GiB in low mode
    ref720 = estimate_peak_bytes(cfg, "low", height=704, width=1280, num_frames=185, num_cond_frames=25, batch=1)
    assert ref720["peak"] < 48 * GiB


def test_fit_check_names_need_and_fitting_mode():
    cfg = DiTConfig.longcat_video()
    with pytest.raises(MemoryModeError) as ei:
        check_memory_fits(cfg, "resident", "cuda:0", budget_bytes=24 * GiB)
    msg = str(ei.value)
    assert "memory='resident' needs about" in msg and "GiB" in msg and "--memory balanced" in msg
    need = float(msg.split("needs about ")[1].split(" GiB")[0])
    assert need > 40
    with pytest.raises(MemoryModeError, match="no mode fits"):
        check_memory_fits(cfg, "balanced", "cuda:0", budget_bytes=2 * GiB)
    est = check_memory_fits(cfg, "low", "cuda:0", budget_bytes=24 * GiB)
    assert est["peak"] < 24 * GiB
    with pytest.raises(ValueError, match="memory"):
        check_memory_fits(cfg, "huge", "cuda:0", budget_bytes=24 * GiB)


# ====================================================================== pipeline modes
SIZE = (32, 48)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vc_components import write_full_checkpoint

    pytest.importorskip("diffusers")  # the checkpoint's VAE: CI installs the vc extra, the GPU machine has none
    root = str(tmp_path_factory.mktemp("ckpt"))
    write_full_checkpoint(root, seed=int(torch.randint(0, 999, ()).item()))
    return root


def _video():
    rng = np.random.default_rng()
    return rng.integers(0, 256, (9, 40, 56, 3), dtype=np.uint8)


@pytest.mark.parametrize("fuse, guidance", [(False, 1.0), (True, 2.0)])
def test_every_mode_gives_the_resident_result(ckpt, fuse, guidance):
    """Distill mode (cfg-step LoRA unfused, no CFG; fused with a CFG batch of 2): latents and frames
    of every memory mode equal the resident ones exactly."""
    from longcat_vc.pipeline import VideoContinuationPipeline

    video = _video()
    outs = {}
    for memory in MEMORY_MODES:
        pipe = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="distill",
                                                         memory=memory, fuse_lora=fuse)
        assert pipe.memory == memory
        assert (getattr(pipe.dit, "_block_streamer", None) is not None) == (memory != "resident")
        calls, build = [], pipe.dit.build_kv_cache
        pipe.dit.build_kv_cache = lambda cond, offload=False: (calls.append(offload), build(cond, offload=offload))[1]
        outs[memory] = pipe(video, "a person rides a motorcycle on the road", resolution=SIZE, num_frames=9,
                            num_cond_frames=5, num_inference_steps=2, guidance_scale=guidance, generator=7,
                            progress=False, output_type="latent" if fuse else "np")
        assert outs[memory].timings["kv_cache_bytes"] > 0
        assert calls == [memory == "low"]  # the low mode offloads the KV cache
    for memory in ("balanced", "low"):
        _nan_free_equal(outs["resident"].latents, outs[memory].latents)
        if not fuse:
            np.testing.assert_array_equal(outs["resident"].frames, outs[memory].frames)


def test_pipeline_rejects_bad_memory_and_fp8_on_cpu(ckpt):
    from longcat_vc.pipeline import VideoContinuationPipeline

    with pytest.raises(ValueError, match="memory: expected one of"):
        VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", memory="tiny")
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", fp8=True)
    with pytest.raises(ValueError, match="not supported with a process_group"):
        VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", memory="low",
                                                  process_group=object())


# ====================================================================== CLI
def test_cli_memory_and_fp8_flags(ckpt, tmp_path, capsys, monkeypatch):
    pytest.importorskip("imageio_ffmpeg", reason="writes an mp4 (the vc extra installs imageio-ffmpeg)")
    from longcat_vc import cli
    from longcat_vc.pipeline import VideoContinuationPipeline
    from longcat_vc.video_io import write_video

    video = str(tmp_path / "in.mp4")
    write_video(video, _video()[:7], fps=15)
    fast = ["--mode", "distill", "--steps", "1", "--frames", "9", "--cond-frames", "5", "--resolution", "32x48",
            "--dtype", "fp32", "--device", "cpu", "--no-progress", "--seed", "3"]
    base = ["continue", video, "--prompt", "a red car", "--checkpoint", ckpt]
    seen = {}
    real = VideoContinuationPipeline.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.update(kw)
        return real(cls, *a, **kw)

    monkeypatch.setattr(VideoContinuationPipeline, "from_pretrained", classmethod(spy))
    out = str(tmp_path / "low.mp4")
    rc = cli.main(base + ["--out", out, "--memory", "low"] + fast)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert seen["memory"] == "low" and seen["fp8"] is False and "memory low" in err
    rc = cli.main(base + ["--out", str(tmp_path / "f.mp4"), "--fp8"] + fast)
    err = capsys.readouterr().err
    # found before the model load (cli._check_args_before_load): a usage error, exit 2
    assert rc == 2 and "compute capability >= 8.9" in err and "Traceback" not in err
    assert "--fp8" in err and not os.path.exists(str(tmp_path / "f.mp4"))
    rc = cli.main(base + ["--out", str(tmp_path / "c.mp4"), "--memory", "balanced", "--context-parallel", "2"] + fast)
    assert rc == 2 and "--memory balanced is not supported with --context-parallel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli.main(base + ["--out", str(tmp_path / "x.mp4"), "--memory", "tiny"] + fast)
    assert ei.value.code == 2


# ====================================================================== memory_report
def test_memory_report_estimate_and_measured(tmp_path, capsys):
    import json

    from longcat_vc import memory_report

    assert memory_report.main(["--depth", "48"]) == 0
    out = capsys.readouterr().out
    lines = {l.split()[0]: l.split()[1:] for l in out.splitlines() if l.split() and l.split()[0] in MEMORY_MODES}
    assert set(lines) == set(MEMORY_MODES) and all(len(v) == 6 for v in lines.values())
    est = estimate_peak_bytes(DiTConfig.longcat_video(), "low")
    assert float(lines["low"][-1]) == pytest.approx(est["peak"] / GiB, abs=0.01)
    path = tmp_path / "m.json"
    row = {"text": 3.5, "vae_encode": 4.0, "cache_build": 5.0, "denoise": 9.25, "decode": 6.0, "peak": 9.25,
           "s_per_step": 5.5}
    path.write_text(json.dumps({"stage_table_gib": {"basic/low": row}}))
    assert memory_report.main(["--measured", str(path)]) == 0
    assert "basic/low" in capsys.readouterr().out
    path.write_text("{}")
    # bad files and values: one line on stderr, exit 2 (argparse's error)
    for argv, match in ((["--measured", str(path)], "stage_table_gib"), (["--resolution", "30x48"], "--resolution")):
        with pytest.raises(SystemExit) as e:
            memory_report.main(argv)
        assert e.value.code == 2 and match in capsys.readouterr().err


def test_memory_report_refine(capsys):
    """``--refine``: the 720p refinement of the 480p clip (bucket 704x1280, 2 x 93 frames = 48 latents of
    which 8 cond, batch 1, rank-128 LoRA), the same numbers the refine fit check uses."""
    from longcat_vc import memory_report
    from longcat_vc.refine import refine_estimate_shape

    assert memory_report.main(["--refine"]) == 0
    out = capsys.readouterr().out
    assert "704x1280, 186 frames (48 latents, 8 cond), batch 1, LoRA rank ~128" in out
    lines = {l.split()[0]: l.split()[1:] for l in out.splitlines() if l.split() and l.split()[0] in MEMORY_MODES}
    shape, t_lat, c = refine_estimate_shape((704, 1280), 186, 26, lora_rank=128)
    assert (t_lat, c) == (48, 8)
    for m in MEMORY_MODES:
        est = estimate_peak_bytes(DiTConfig.longcat_video(), m, **shape)
        assert float(lines[m][-1]) == pytest.approx(est["peak"] / GiB, abs=0.01)
    # measured on the H200 at depth 48 (refine-stage_20261204_*): balanced 35.2 GiB, low 15.4: the
    # estimate stays within 10% above
    assert 35.2 <= float(lines["balanced"][-1]) <= 35.2 * 1.1
    assert 15.4 <= float(lines["low"][-1]) <= 15.4 * 1.1


# ====================================================================== GPU (skipped on CPU)
@pytest.mark.cuda
def test_streamer_cuda_streams_exact_and_two_blocks_on_device(tmp_path):
    """Real side-stream copies: same result as resident bit for bit (KV cache resident and
    offloaded, unfused LoRA), at most the attached block plus one prefetched block on the device,
    device memory of the blocks returned after attach."""
    cfg = tiny_config(depth=6, hidden_size=256, num_heads=2, attn_backend="torch")
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()))
    ref = model_from_state_dict(cfg, sd).cuda()
    model = model_from_state_dict(cfg, sd).cuda()
    path = str(tmp_path / "l.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=2)
    for m in (ref, model):
        m.load_lora(path, "r")
        m.enable_loras(["r"])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    streamer = BlockStreamer(model, "cuda").attach()
    block_bytes = streamer.block_bytes()
    assert torch.cuda.memory_allocated() < before - 4 * block_bytes
    assert all(p.is_pinned() for p in model.blocks[0].parameters())
    assert model.blocks[0].attn.qkv.lora_adapters["r"].down.is_pinned()
    on_device = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, a: on_device.append(len(streamer._loaded) + len(streamer._active)))
    x, t, y, mask = (v.cuda() for v in make_inputs(cfg, B=2, T=4, shared_cond=2))
    for offload in (False, True):
        _, on_r, off_r = _step(ref, cfg, x, t, y, mask, 2, offload=offload)
        _, on_s, off_s = _step(model, cfg, x, t, y, mask, 2, offload=offload)
        _nan_free_equal(on_r, on_s)
        _nan_free_equal(off_r, off_s)
    assert on_device and max(on_device) <= 2
    streamer.detach()
    assert model.blocks[0].attn.qkv.weight.is_cuda


def test_memory_report_fp8_flag_and_no_one_byte_model(monkeypatch, capsys):
    # --dtype-bytes 1 halved every component's estimate (no model dtype is 1 byte: fp8 quantises only
    # the blocks' large linears), and fp8 could not be asked for at all
    from longcat_vc import memory_report

    with pytest.raises(SystemExit) as e:
        memory_report.main(["--dtype-bytes", "1"])
    assert e.value.code == 2 and "--dtype-bytes" in capsys.readouterr().err
    seen = []
    real = memory_report.estimate_table
    monkeypatch.setattr(memory_report, "estimate_table", lambda cfg, **shape: (seen.append(shape), real(cfg, **shape))[1])
    assert memory_report.main(["--depth", "48", "--fp8"]) == 0
    assert memory_report.main(["--depth", "48"]) == 0
    assert [s["fp8"] for s in seen] == [True, False]
    from longcat_vc import DiTConfig

    cfg = DiTConfig.longcat_video(depth=48)
    # the 48 blocks' large linears at 1 byte instead of 2: about 12 GiB less DiT weight
    assert real(cfg, **seen[0])["resident"]["denoise"] < real(cfg, **seen[1])["resident"]["denoise"] - 10


def test_activation_checkpointing_switch_refused_while_streamed():
    # the streamer wraps each block's forward and puts back, at detach(), the one it found: a switch while
    # attached was undone by detach() without a word (enable: off again; disable: back on)
    from longcat_vc.training import disable_activation_checkpointing, enable_activation_checkpointing

    cfg, _, model = _models()
    streamer = BlockStreamer(model, "cpu").attach()
    for fn in (enable_activation_checkpointing, disable_activation_checkpointing):
        with pytest.raises(ValueError, match="block streamer attached"):
            fn(model)
    streamer.detach()
    assert enable_activation_checkpointing(model) == cfg.depth  # fine once detached
    disable_activation_checkpointing(model)
    assert all("forward" not in blk.__dict__ for blk in model.blocks)
