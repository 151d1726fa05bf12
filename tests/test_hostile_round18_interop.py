"""Round 18 (interop): diffusers settings made on the model while block-sparse attention is applied.

diffusers' ``set_attention_backend`` and ``enable_parallelism`` write ``_attention_backend`` /
``_parallel_config`` onto every attention processor that has the attribute. Our processor had neither,
so the write skipped it: the original processor it keeps (which serves the calls it passes on, and
which ``remove_block_sparse_attention`` puts back) never got the setting. After apply ->
``enable_parallelism`` (Ulysses, 2 ranks, gloo) -> remove, the restored self-attention ran on each
rank's half of the sequence only: output max |diff| 0.81 from the single-process model, no error.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

import longcat_kernels as lk  # noqa: E402
from longcat_kernels.integrations.diffusers import (  # noqa: E402
    BlockSparseWanAttnProcessor, apply_block_sparse_attention, remove_block_sparse_attention,
)


def _model():
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32,
    ).eval()


def test_set_attention_backend_while_applied_reaches_the_restored_processors():
    m = _model()
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    m.set_attention_backend("_native_math")
    assert m.blocks[1].attn2.processor._attention_backend == "_native_math"
    ours = m.blocks[0].attn1.processor
    assert isinstance(ours, BlockSparseWanAttnProcessor)
    assert ours.original._attention_backend == "_native_math"  # serves the calls ours passes on
    remove_block_sparse_attention(m)
    for b in m.blocks:
        assert isinstance(b.attn1.processor, WanAttnProcessor)
        assert b.attn1.processor._attention_backend == "_native_math"  # was None: the setting was lost
    m.reset_attention_backend()


def test_parallel_config_written_while_applied_reaches_the_restored_processors():
    # enable_parallelism's loop (diffusers modeling_utils): for each attention module's processor with the
    # attribute, ``processor._parallel_config = config``; it needs an initialised process group, so the
    # loop's write is made here directly
    m = _model()
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    cfg = object()
    for mod in m.modules():
        proc = getattr(mod, "processor", None)
        if proc is not None and hasattr(proc, "_parallel_config"):
            proc._parallel_config = cfg
    remove_block_sparse_attention(m)
    assert all(b.attn1.processor._parallel_config is cfg for b in m.blocks)
    assert all(b.attn2.processor._parallel_config is cfg for b in m.blocks)


def test_a_processor_without_the_attribute_is_still_skipped_by_diffusers():
    # the attribute follows the original: hasattr is False when the original has none
    class Plain:
        def __call__(self, *a, **k):  # pragma: no cover - never called
            raise AssertionError

    p = BlockSparseWanAttnProcessor(None, lk.BlockSparseParams(), Plain())
    assert not hasattr(p, "_attention_backend") and not hasattr(p, "_parallel_config")


def test_direct_forward_after_a_failed_call_is_refused_not_run_on_its_grid():
    # the pre-forward hook marks "a forward began" (its grid is the next RoPE tables'); a call that raised
    # before any block left the mark set, so a following transformer.forward(...) (no hook) took the failed
    # call's grid: (2, 4, 6) for a (2, 6, 4) input of the same token count, no error (documented: refused)
    m = _model()
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    t, txt = torch.tensor([300]), torch.randn(1, 7, 24)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            m(torch.randn(1, 4, 2, 8, 12), t, torch.randn(1, 7, 25))  # text_dim 24: fails before the blocks
        with pytest.raises(RuntimeError, match=r"RoPE tables of a forward the pre-forward hook did not see"):
            m.forward(torch.randn(1, 4, 2, 12, 8), t, txt)
        out = m(torch.randn(1, 4, 2, 12, 8), t, txt, return_dict=False)[0]  # the module call still works
    assert m._longcat_block_sparse.state.grid == (2, 6, 4) and torch.isfinite(out).all()
    remove_block_sparse_attention(m)
    assert not m._forward_hooks and not m._forward_pre_hooks
