"""Round 28 (memory modes): a block streamer whose ``attach()`` fails midway undoes what it did; the fit
check's default budget counts the caching allocator's free blocks (as the refine's does); the fit check
and the estimate refuse budgets, margins and shapes that made them answer nonsense."""

from __future__ import annotations


import pytest
import torch

import longcat_vc.memory as mem
from longcat_vc.memory import BlockStreamer
from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora

GiB = 2**30


def _models(depth=3):
    cfg = tiny_config(depth=depth)
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()))
    return cfg, model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)


def _hooks(model):
    return [(len(b._forward_pre_hooks), len(b._forward_hooks), "forward" in b.__dict__,
             "forward_kv_only" in b.__dict__) for b in model.blocks]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_attach_that_fails_midway_leaves_the_model_as_it_was(tmp_path, exc):
    """An attach() that raised at block 2 (pinning tens of GiB ran out of host memory, or a Ctrl-C) left
    blocks 0 and 1 hooked and wrapped with no streamer recorded: a retry stacked a second set of hooks
    (its post-hook put block 0 back onto the first streamer's copy), and its detach() left the first set,
    which kept copying the blocks on every call. Now the hooks, wrappers, tensors and LoRA tensors are
    put back and a retry gives exactly the plain model's result."""
    cfg, ref, model = _models()
    path = str(tmp_path / "lora.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=int(torch.randint(0, 999, ()).item()))
    for m in (ref, model):
        m.load_lora(path, "r")
        m.enable_loras(["r"])
    before_hooks = _hooks(model)
    ptrs = [{n: t.data_ptr() for n, t in BlockStreamer._block_tensors(b).items()} for b in model.blocks]
    lora = [[id(t) for _, _, t in mem._lora_tensors(b, loaded=True)] for b in model.blocks]
    streamer = BlockStreamer(model, "cpu", pin=False)
    # _home's calls per block: its parameters and buffers, then its loaded LoRA tensors
    per_block = len(BlockStreamer._block_tensors(model.blocks[0])) + len(lora[0])
    assert lora[0], "the LoRA must reach block 0"
    calls = [0]
    home = streamer._home

    def failing_home(t):
        calls[0] += 1
        if calls[0] > 2 * per_block + 1:  # within block 2, after blocks 0 and 1 were hooked
            raise exc("simulated: cudaHostAlloc failed")
        return home(t)

    streamer._home = failing_home
    with pytest.raises(exc, match="simulated"):
        streamer.attach()
    assert _hooks(model) == before_hooks
    assert getattr(model, "_block_streamer", None) is None and not streamer._attached
    assert [{n: t.data_ptr() for n, t in BlockStreamer._block_tensors(b).items()} for b in model.blocks] == ptrs
    assert [[id(t) for _, _, t in mem._lora_tensors(b, loaded=True)] for b in model.blocks] == lora
    assert not streamer._loaded and not streamer._active
    # a retry, then detach: no hooks left, results exact
    x, t, y, mask = make_inputs(cfg, B=2, T=3)
    retry = BlockStreamer(model, "cpu", pin=False).attach()
    retry.log = []
    with torch.no_grad():
        got = model(x, t, y, mask)
        want = ref(x, t, y, mask)
    assert torch.isfinite(want).all() and torch.equal(got, want)
    assert retry.log[:2] == [("load", 0), ("attach", 0)]
    retry.detach()
    assert _hooks(model) == before_hooks
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask), want)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_apply_memory_mode_that_fails_after_the_streamer_attached_detaches_it(monkeypatch, exc):
    """apply_memory_mode(pipe, 'balanced') attached the DiT's block streamer, then the text encoder's group
    offloading raised (its pinned copies ran out of host memory, or a Ctrl-C): the pipeline kept streaming
    its blocks under the recorded plan 'resident', and a switch 'back' to 'resident' was allowed and kept the
    hooks. Now the streamer is detached and the blocks are where they were."""
    import types

    cfg, ref, dit = _models(depth=2)
    te = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    pipe = types.SimpleNamespace(dit=dit, text_encoder=te, vae=torch.nn.Linear(2, 2))
    mem.apply_memory_mode(pipe, "resident", "cpu")
    before_hooks = _hooks(dit)

    def failing_offloading(module, **kw):
        raise exc("simulated: pinning the text encoder failed")

    monkeypatch.setattr(mem, "_group_offloading", lambda: failing_offloading)
    with pytest.raises(exc, match="simulated"):
        mem.apply_memory_mode(pipe, "balanced", "cpu")
    assert pipe._memory.name == "resident"
    assert getattr(dit, "_block_streamer", None) is None and _hooks(dit) == before_hooks
    mem.apply_memory_mode(pipe, "resident", "cpu")
    assert _hooks(dit) == before_hooks
    x, t, y, mask = make_inputs(cfg, B=2, T=3)
    with torch.no_grad():
        want = ref(x, t, y, mask)
        assert torch.isfinite(want).all() and torch.equal(dit(x, t, y, mask), want)


