"""Memory modes, round 73 (hostile user on CPU); each test of a fix fails on the code before it.

A. Two pipelines on one DiT and text encoder: after the second one's ``apply_memory_mode("balanced")``
   the first one (recorded ``resident``) took ``apply_memory_mode(pipe, "resident")``: it recorded
   ``resident`` over the attached block streamer and group offloading (the refusal only read the
   pipeline's own record).
B. ``device="cpu:0"`` and ``"cpu"`` are one device, but a pipeline loaded with one was refused a mode
   switch on the other ("the DiT blocks stream to cpu:0, got cpu"), and the text encoder's offload too.
C. A KeyboardInterrupt between a block's pre-hook and its forward (in ``nn.Module.__call__``, or in a
   hook of the user's) skipped the streamer's post-hook: the block stayed on its device copies, and
   neither the next ``release()`` (the pipeline's, after an interrupted loop) nor anything else put it
   back; a ``fuse_lora`` then wrote into the copies and the next call put the unfused CPU copies back:
   fused and unfused results silently wrong for good. The DiT's ``forward`` / ``build_kv_cache`` now
   put every block back when they return or raise, and ``release()`` does too.
D. An interrupt part way through putting a block back forgot the block's homes first: the rest of its
   tensors stayed on their device copies, taken as their homes from then on.
E. ``apply_memory_mode(pipe, mode, "meta")`` on a resident pipeline moved every weight onto ``meta``
   (gone for good), and ``BlockStreamer(dit, "meta").attach()`` the embedders; ``BlockStreamer(dit,
   "cuda")`` without CUDA failed in ``torch.cuda.Stream`` naming no argument.

Pinned (correct, untested): mode toggles (set_mode, fuse, BSA, cache on/off, offload) on streamed
pipelines equal the resident one's; ``load_state_dict`` / ``state_dict`` / training gradients while
streaming; ``torch.compile`` of a streamed DiT; the DiT's own methods are back after ``detach()``.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from longcat_vc.memory import BlockStreamer, apply_memory_mode, offload_text_encoder
from vc_components import fused_and_unfused_equal
from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora

SIZE = (32, 48)


def _pair(tmp_path=None, depth=3):
    cfg = tiny_config(depth=depth)
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()))
    lora = None
    if tmp_path is not None:
        lora = str(tmp_path / "l.safetensors")
        write_longcat_lora(lora, cfg, targets=LORA_TARGETS_REFINEMENT, seed=int(torch.randint(0, 999, ()).item()))
    return cfg, model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd), lora


def _equal(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item()}"


def _homes(model):
    return [{n: p.data_ptr() for n, p in blk.named_parameters()} for blk in model.blocks]


# ----------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vc_components import write_full_checkpoint

    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    root = str(tmp_path_factory.mktemp("ckpt73"))
    write_full_checkpoint(root, seed=int(torch.randint(0, 999, ()).item()))
    return root


def _video():
    return np.random.default_rng(int(torch.randint(0, 999, ()).item())).integers(0, 256, (9, 40, 56, 3), dtype=np.uint8)


def _load(ckpt, memory="resident", device="cpu"):
    from longcat_vc.pipeline import VideoContinuationPipeline

    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device=device, memory=memory,
                                                     progress=False)


def _run(pipe, video, **kw):
    args = dict(resolution=SIZE, num_frames=9, num_cond_frames=5, num_inference_steps=2, guidance_scale=2.0,
                generator=7, progress=False, output_type="latent")
    args.update(kw)
    return pipe(video, "a person rides a motorcycle on the road", **args).latents


def test_resident_is_refused_where_another_pipeline_made_the_shared_components_stream(ckpt):
    from longcat_vc.pipeline import VideoContinuationPipeline

    video = _video()
    a = _load(ckpt)
    ref = _run(a, video)
    b = VideoContinuationPipeline(a.dit, a.vae, a.text_encoder, a.tokenizer, a.scheduler_config)
    apply_memory_mode(b, "balanced", "cpu")
    streamer = a.dit._block_streamer
    assert streamer is not None and a.memory == "balanced"  # (F below)
    with pytest.raises(ValueError, match=r"switching to 'resident' needs a fresh"):
        apply_memory_mode(a, "resident", "cpu")
    assert a.memory == "balanced" and a.dit._block_streamer is streamer
    _equal(_run(a, video), ref)
    assert apply_memory_mode(a, "low", "cpu").name == "low" and a.memory == "low"
    _equal(_run(a, video), ref)


def test_resident_is_refused_where_only_the_shared_text_encoder_streams(ckpt):
    """The text encoder alone offloaded by another pipeline (the DiTs are separate)."""
    from longcat_vc.pipeline import VideoContinuationPipeline

    a = _load(ckpt)
    other = _load(ckpt, "balanced")
    c = VideoContinuationPipeline(a.dit, a.vae, other.text_encoder, a.tokenizer, a.scheduler_config)
    assert c.memory == "resident"
    with pytest.raises(ValueError, match=r"pipeline's text encoder stream"):
        apply_memory_mode(c, "resident", "cpu")
    assert getattr(c.dit, "_block_streamer", None) is None


def test_cpu_and_cpu_0_are_one_streaming_device(ckpt):
    video = _video()
    ref = _run(_load(ckpt), video)
    for loaded, switched in (("cpu:0", "cpu"), ("cpu", torch.device("cpu", 0))):
        pipe = _load(ckpt, "balanced", device=loaded)
        assert apply_memory_mode(pipe, "low", switched).name == "low"
        offload_text_encoder(pipe.text_encoder, switched)  # already offloaded there: a no-op
        _equal(_run(pipe, video), ref)


def test_mode_toggles_on_streamed_pipelines_equal_the_resident_one(ckpt):
    """set_mode (LoRA load, fuse, unfuse), BSA, cache off and offload on a streamed pipeline: latents equal
    the resident pipeline's after every switch (pinned)."""
    video = _video()
    lora = f"{ckpt}/lora/cfg_step_lora.safetensors"
    steps = [("distill", dict(guidance_scale=1.0)), ("fused", dict(guidance_scale=1.0)),
             ("basic", dict(use_kv_cache=False)), ("basic", dict(use_bsa=True, offload_kv_cache=True))]
    outs = {}
    for memory in ("resident", "low"):  # (balanced streams the same way; the low one also offloads the cache)
        pipe, outs[memory] = _load(ckpt, memory), []
        for mode, kw in steps:
            if mode == "distill":
                pipe.set_mode("distill", lora_path=lora)
            elif mode == "fused":
                pipe.set_mode("distill", fuse_lora=True)
            else:
                pipe.set_mode("basic")
            outs[memory].append(_run(pipe, video, **kw))
    for r, s in zip(outs["resident"], outs["low"]):
        _equal(r, s)


