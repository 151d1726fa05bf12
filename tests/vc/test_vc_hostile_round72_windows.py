"""Windows between a write and its record (round 72, left open by rounds 64 and 66): an interrupt that
lands right after a LoRA module's weight write, or a recorder leaving while another thread's ``choose``
walks the recorder list. Each test fails on the code before."""

from __future__ import annotations

import pytest
import torch
from tiny_ckpt import tiny_model_with_lora

from longcat_kernels import dispatch

QKV = "blocks.0.attn.qkv"


def _interrupt_after_write(w):
    """``w.copy_`` writes, then raises KeyboardInterrupt (what a Ctrl-C between two statements does)."""
    real = w.copy_

    def copy_then_interrupt(src):
        real(src)
        del w.copy_
        raise KeyboardInterrupt

    w.copy_ = copy_then_interrupt


def _interrupt_before_write(w):
    def interrupt(src):
        del w.copy_
        raise KeyboardInterrupt

    w.copy_ = interrupt


def test_fuse_interrupted_after_the_write_is_recorded(tmp_path):
    m, sd = tiny_model_with_lora(tmp_path)
    mod = m.get_submodule(QKV)
    delta = mod.lora_adapters["a"].delta_weight()
    _interrupt_after_write(mod.weight)
    with pytest.raises(KeyboardInterrupt):
        m.fuse_lora()
    assert [a.name for a in mod.lora_fused] == ["a"]
    torch.testing.assert_close(mod.weight, sd[QKV + ".weight"] + delta, rtol=0, atol=1e-6)
    m.fuse_lora()  # completes the other modules; this one is not fused twice
    torch.testing.assert_close(mod.weight, sd[QKV + ".weight"] + delta, rtol=0, atol=1e-6)
    m.unfuse_lora()
    for k, v in m.state_dict().items():
        if k in sd:
            torch.testing.assert_close(v, sd[k], rtol=0, atol=1e-6, msg=k)


def test_fuse_interrupted_before_the_write_records_nothing(tmp_path):
    m, sd = tiny_model_with_lora(tmp_path)
    mod = m.get_submodule(QKV)
    _interrupt_before_write(mod.weight)
    with pytest.raises(KeyboardInterrupt):
        m.fuse_lora()
    assert mod.lora_fused == [] and torch.equal(mod.weight, sd[QKV + ".weight"])
    m.fuse_lora()
    m.unfuse_lora()
    torch.testing.assert_close(mod.weight, sd[QKV + ".weight"], rtol=0, atol=1e-6)


def test_unfuse_interrupted_after_the_write_is_recorded(tmp_path):
    m, sd = tiny_model_with_lora(tmp_path)
    m.fuse_lora()
    mod = m.get_submodule(QKV)
    _interrupt_after_write(mod.weight)
    with pytest.raises(KeyboardInterrupt):
        m.unfuse_lora()
    assert mod.lora_fused == [] and not mod.lora_adapters["a"]._fused
    torch.testing.assert_close(mod.weight, sd[QKV + ".weight"], rtol=0, atol=1e-6)
    m.unfuse_lora()  # the rest; this module's delta is not taken twice
    for k, v in m.state_dict().items():
        if k in sd:
            torch.testing.assert_close(v, sd[k], rtol=0, atol=1e-6, msg=k)


class _LeavesOnAppend(list):
    """A recorder whose append makes an earlier recorder leave (its ``with`` block ends in another thread
    while this thread's ``choose`` walks the list)."""

    def __init__(self, leave):
        super().__init__()
        self.leave = leave

    def append(self, item):
        super().append(item)
        if self.leave is not None:
            leave, self.leave = self.leave, None
            leave()


def test_a_recorder_leaving_during_a_choice_does_not_hide_it_from_the_next():
    q = torch.randn(1, 8, 2, 4)
    first = dispatch.record_choices()
    first.__enter__()
    hook = _LeavesOnAppend(lambda: first.__exit__(None, None, None))
    dispatch._RECORDERS = [*dispatch._RECORDERS, hook]
    try:
        with dispatch.record_choices() as last:
            dispatch.choose("attn_with_kv_cache", q, q, q, requested="torch")
        assert len(hook) == 1 and len(last) == 1, (len(hook), len(last))
    finally:
        dispatch._RECORDERS = [r for r in dispatch._RECORDERS if r is not hook]
    assert dispatch._RECORDERS == []


def test_refinement_lora_source_is_recorded_on_the_dit_not_a_compile_wrapper(tmp_path):
    """A refine through ``torch.compile(dit)`` recorded which file its refinement LoRA came from on the
    wrapper: a pipeline on the bare DiT with another ``refinement_lora_path`` saw no record, took the loaded
    LoRA for one loaded by hand and refined with the first file's LoRA without a word."""
    import types

    from longcat_vc.pipeline import VideoContinuationPipeline
    from longcat_vc.refine import _refinement_lora_to_load, refine_state
    from vc_components import write_refine_checkpoint, write_refinement_lora

    root = str(tmp_path / "ckpt")
    cfg = write_refine_checkpoint(root)
    other = write_refinement_lora(str(tmp_path / "other"), cfg, seed=int(torch.randint(0, 2**31, ())))
    pipe = VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                     progress=False)
    compiled = types.SimpleNamespace(dit=torch.compile(pipe.dit))
    bare = types.SimpleNamespace(dit=pipe.dit)
    with refine_state(compiled, pipe.refinement_lora_path):
        pass
    assert not _refinement_lora_to_load(compiled, pipe.refinement_lora_path)
    assert not _refinement_lora_to_load(bare, pipe.refinement_lora_path)
    assert _refinement_lora_to_load(bare, other)
    assert _refinement_lora_to_load(compiled, other)
