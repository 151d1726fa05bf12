"""Memory modes, seventh audit (2026-12-07); each test fails on the code before its fix.

A. A KeyboardInterrupt (Ctrl-C in a notebook) inside a streamed DiT block skipped the block
   streamer's post-hook (torch runs ``always_call`` forward hooks on ``Exception`` only), so the
   block's parameters stayed pointed at their transient device copies. A ``fuse_lora`` after it (or
   the LoRA restore at the end of an interrupted ``refine`` of a fused distill pipeline) wrote the
   fused weights into those copies; the next forward put the block back on its CPU home without
   the LoRA, still counted as fused, and ``unfuse_lora`` then subtracted it from the home: one
   block silently without its LoRA, then with ``W - delta`` for good.
B. ``build_kv_cache(offload="no")`` offloaded the cache (a truthy string) and recorded
   ``offloaded="no"``; ``offload=None`` recorded ``offloaded=None``.
C. ``refine`` resolved ``offload_kv_cache=None`` to its mode's value before the fit check, so a
   resident pipeline that cannot hold the 720p refinement had ``memory='low'`` checked with its KV
   cache on the device and was told "even memory='low' needs about 17.0 GiB: refine at a lower
   resolution" on a 24 GiB device, where ``low`` fits.
D. ``from_pretrained`` refused a streaming memory mode with a process_group, but a hand-built pipeline
   took ``apply_memory_mode("balanced")`` on a context-parallel DiT (and ``enable_context_parallel``
   on a streamed one) without a word: the untested combination the refusal exists for.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from longcat_vc import refine as rf
from longcat_vc.memory import BlockStreamer, GiB, MemoryModeError
from vc_components import fused_and_unfused_equal, released_pipeline_stand_in
from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora


def _pair(tmp_path, depth=3):
    cfg = tiny_config(depth=depth)
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()))
    lora = str(tmp_path / "l.safetensors")
    write_longcat_lora(lora, cfg, targets=LORA_TARGETS_REFINEMENT, seed=int(torch.randint(0, 999, ()).item()))
    return cfg, model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd), lora


def _interrupt(monkeypatch, streamer, model, where):
    """Makes the next forward raise KeyboardInterrupt inside block 1 (its compute, or the prefetch of
    block 2 that its pre-hook issues after attaching block 1)."""
    if where == "forward":
        def boom(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(model.blocks[1].ffn, "forward", boom)
    else:
        issue = streamer._issue

        def issue_or_boom(i):
            if i == 2:
                raise KeyboardInterrupt
            return issue(i)

        monkeypatch.setattr(streamer, "_issue", issue_or_boom)


# ----------------------------------------------------------------------------- A: KeyboardInterrupt
@pytest.mark.parametrize("where", ["forward", "prefetch"])
def test_keyboard_interrupt_in_a_streamed_block_leaves_it_at_home(tmp_path, monkeypatch, where):
    cfg, ref, model, lora = _pair(tmp_path)
    streamer = BlockStreamer(model, "cpu").attach()
    homes = [{n: p.data_ptr() for n, p in blk.named_parameters()} for blk in model.blocks]
    x, t, y, mask = make_inputs(cfg, B=2, T=3, shared_cond=1)
    with monkeypatch.context() as mp:
        _interrupt(mp, streamer, model, where)
        with torch.no_grad(), pytest.raises(KeyboardInterrupt):
            model(x, t, y, mask)
    assert not streamer._active
    assert [{n: p.data_ptr() for n, p in blk.named_parameters()} for blk in model.blocks] == homes
    fused_and_unfused_equal(ref, model, lora, x, t, y, mask)  # what the interrupted user does next


def test_keyboard_interrupt_during_refine_of_a_fused_streamed_dit(tmp_path, monkeypatch):
    """``refine_state`` (the refinement's LoRA/BSA swap) on a distill pipeline with its LoRA fused,
    interrupted inside a block: the restore re-fuses the previous LoRA, into the block's home."""
    cfg, ref, model, lora = _pair(tmp_path)
    other = str(tmp_path / "cfg.safetensors")
    write_longcat_lora(other, cfg, targets=LORA_TARGETS_REFINEMENT, seed=int(torch.randint(1000, 1999, ()).item()))
    for m in (ref, model):
        m.load_lora(other, "cfg_step_lora")
        m.enable_loras(["cfg_step_lora"])
        m.fuse_lora()
    streamer = BlockStreamer(model, "cpu").attach()
    pipe = types.SimpleNamespace(dit=model)
    x, t, y, mask = make_inputs(cfg, B=2, T=3, shared_cond=1)
    with monkeypatch.context() as mp:
        _interrupt(mp, streamer, model, "forward")
        with torch.no_grad(), pytest.raises(KeyboardInterrupt), rf.refine_state(pipe, lora):
            model(x, t, y, mask)
    assert model.active_loras == ["cfg_step_lora"] and rf.fused_loras(model) == ["cfg_step_lora"]
    with torch.no_grad():
        a, b = ref(x, t, y, mask), model(x, t, y, mask)
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item()}"
    for m in (ref, model):
        m.disable_loras()
    with torch.no_grad():
        a, b = ref(x, t, y, mask), model(x, t, y, mask)
    assert torch.equal(a, b), f"after unfuse: max |diff| {(a - b).abs().max().item()}"