# ----------------------------------------------------------------------------- interrupts


def _boom(*args):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["forward", "build_kv_cache"])
@pytest.mark.parametrize("hook", ["pre", "post"])
def test_interrupt_between_a_blocks_hooks_and_its_forward_leaves_no_block_on_its_copies(tmp_path, where, hook):
    cfg, ref, model, lora = _pair(tmp_path)
    streamer = BlockStreamer(model, "cpu").attach()
    homes = _homes(model)
    x, t, y, mask = make_inputs(cfg, B=2, T=3, shared_cond=1)
    blk = model.blocks[where == "forward"]  # (block 0 of a cache build: the last one runs forward_kv_only)
    # a Ctrl-C landing in nn.Module.__call__ after the streamer's pre-hook, or before its post-hook
    h = blk.register_forward_pre_hook(_boom) if hook == "pre" else blk.register_forward_hook(_boom, prepend=True)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(x, t, y, mask) if where == "forward" else model.build_kv_cache(x[:1, :, :1])
    h.remove()
    assert not streamer._active and _homes(model) == homes
    fused_and_unfused_equal(ref, model, lora, x, t, y, mask)


def test_release_puts_back_a_block_called_alone_and_interrupted(tmp_path):
    """A block called directly (not through the DiT's forward) and interrupted: ``release()`` (what the
    pipeline calls after an interrupted loop) puts it back."""
    cfg, ref, model, lora = _pair(tmp_path)
    streamer = BlockStreamer(model, "cpu").attach()
    homes = _homes(model)
    x, t, y, mask = make_inputs(cfg, B=2, T=3, shared_cond=1)
    h = model.blocks[0].register_forward_pre_hook(_boom)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model.blocks[0](None)
    h.remove()
    streamer.release()
    assert not streamer._active and not streamer._loaded and _homes(model) == homes
    fused_and_unfused_equal(ref, model, lora, x, t, y, mask)


