"""Recompiles of a ``torch.compile``d tiny DiT (aot_eager, CPU): one graph per distinct shape/config, none
per step, per new cache, per model state change (LoRA toggle, ``load_state_dict``) or per new grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo

from test_dit import make_inputs
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config


# fullgraph: the ValueError raised in the trace surfaces as dynamo.exc.Unsupported quoting it


def _graphs(fn) -> int:
    """Graphs dynamo compiled while ``fn`` ran."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    fn()
    return counters["stats"]["unique_graphs"] - before


@pytest.fixture
def compiled():
    torch._dynamo.reset()
    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=21))
    x, t, y, mask = make_inputs(cfg, B=2, T=3, shared_cond=1, seed=4)
    # one eager op call first, as the README asks (loads the backends' facts outside the graph)
    with torch.no_grad():
        model(x, t, y, mask)
    yield cfg, model, torch.compile(model, backend="aot_eager", fullgraph=True), (x, t, y, mask)
    torch._dynamo.reset()


def test_state_change_does_not_recompile_and_stale_cache_still_raises(compiled):
    """The traced stale-cache check guarded on the state counter's value: every LoRA toggle or
    load_state_dict (each refine call, each mode switch) compiled the DiT again (+1 graph per change),
    until the recompile limit sent every step to eager."""
    cfg, model, cm, (x, t, y, mask) = compiled
    sd = {k: v.clone() for k, v in model.state_dict().items()}

    def steps():
        cache = model.build_kv_cache(x[:1, :, :1])
        for s in range(2):
            cm(x[:, :, 1:], t * 0.9 ** s, y, mask, kv_cache=cache)
        return cache

    with torch.no_grad():
        assert _graphs(steps) == 1
        for _ in range(3):
            model.load_state_dict(sd)  # bumps the state counter, as every LoRA API does
            assert _graphs(steps) == 0
        stale = model.build_kv_cache(x[:1, :, :1])
        model.load_state_dict(sd)
        with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="stale"):
            cm(x[:, :, 1:], t, y, mask, kv_cache=stale)
        stale_bsa = model.build_kv_cache(x[:1, :, :1])
        model.config.enable_bsa = True
        try:
            with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="stale"):
                cm(x[:, :, 1:], t, y, mask, kv_cache=stale_bsa)
        finally:
            model.config.enable_bsa = False


def test_new_grid_compiles_once(compiled):
    """A RoPE table (model ``_ropes``, ``Rope3D._tables``) stored by the trace failed that graph's
    "key absent" guard on the next step: each new grid or frame offset compiled the DiT twice."""
    cfg, model, cm, (x, t, y, mask) = compiled
    x5 = torch.randn(2, cfg.in_channels, 5, 4, 6)
    ts = t[:, None].repeat(1, 5)
    ts[:, :2] = 0
    with torch.no_grad():
        assert _graphs(lambda: [cm(x5, ts * 0.9 ** s, y, mask, num_cond_latents=2) for s in range(3)]) == 1
        cache = model.build_kv_cache(x5[:1, :, :2])
        assert _graphs(lambda: [cm(x5[:, :, 2:], t * 0.9 ** s, y, mask, kv_cache=cache) for s in range(3)]) == 1
        cache2 = model.build_kv_cache(torch.randn_like(x5[:1, :, :2]))  # new cache, new values: no graph
        assert _graphs(lambda: cm(x5[:, :, 2:], t, y, mask, kv_cache=cache2)) == 0


@pytest.fixture
def compiled_pipe(refine_ckpt):
    """A distill-mode pipeline on the tiny refinement checkpoint whose DiT is ``compile``d (aot_eager);
    the DiT is uncompiled again afterwards."""
    from longcat_vc.pipeline import VideoContinuationPipeline

    torch._dynamo.reset()
    pipe = VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                     attn_backend="torch", mode="distill")
    pipe.dit.compile(backend="aot_eager")
    yield pipe
    pipe.dit._compiled_call_impl = None
    torch._dynamo.reset()


def _frames(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_refine_compiles_once(compiled_pipe):
    """Each refine call toggles the refinement LoRA and loads a new stage-1 video: neither may compile
    the DiT again (checked by hand in an audit; now pinned)."""
    stage1 = _frames(6, 18, 32, 2)
    kw = dict(video=_frames(9, 20, 36, 1), num_cond_frames=5, resolution=(64, 64), generator=3, progress=False,
              output_type="latent", num_inference_steps=2)
    assert _graphs(lambda: compiled_pipe.refine(stage1, "a cat", **kw)) == 1
    assert _graphs(lambda: compiled_pipe.refine(stage1, "a dog", **dict(kw, generator=5))) == 0


def test_extend_compiles_once(compiled_pipe):
    """Each extend segment builds a new KV cache of the grown video: 3 segments make at most one graph,
    a further extend none."""
    kw = dict(segments=3, num_frames=9, num_cond_frames=5, resolution=(32, 64), num_inference_steps=2, generator=4,
              progress=False)
    video = _frames(9, 40, 72, 9)
    assert _graphs(lambda: compiled_pipe.extend(video, "a cat", **kw)) <= 1
    assert _graphs(lambda: compiled_pipe.extend(video, "a cat", **kw)) == 0
