"""The DiT's state dict and serialisation across its lifecycle (audit 47a, 2026-12-07).

A. ``LongCatDiT.load_state_dict`` of a dict that it then refused (one key with a wrong shape, one
   missing or unexpected key under ``strict=True``, a non-tensor value) had already copied every other
   tensor: torch collects these errors and raises after the copies, so 55 of the tiny DiT's 56 tensors
   held the new weights behind the RuntimeError. The problems are now found first and nothing is copied.
B. ``copy.deepcopy`` of a DiT with a block streamer attached (memory 'balanced' / 'low') copied the
   streamer's hooks and forward wrappers as they were (closures over the original blocks): the copy ran
   the original's blocks with its own embedders, silently (max abs error 2.8 against its weights on the
   tiny DiT); pickling it failed with "Can't pickle local object 'BlockStreamer._make_post.<locals>.post'".
C. ``copy.deepcopy`` / ``torch.save`` of a DiT running context parallel failed with "cannot pickle
   'torch._C._distributed_c10d.ProcessGroup' object". Both now raise naming what to undo first.
D. ``load_state_dict`` on an fp8 DiT quantised with a LoRA fused in said "call unfuse_lora() first",
   which fp8 layers refuse ("reload the model"): the message now says how to load such a state dict.
"""

from __future__ import annotations

import copy
import io
import os
import socket

import pytest
import torch
from test_dit import make_inputs
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora

from longcat_vc.fp8 import quantize_dit_fp8
from longcat_vc.memory import BlockStreamer


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("problem", ["shape", "missing", "unexpected", "not_a_tensor"])
def test_a_refused_load_state_dict_copies_nothing(problem):
    """A refused strict load had overwritten 55 of the 56 tensors (all but the bad key) before raising."""
    cfg = tiny_config()
    seed = _seed()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=seed))
    before = _weights(m)
    version = m._state_version
    sd = random_state_dict(cfg, seed=seed + 1)
    key = "final_layer.linear.bias"
    if problem == "shape":
        sd[key] = torch.zeros(3)
    elif problem == "missing":
        del sd[key]
    elif problem == "unexpected":
        sd["blocks.0.attn.foo.weight"] = torch.zeros(3)
    else:
        sd[key] = [0.0] * 64
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict for LongCatDiT.*nothing was loaded"):
        m.load_state_dict(sd)
    assert _same(_weights(m), before)
    assert m._state_version == version  # nothing changed: KV caches built before stay fresh
    if problem in ("missing", "unexpected"):  # not strict: the valid keys load as before
        m.load_state_dict(sd, strict=False)
        assert torch.equal(m.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])


def test_a_valid_loads_still_work_assign_and_meta():
    """The check must not refuse what loaded before: a full dict (assign too, onto a meta skeleton)."""
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=_seed())
    m = model_from_state_dict(cfg, sd)  # meta + assign=True + strict=True
    assert _same(_weights(m), sd)
    m2 = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    m2.load_state_dict(sd)
    assert _same(_weights(m2), sd)


def test_deepcopy_or_pickle_of_a_streamed_dit_is_refused():
    """The deep copy of a block-streamed DiT ran the original's blocks (2.8 max abs off its own weights)."""
    cfg = tiny_config()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    streamer = BlockStreamer(m, "cpu", pin=False).attach()
    with pytest.raises(ValueError, match=r"LongCatDiT: cannot copy or pickle a DiT with a block streamer attached.*"
                                         r"detach\(\) it first"):
        copy.deepcopy(m)
    with pytest.raises(ValueError, match="block streamer attached"):
        torch.save(m, io.BytesIO())
    streamer.detach()
    c = copy.deepcopy(m)  # detached: a plain copy that computes with its own weights
    sd2 = random_state_dict(cfg, seed=_seed())
    c.load_state_dict(sd2)
    x, t, y, mask = make_inputs(cfg, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(c(x, t, y, mask), model_from_state_dict(cfg, sd2)(x, t, y, mask), rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepcopy_or_pickle_of_a_context_parallel_dit_says_what_to_do():
    """Failed with "cannot pickle 'torch._C._distributed_c10d.ProcessGroup' object"."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        cfg = tiny_config()
        m = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
        m.enable_context_parallel()
        with pytest.raises(ValueError, match=r"runs context parallel.*disable_context_parallel\(\)"):
            copy.deepcopy(m)
        with pytest.raises(ValueError, match="runs context parallel"):
            torch.save(m, io.BytesIO())
        m.disable_context_parallel()
        c = copy.deepcopy(m)
        assert _same(_weights(c), _weights(m)) and c.context_parallel is None
    finally:
        dist.destroy_process_group()


def test_load_state_dict_into_fp8_with_a_fused_lora_names_a_way_that_works(tmp_path):
    """Said "call unfuse_lora() first", which the fp8 layers then refused."""
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=_seed())
    path = os.fspath(tmp_path / "a.safetensors")
    write_longcat_lora(path, cfg, rank=4)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(path, "a")
    m.enable_loras(["a"])
    m.fuse_lora()
    quantize_dit_fp8(m, emulate=True)
    qsd = _weights(m)
    with pytest.raises(RuntimeError, match=r"fused into the weights before fp8 quantisation.*quantize_dit_fp8 "
                                           r"without fusing"):
        m.load_state_dict(qsd)
    # the way the message names: a DiT quantised without a LoRA takes the state dict (the LoRA is in its weights)
    fresh = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    quantize_dit_fp8(fresh, emulate=True)
    fresh.load_state_dict(qsd)
    assert _same(_weights(fresh), qsd)


def test_from_pretrained_of_a_saved_fp8_state_dict_says_what_it_is(tmp_path):
    """A quantised DiT's state dict saved as a dit/ folder was refused with "16 unexpected key(s) ...weight_scale"
    and nothing saying the file holds an fp8-quantised model (round 47's note); the error now says so."""
    from longcat_vc import LongCatDiT
    from longcat_vc.loading import CheckpointError
    from tiny_ckpt import write_upstream_dit

    cfg = tiny_config()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    quantize_dit_fp8(m, emulate=True)
    folder = os.fspath(tmp_path / "dit")
    os.makedirs(folder)
    write_upstream_dit(folder, cfg, {k: v.contiguous() for k, v in m.state_dict().items()}, shards=1)
    with pytest.raises(CheckpointError, match=r"unexpected key.*weight_scale.*quantize_dit_fp8"):
        LongCatDiT.from_pretrained(folder, progress=False)
