"""Hostile round 40 (memory and precision modes): fit checks, OOM hints and rank_state under context parallelism."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from longcat_vc import memory as mem
from longcat_vc import refine as rf
from longcat_vc.config import DiTConfig
from longcat_vc.memory import GiB, MemoryModeError, check_memory_fits, estimate_peak_bytes
from vc_components import released_pipeline_stand_in

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# 720p (the pipeline's 16:9 bucket) 185 frames, 25 cond frames, CFG batch 2: ~83 GiB in 'resident' on one GPU
LONG_720P = dict(height=704, width=1312, num_frames=185, num_cond_frames=25)


def test_fit_check_under_context_parallel_counts_each_ranks_share_and_names_no_streaming_mode():
    """The fit check of from_pretrained(process_group=...) estimated the single-GPU peak (the whole KV cache
    and every token's activations on each rank): 720p 185 frames on 8 ranks was refused at 83.2 GiB on an
    80 GiB GPU (each rank needs ~39 GiB), and the hint named memory='balanced', which context parallel refuses."""
    cfg = DiTConfig.longcat_video()
    single = estimate_peak_bytes(cfg, "resident", **LONG_720P)
    per_rank = estimate_peak_bytes(cfg, "resident", sp_size=8, **LONG_720P)
    assert single["peak"] / GiB > 80 > per_rank["peak"] / GiB
    # what stays whole on every rank: weights, text encoder, VAE
    assert per_rank["text"] == single["text"] and per_rank["decode"] == single["decode"]
    # the cache is split by heads: exactly 1/8 of it per rank
    cache = single["cache_build"] - estimate_peak_bytes(cfg, "resident", kv_cache=False, **LONG_720P)["cache_build"]
    no_cache = estimate_peak_bytes(cfg, "resident", sp_size=8, kv_cache=False, **LONG_720P)
    assert per_rank["cache_build"] - no_cache["cache_build"] == cache // 8
    # cfg_parallel halves the CFG batch of a rank's denoising step
    cfgp = estimate_peak_bytes(cfg, "resident", sp_size=4, cfg_parallel=True, **LONG_720P)
    sp4 = estimate_peak_bytes(cfg, "resident", sp_size=4, **LONG_720P)
    assert cfgp["denoise"] < sp4["denoise"] and cfgp["cache_build"] == sp4["cache_build"]
    assert check_memory_fits(cfg, "resident", "cpu", budget_bytes=80 * GiB, context_parallel=True,
                             sp_size=8, **LONG_720P) == per_rank
    with pytest.raises(MemoryModeError) as e:
        check_memory_fits(cfg, "resident", "cpu", budget_bytes=40 * GiB, context_parallel=True, sp_size=8, **LONG_720P)
    assert "balanced" not in str(e.value) and "context parallel runs memory='resident' only" in str(e.value)
    # without context parallel the hint still names the streaming mode that fits
    with pytest.raises(MemoryModeError, match="memory='balanced'"):
        check_memory_fits(cfg, "resident", "cpu", budget_bytes=60 * GiB, **LONG_720P)
    for kw, err in ((dict(sp_size=0), ValueError), (dict(sp_size=2.0), TypeError), (dict(cfg_parallel="no"), TypeError)):
        with pytest.raises(err, match=next(iter(kw))):
            estimate_peak_bytes(cfg, "resident", **kw)


def test_from_pretrained_fit_check_gets_the_context_parallel_layout(tmp_path, monkeypatch):
    """from_pretrained passed no layout to the fit check (single-GPU estimate for each rank, see above)."""
    from longcat_vc import loading, parallel
    from longcat_vc.pipeline import VideoContinuationPipeline
    from vc_components import write_full_checkpoint

    ckpt = str(tmp_path / "ckpt")
    write_full_checkpoint(ckpt)
    monkeypatch.setattr(loading, "check_device", lambda d, name="device": torch.device("cuda", 0))
    layout = types.SimpleNamespace(sp_size=4, cfg_size=2)
    monkeypatch.setattr(parallel, "check_context_parallel", lambda *a, **k: layout)
    seen = {}

    class Stop(Exception):
        pass

    def fits(cfg, mode, device, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(mem, "check_memory_fits", fits)
    with pytest.raises(Stop):
        VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, process_group=object(),
                                                  cfg_parallel=True, progress=False)
    assert seen["sp_size"] == 4 and seen["cfg_parallel"] is True and seen["context_parallel"] is True


def test_refine_fit_check_under_context_parallel_is_per_rank_and_names_no_streaming_mode():
    """check_refine_fits under context parallel estimated the whole refinement on each rank and, when that did
    not fit, told the user to load the pipeline with memory='balanced' / 'low' (refused with a process_group)."""
    size, n, nc = (704, 1280), 186, 26
    pipe = released_pipeline_stand_in("resident")
    single = rf.check_refine_fits(pipe, size, n, nc, offload_kv_cache=True, budget_bytes=10**15)
    pipe.dit.context_parallel = types.SimpleNamespace(sp_size=8, cfg_size=1)
    per_rank = rf.check_refine_fits(pipe, size, n, nc, offload_kv_cache=True, budget_bytes=10**15)
    assert per_rank["denoise"] < single["denoise"]
    with pytest.raises(MemoryModeError) as e:
        rf.check_refine_fits(pipe, size, n, nc, offload_kv_cache=True, budget_bytes=int(per_rank["peak"] * 0.9))
    assert "memory='balanced'" not in str(e.value) and "memory='low'" not in str(e.value)
    assert "context parallel runs memory='resident' only" in str(e.value)


def _fp8_worker(rank: int, world: int, init: str, out: str) -> None:
    """Rank 0 quantises its DiT to fp8 (emulated), rank 1 does not; both run it context parallel."""
    from longcat_vc.fp8 import quantize_dit_fp8
    from test_dit import make_inputs
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config
    from vc_components import error_text, finish_rank, init_gloo_rank

    init_gloo_rank(rank, world, init, 20)
    cfg = tiny_config(hidden_size=128, num_heads=4)
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=5))
    if rank == 0:
        quantize_dit_fp8(m, emulate=True)
    m.enable_context_parallel()
    x, t, y, mask = make_inputs(cfg, B=2, T=3, H=6, W=6, seed=1, shared_cond=1)
    res = {}
    with torch.no_grad():
        res["forward"] = error_text(lambda: m(x, t, y, mask))
        res["build_kv_cache"] = error_text(lambda: m.build_kv_cache(x[:1, :, :1]))
    finish_rank(res, out, rank)


def test_fp8_on_one_rank_only_is_refused_not_mixed(tmp_path):
    """rank_state (what the context-parallel ranks compare besides their inputs) did not cover fp8: a DiT
    quantised on one rank only ran, each rank's tokens through its own weights, and every rank got one
    output mixing the two models (rel. L2 0.028 from the unquantised model, 0.029 from the fp8 one)
    without a word; now every rank raises naming the model state."""
    from longcat_vc.fp8 import quantize_dit_fp8
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config
    from vc_components import two_rank_results

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=1)
    a, b, q = (model_from_state_dict(cfg, sd) for _ in range(3))
    quantize_dit_fp8(q, emulate=True)
    assert a.rank_state() == b.rank_state() != q.rank_state()
    quantize_dit_fp8(b, emulate=True)
    assert b.rank_state() == q.rank_state()
    for r in two_rank_results(os.path.abspath(__file__), tmp_path, ["fp8"], ROOT, HERE, timeout=180):
        for call in ("forward", "build_kv_cache"):
            assert r[call].startswith("ValueError: context parallel: the ranks called") and "fp8 linears" in r[call], r


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _fp8_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])


@pytest.mark.parametrize("where", ["build_kv_cache", "forward"])
def test_out_of_memory_under_context_parallel_names_no_streaming_mode(tmp_path, monkeypatch, where):
    """An out-of-memory error in a context-parallel pipeline's cache build or denoising said "load with
    memory='low' (--memory low)", which from_pretrained refuses with a process_group; now it says to use more
    ranks."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import torch.distributed as dist

    from longcat_vc.pipeline import VCOutOfMemoryError, VideoContinuationPipeline
    from vc_components import random_frames, write_full_checkpoint

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    ckpt = str(tmp_path / "ckpt")
    write_full_checkpoint(ckpt)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        pipe = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu",
                                                         process_group=dist.group.WORLD, progress=False)
        assert pipe.dit.context_parallel is not None

        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

        if where == "forward":
            monkeypatch.setattr(pipe.dit, "forward", oom)
        else:
            monkeypatch.setattr(pipe.dit, "build_kv_cache", oom)
        with pytest.raises(VCOutOfMemoryError) as e:
            pipe(random_frames(9, 32, 48), "a", resolution=(32, 48), num_frames=13, num_cond_frames=5,
                 num_inference_steps=1, guidance_scale=1.0, progress=False)
        assert "memory='low'" not in str(e.value) and "more ranks" in str(e.value), str(e.value)
    finally:
        dist.destroy_process_group()