def test_fit_check_counts_the_allocators_free_blocks(monkeypatch):
    """from_pretrained's fit check took the driver's free memory (capped at the fraction minus the reserved
    bytes) as its budget: after a pipeline was deleted in the same process (a notebook), its memory stayed
    reserved by the caching allocator, free to this process but not to the driver, and memory='resident'
    was refused ("needs about 49 GiB ... 10 GiB usable") on an 80 GiB card holding nothing. The refine's
    check (usable_bytes) counted those blocks; now the load's check does too."""
    from longcat_vc.config import DiTConfig

    cfg = DiTConfig.longcat_video()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (10 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: 1.0, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 50 * GiB)
    est = mem.check_memory_fits(cfg, "resident", "cuda:0")
    assert 40 * GiB < est["peak"] < 50 * GiB
    # still refused when the fraction caps the process below the need
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: 0.5, raising=False)
    with pytest.raises(mem.MemoryModeError, match=r"40\.0 GiB usable"):
        mem.check_memory_fits(cfg, "resident", "cuda:0")


@pytest.mark.parametrize("kw, err, match", [
    (dict(budget_bytes="24GiB"), TypeError, r"budget_bytes: expected a number of bytes or None \(24 GiB: 24 \* 2\*\*30\)"),
    (dict(budget_bytes=True), TypeError, "budget_bytes"),
    (dict(budget_bytes=float("nan")), ValueError, "budget_bytes: expected a finite"),
    (dict(budget_bytes=float("inf")), ValueError, "budget_bytes: expected a finite"),
    (dict(budget_bytes=-5), ValueError, "budget_bytes: expected a finite"),
    (dict(budget_bytes=24 * GiB, margin=0), ValueError, "margin: expected a finite number > 0"),
    (dict(budget_bytes=24 * GiB, margin=-1.0), ValueError, "margin: expected a finite number > 0"),
    (dict(budget_bytes=24 * GiB, margin=float("nan")), ValueError, "margin: expected a finite number > 0"),
    (dict(budget_bytes=24 * GiB, margin="1.05"), TypeError, "margin"),
])
def test_fit_check_refuses_bad_budgets_and_margins(kw, err, match):
    """check_memory_fits took any budget_bytes and margin: '24GiB' failed deep in a '<=' between float and
    str, NaN refused every mode as 'nan GiB usable ... no mode fits', and margin=0 or a negative margin let
    memory='resident' fit any budget (a 47 GiB need 'fit' 1 byte). Now each is refused, named."""
    from longcat_vc.config import DiTConfig

    cfg = DiTConfig.longcat_video()
    with pytest.raises(err, match=match):
        mem.check_memory_fits(cfg, "resident", "cuda:0", **kw)
    # the refine's fit check takes the same two knobs
    from longcat_vc import refine as rf

    with pytest.raises(err, match=match):
        rf.check_refine_fits(object(), (704, 1280), 186, 26, **kw)


def test_fit_check_good_budgets_still_decide():
    from longcat_vc.config import DiTConfig

    cfg = DiTConfig.longcat_video()
    need = mem.estimate_peak_bytes(cfg, "low")["peak"]
    assert mem.check_memory_fits(cfg, "low", "cuda:0", budget_bytes=need, margin=1)["peak"] == need
    with pytest.raises(mem.MemoryModeError):
        mem.check_memory_fits(cfg, "low", "cuda:0", budget_bytes=need - 1, margin=1)
    with pytest.raises(mem.MemoryModeError, match="0.0 GiB usable"):
        mem.check_memory_fits(cfg, "low", "cuda:0", budget_bytes=0)


