"""Round 46 (exception safety): state a call changes is put back when it fails part way.

* ``set_mode("distill", fuse_lora=True)`` whose fuse failed (e.g. ``fuse_lora``'s overflow refusal on an
  fp16 DiT, or an interrupt) left the cfg-step LoRA enabled while the mode was still recorded as
  ``"basic"``: every later basic call ran the distill LoRA (rel. L2 of its latents ~0.17).
* nested ``longcat_kernels.dispatch.record_choices()``: the inner exit unregistered the outer list (removed
  by equality), which then missed the later choices, and the outer exit raised ValueError.
"""

from __future__ import annotations

import os

import pytest
import torch

from longcat_vc.pipeline import VideoContinuationPipeline
from vc_components import full_checkpoint_in, tiny_vc_latents, tiny_vc_video


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return full_checkpoint_in(tmp_path_factory, "ckpt46")


_video, _run = tiny_vc_video, tiny_vc_latents


def _pipe(ckpt, mode):
    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode=mode,
                                                     attn_backend="torch")


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_set_mode_whose_fuse_fails_leaves_the_previous_lora_state(ckpt, monkeypatch, exc):
    """A failed ``set_mode('distill', fuse_lora=True)`` from basic left the cfg-step LoRA on in basic mode
    (later basic latents rel. L2 ~0.17 off a fresh basic pipeline's)."""
    pipe = _pipe(ckpt, "basic")
    ref = _run(pipe)

    def fail():
        raise exc("fuse_lora: the fused weights overflow the weight dtype")

    monkeypatch.setattr(pipe.dit, "fuse_lora", fail)
    with pytest.raises(exc):
        pipe.set_mode("distill", os.path.join(ckpt, "lora", "cfg_step_lora.safetensors"), fuse_lora=True)
    monkeypatch.undo()
    assert pipe.mode == "basic"
    assert pipe.dit.active_loras == []
    assert torch.equal(_run(pipe), ref)


def test_nested_record_choices_keep_recording_and_unregister_their_own_list():
    """``dispatch.record_choices`` unregistered its list with ``list.remove`` (equality): a nested recorder
    that had seen the same choices as the outer one removed the outer list on exit, so the outer block
    recorded 1 of its 3 choices, its own exit raised ``ValueError: list.remove(x): x not in list`` and the
    inner list stayed registered, growing with every later op call of the process."""
    from longcat_kernels import dispatch

    q = torch.randn(1, 8, 2, 16)

    def op():
        dispatch.choose("attn_with_kv_cache", q, requested="torch")

    before = list(dispatch._RECORDERS)
    try:
        with dispatch.record_choices() as outer:
            with dispatch.record_choices() as inner:
                op()
            op()
            op()
        assert (len(outer), len(inner)) == (3, 1)
        with pytest.raises(KeyboardInterrupt):  # an interrupted block unregisters its list too
            with dispatch.record_choices():
                with dispatch.record_choices():
                    op()
                    raise KeyboardInterrupt
        assert dispatch._RECORDERS == before
    finally:
        dispatch._RECORDERS[:] = before