class _InterruptedItems(dict):
    def items(self):
        pairs = iter(list(super().items()))
        yield next(pairs)
        raise KeyboardInterrupt


def test_interrupt_part_way_through_putting_a_block_back(tmp_path, monkeypatch):
    cfg, ref, model, lora = _pair(tmp_path)
    streamer = BlockStreamer(model, "cpu").attach()
    homes = _homes(model)
    x, t, y, mask = make_inputs(cfg, B=2, T=3, shared_cond=1)
    tensors, armed = streamer._block_tensors, [True]

    def block_tensors(block):
        d = tensors(block)
        if armed[0] and sys._getframe(1).f_code.co_name == "_after" and block is model.blocks[1]:
            armed[0] = False
            return _InterruptedItems(d)
        return d

    monkeypatch.setattr(streamer, "_block_tensors", block_tensors)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(x, t, y, mask)
    assert not armed[0]
    assert not streamer._active and _homes(model) == homes
    fused_and_unfused_equal(ref, model, lora, x, t, y, mask)


# ----------------------------------------------------------------------------- devices


def _tiny_pipe():
    pytest.importorskip("accelerate")
    _, dit, _, _ = _pair()
    return types.SimpleNamespace(dit=dit, text_encoder=torch.nn.Linear(4, 4), vae=torch.nn.Linear(2, 2))


@pytest.mark.parametrize("mode", ["resident", "balanced", "low"])
def test_meta_device_is_refused_before_anything_moves(mode):
    pipe = _tiny_pipe()
    before = {n: p.clone() for n, p in pipe.dit.state_dict().items()}
    with pytest.raises(ValueError, match=r"apply_memory_mode: device: expected a device that holds data, got meta"):
        apply_memory_mode(pipe, mode, "meta")
    assert getattr(pipe, "_memory", None) is None and getattr(pipe.dit, "_block_streamer", None) is None
    after = pipe.dit.state_dict()
    assert all(after[n].device.type == "cpu" and torch.equal(after[n], v) for n, v in before.items())
    assert pipe.vae.weight.device.type == "cpu"


def test_streamer_device_is_checked_and_named():
    _, _, model, _ = _pair()
    with pytest.raises(ValueError, match=r"BlockStreamer: device: expected a device that holds data"):
        BlockStreamer(model, "meta")
    with pytest.raises(TypeError, match=r"BlockStreamer: device: expected a str or torch.device"):
        BlockStreamer(model, None)
    with pytest.raises(ValueError, match=r"BlockStreamer: device: expected a device such as"):
        BlockStreamer(model, "gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"BlockStreamer: device: .*CUDA is not available"):
            BlockStreamer(model, "cuda")
    assert getattr(model, "_block_streamer", None) is None and model.x_embedder.proj.weight.device.type == "cpu"
    assert BlockStreamer(model, torch.device("cpu", 0)).device.type == "cpu"


# ----------------------------------------------------------------------------- pinned


def test_detach_gives_back_the_dits_own_methods():
    _, ref, model, _ = _pair()
    mine = model.forward
    model.forward = mine  # an instance attribute set before attach() (a wrapper of the user's)
    s = BlockStreamer(model, "cpu").attach()
    assert model.__dict__["forward"] is not mine and "build_kv_cache" in model.__dict__
    s.detach()
    assert model.__dict__["forward"] is mine and "build_kv_cache" not in model.__dict__


def test_state_dict_load_state_dict_and_gradients_while_streaming():
    cfg, ref, model, _ = _pair()
    BlockStreamer(model, "cpu").attach()
    x, t, y, mask = make_inputs(cfg, B=2, T=3, shared_cond=1)
    with torch.no_grad():
        model(x, t, y, mask)  # block 0 prefetched with the old weights
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()))
    ref.load_state_dict(sd)
    model.load_state_dict(sd)
    with torch.no_grad():
        _equal(ref(x, t, y, mask), model(x, t, y, mask))
    got = model.state_dict()
    assert {v.device.type for v in got.values()} == {"cpu"}
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    for m in (ref, model):
        m.requires_grad_(True)
        m(x, t, y, mask).square().mean().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert p.grad is not None and q.grad is not None, n
        _equal(p.grad, q.grad)