# ----------------------------------------------------------------------------- B: build_kv_cache(offload=)
@pytest.mark.parametrize("offload", ["no", None, 1, 0])
def test_build_kv_cache_offload_takes_a_bool(offload):
    cfg = tiny_config()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    x = make_inputs(cfg, B=1, T=2)[0]
    with pytest.raises(TypeError, match=rf"offload: expected a bool \(True or False\), got {type(offload).__name__}"):
        m.build_kv_cache(x[:, :, :1], offload=offload)
    assert m.build_kv_cache(x[:, :, :1], offload=True).offloaded is True


# ----------------------------------------------------------------------------- C: the refinement's fit hint
SIZE, N_REFINE, NC = (704, 1280), 186, 26  # the 720p refinement of 93 stage-1 frames, 2 x 13 cond frames


def _released(mode):
    return released_pipeline_stand_in(mode)


@pytest.fixture(scope="module")
def refine_pipe(tmp_path_factory):
    from longcat_vc.pipeline import VideoContinuationPipeline
    from vc_components import refine_checkpoint_in

    root = refine_checkpoint_in(tmp_path_factory, "ckpt_round7_memory")
    return VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                     progress=False)


def test_refine_fit_hint_names_low_when_low_fits(refine_pipe, monkeypatch):
    # refine's own arguments reach the check; the estimate is the released model's 720p one on 24 GiB
    check = rf.check_refine_fits

    def released_on_24_gib(pipe, size, n_refine, nc, **kw):
        return check(_released(pipe._memory.name), SIZE, N_REFINE, NC, budget_bytes=24 * GiB, **kw)

    monkeypatch.setattr(rf, "check_refine_fits", released_on_24_gib)
    monkeypatch.setattr(refine_pipe, "encode_text", lambda *a, **k: pytest.fail("work before the fit check"))
    def frames(n, seed):
        return np.random.default_rng(seed).integers(0, 256, (n, 32, 64, 3), dtype=np.uint8)

    with pytest.raises(MemoryModeError) as e:
        refine_pipe.refine(frames(6, 1), "a cat", video=frames(12, 2), num_cond_frames=5, resolution=(64, 128),
                           num_inference_steps=4, generator=3, output_type="latent", progress=False)
    assert "memory='resident'" in str(e.value) and "memory='low' fits" in str(e.value), str(e.value)
    assert "even memory='low'" not in str(e.value)


def test_refine_fit_hint_with_the_cache_kept_on_the_device_says_what_fits():
    # offload_kv_cache=False given: 'low' fits only with its cache offloaded; "even low needs 17 GiB" on 24 did not say so
    with pytest.raises(MemoryModeError) as e:
        rf.check_refine_fits(_released("resident"), SIZE, N_REFINE, NC, offload_kv_cache=False, budget_bytes=24 * GiB)
    msg = str(e.value)
    assert "even memory='low'" not in msg and "memory='low' with its KV cache offloaded fits" in msg, msg
    with pytest.raises(MemoryModeError, match=r"even memory='low' needs about"):
        rf.check_refine_fits(_released("resident"), SIZE, N_REFINE, NC, offload_kv_cache=False, budget_bytes=8 * GiB)


# ----------------------------------------------------------------------------- D: streaming x context parallel
@pytest.mark.parametrize("mode", ["balanced", "low"])
def test_streaming_mode_and_context_parallel_refused_in_either_order(tiny_base, mode):
    from longcat_vc.memory import apply_memory_mode

    cfg, sd = tiny_base
    dit = model_from_state_dict(cfg, sd)
    dit._context_parallel = object()  # (what enable_context_parallel sets; no process group needed here)
    pipe = types.SimpleNamespace(dit=dit)
    with pytest.raises(ValueError, match=f"memory='{mode}' is not supported with a DiT that runs context parallel"):
        apply_memory_mode(pipe, mode, "cpu")
    assert not hasattr(pipe, "_memory")
    dit._context_parallel = None
    dit._block_streamer = object()  # (what a streaming mode attaches)
    with pytest.raises(ValueError, match="enable_context_parallel: the DiT streams its blocks"):
        dit.enable_context_parallel(None)
    assert dit.context_parallel is None