@pytest.mark.parametrize("kw, err, match", [
    (dict(batch=0), ValueError, "batch: expected an int >= 1"),
    (dict(batch=-2), ValueError, "batch: expected an int >= 1"),
    (dict(height=8), ValueError, "height: expected an int >= 16"),
    (dict(height=480.5), TypeError, "height: expected an int"),
    (dict(width="832"), TypeError, "width: expected an int"),
    (dict(dtype_bytes=0), ValueError, "dtype_bytes"),
    (dict(lora_rank=-4), ValueError, "lora_rank: expected an int >= 0"),
    (dict(num_frames=0), ValueError, "num_frames"),
    (dict(text_encoder_params=-1), ValueError, "text_encoder_params"),
    (dict(vae_params=1.5), TypeError, "vae_params"),
    (dict(fp8="no"), TypeError, "fp8: expected a bool"),
    (dict(kv_cache="no"), TypeError, "kv_cache: expected a bool"),
    (dict(offload_kv_cache="no"), TypeError, "offload_kv_cache: expected a bool"),
])
def test_estimate_refuses_bad_shapes(kw, err, match):
    """estimate_peak_bytes (public; the fit checks' and the report's numbers) took any size: batch 0 or -2
    dropped or subtracted the activations, a negative lora_rank shrank the weights, a float height gave a
    float 'bytes' estimate, fp8='no' counted fp8 weights, and a frame smaller than a 16-pixel patch was
    blamed on num_cond_frames. Each is now refused, named."""
    from longcat_vc.config import DiTConfig

    with pytest.raises(err, match=match):
        mem.estimate_peak_bytes(DiTConfig.longcat_video(), "low", **kw)


def test_estimate_takes_numpy_ints_and_gives_ints():
    import numpy as np

    from longcat_vc.config import DiTConfig

    cfg = DiTConfig.longcat_video()
    a = mem.estimate_peak_bytes(cfg, "balanced", height=np.int64(480), batch=np.int32(2), num_cond_frames=0)
    b = mem.estimate_peak_bytes(cfg, "balanced", height=480, batch=2, num_cond_frames=0)
    assert a == b and all(type(v) is int for v in a.values())


@pytest.mark.parametrize("argv, match", [
    (["--cap-gib", "nan"], "--cap-gib: expected a finite number of GiB > 0"),
    (["--cap-gib", "-1"], "--cap-gib: expected a finite number of GiB > 0"),
    (["--cap-low-gib", "0"], "--cap-low-gib: expected a finite number of GiB > 0"),
    (["--cap-gib", "inf"], "--cap-gib: expected a finite number of GiB > 0"),
    (["--modes", "resident,lo"], "--modes: expected a comma-separated subset of resident,balanced,low"),
    (["--variants", "basic,distil"], "--variants: expected a comma-separated subset of basic,distill"),
    (["--variants", ","], "--variants"),
])
def test_memory_bench_checks_its_flags_up_front(argv, match, capsys):
    """bench/memory_modes_gpu.py took any --modes, --variants and caps: an unknown mode raised a KeyError on
    its cap only after the resident mode had run on the GPU, 'distil' ran (and was reported) as the basic
    variant under its own name, and a NaN / zero / negative cap raised in cap_process_memory mid-run (with
    --smoke it was silently recorded as the cap). Now parse_args refuses them."""
    from bench.memory_modes_gpu import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--out", "x.json", *argv])
    assert match in capsys.readouterr().err
    args = parse_args(["--out", "x.json", "--modes", "low,resident", "--variants", "distill", "--cap-gib", "12.5"])
    assert args.cap_gib == 12.5


@pytest.mark.parametrize("pin", ["no", 0, 1.0])
def test_streamer_pin_takes_a_bool(pin):
    """BlockStreamer(pin=...) took bool(pin): pin='no' pinned every block's CPU copy (on a CUDA machine tens
    of GiB of page-locked host memory the user had asked not to lock). Now a non-bool is refused."""
    _, _, model = _models(depth=2)
    with pytest.raises(TypeError, match="pin: expected a bool"):
        BlockStreamer(model, "cpu", pin=pin)
    assert BlockStreamer(model, "cpu", pin=False).pin is False
    assert BlockStreamer(model, "cpu").pin is torch.cuda.is_available()