def test_compiled_streamed_dit_equals_the_resident_one():
    cfg, ref, model, _ = _pair(depth=2)
    BlockStreamer(model, "cpu").attach()
    x, t, y, mask = make_inputs(cfg, B=1, T=2, shared_cond=1)
    with torch.no_grad():
        _equal(ref(x, t, y, mask), torch.compile(model, backend="eager")(x, t, y, mask))


def test_a_resident_pipeline_whose_dit_another_pipeline_made_stream_reports_a_streaming_mode(ckpt):
    """F. ``memory`` said "resident" (and refine's fit check counted the whole DiT on the device) for a pipeline
    whose DiT another pipeline switched to ``balanced`` after it was built; at construction it already said
    "balanced"."""
    from longcat_vc import refine as rf
    from longcat_vc.pipeline import VideoContinuationPipeline

    a = _load(ckpt)
    b = VideoContinuationPipeline(a.dit, a.vae, a.text_encoder, a.tokenizer, a.scheduler_config)
    apply_memory_mode(b, "low", "cpu")
    assert a.memory == "balanced" and b.memory == "low"
    c = VideoContinuationPipeline(a.dit, a.vae, a.text_encoder, a.tokenizer, a.scheduler_config)
    assert c.memory == a.memory
    budget = 2**50  # (a budget: the check runs on the CPU too)
    got = rf.check_refine_fits(a, (64, 128), 16, 5, offload_kv_cache=False, budget_bytes=budget)
    assert got is not None and got == rf.check_refine_fits(c, (64, 128), 16, 5, offload_kv_cache=False,
                                                           budget_bytes=budget)


def test_a_recorded_forward_through_blocks_streamed_to_another_device_is_refused_before_it_runs():
    """(session 30) Streamed to CUDA, the post-hook points each weight's ``.data`` back at its CPU copy, which
    autograd saved: the backward met CPU weights beside CUDA gradients, after the whole forward. Refused
    up front now (host logic: the streamer's device is set to CUDA after attaching on the CPU; the refusal
    comes before any block moves)."""
    cfg, _, model, _ = _pair(depth=2)
    streamer = BlockStreamer(model, "cpu")
    streamer.attach()
    x, t, y, mask = make_inputs(cfg, B=1, T=2, shared_cond=1)
    streamer.device = torch.device("cuda")
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"streams its blocks to cuda .* train with memory='resident'"):
        model(x, t, y, mask)
    model.requires_grad_(False)
    with pytest.raises(RuntimeError, match="streams its blocks"):
        model.build_kv_cache(x[:, :, :1].detach().requires_grad_(True))  # a grad-requiring input alone
    # nothing recorded: no refusal (the CPU streamer's own forward runs on)
    streamer._refuse_backward((x, t, y, mask), {})
    with torch.no_grad():
        model.requires_grad_(True)
        streamer._refuse_backward((x, t, y, mask), {})
    streamer.device = torch.device("cpu")
    out = model(x, t, y, mask)  # the CPU homes are the device: backward works (pinned above)
    assert out.requires_grad and torch.isfinite(out).all()


@pytest.mark.cuda
def test_backward_through_blocks_streamed_to_cuda_is_right_or_refused_clearly():
    """(session 30, no device; first GPU run owed) Round 73 suspected that a backward through a DiT whose blocks
    stream from the CPU to CUDA fails: autograd saves the weights themselves, whose ``.data`` the post-hook points
    back at the CPU copies. Either the gradients equal the resident model's, or the forward refuses with an
    error that names streaming; never a device-mismatch error from inside backward."""
    cfg, ref, model, _ = _pair()
    ref.cuda()
    streamer = BlockStreamer(model, "cuda")
    streamer.attach()
    x, t, y, mask = (u.cuda() for u in make_inputs(cfg, B=2, T=3, shared_cond=1))
    ref.requires_grad_(True)
    model.requires_grad_(True)
    ref(x, t, y, mask).square().mean().backward()
    try:
        model(x, t, y, mask).square().mean().backward()
    except (RuntimeError, ValueError) as e:
        assert "stream" in str(e).lower(), e
        return
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert q.grad is not None, n
        torch.testing.assert_close(q.grad.to(p.grad.device), p.grad, rtol=1e-5, atol=1e-6, msg=n)
