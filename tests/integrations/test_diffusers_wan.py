"""The diffusers integration on tiny random ``WanTransformer3DModel``s (T2V and I2V), fp32 on CPU:
at sparsity 0 it equals the untouched model; after ``remove_block_sparse_attention`` the model is
bit-for-bit the original (same processor objects, no hook left)."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

import longcat_kernels as lk  # noqa: E402
from longcat_kernels.integrations.diffusers import (  # noqa: E402
    BlockSparseWanAttnProcessor, apply_block_sparse_attention, remove_block_sparse_attention,
)

HEADS, HEAD_DIM, TEXT_DIM, IMAGE_DIM = 2, 16, 24, 20


def _model(i2v: bool):
    torch.manual_seed(0)
    inner = HEADS * HEAD_DIM
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
        out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32,
        image_dim=IMAGE_DIM if i2v else None, added_kv_proj_dim=inner if i2v else None,
    ).eval()
    # zero-initialised parameters (e.g. norms' biases) would hide mistakes: randomise everything
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def _inputs(i2v: bool, F=3, H=8, W=12):
    x = torch.randn(2, 4, F, H, W)
    t = torch.tensor([500, 20])
    # diffusers' I2V processor takes the last 512 context tokens as text
    txt = torch.randn(2, 512 if i2v else 7, TEXT_DIM)
    img = torch.randn(2, 5, IMAGE_DIM) if i2v else None
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=txt, encoder_hidden_states_image=img,
                return_dict=False)


def _run(m, inp):
    with torch.no_grad():
        return m(**inp)[0]


@pytest.mark.parametrize("i2v", [False, True])
@pytest.mark.parametrize("dense_at_zero,fused", [(True, False), (False, True)])
def test_sparsity_zero_equals_diffusers_and_remove_restores(i2v, dense_at_zero, fused):
    m = _model(i2v)
    inp = _inputs(i2v)
    ref = _run(m, inp)
    procs = [b.attn1.processor for b in m.blocks]
    procs2 = [b.attn2.processor for b in m.blocks]
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=(2, 2, 2)), backend="torch",
                                 dense_at_zero=dense_at_zero, fused_prologue=fused)
    assert all(isinstance(b.attn1.processor, BlockSparseWanAttnProcessor) for b in m.blocks)
    assert [b.attn2.processor for b in m.blocks] == procs2  # cross-attention / image branch untouched
    out = _run(m, inp)
    assert not torch.isnan(out).any()
    err = (out - ref).abs().max().item()
    assert err < 1e-5 * max(1.0, ref.abs().max().item()), err
    # a sparse rule changes the result (the processor really runs)
    m.blocks[0].attn1.processor.params = lk.BlockSparseParams(sparsity=0.5, chunk_q=(2, 2, 2))
    sparse = _run(m, inp)
    assert torch.isfinite(sparse).all() and (sparse - ref).abs().max() > 1e-4
    remove_block_sparse_attention(m)
    assert all(b.attn1.processor is p for b, p in zip(m.blocks, procs))
    assert len(m._forward_pre_hooks) == 0 and not hasattr(m, "_longcat_block_sparse")
    assert torch.equal(_run(m, inp), ref)


@pytest.mark.triton_interpret
def test_triton_backend_sparsity_zero_and_layers_subset():
    m = _model(False)
    inp = _inputs(False, F=2, H=8, W=8)
    ref = _run(m, inp)
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=(2, 2, 2)), layers=[1],
                                 backend="triton", dense_at_zero=False, fused_prologue=True)
    assert not isinstance(m.blocks[0].attn1.processor, BlockSparseWanAttnProcessor)
    assert isinstance(m.blocks[1].attn1.processor, BlockSparseWanAttnProcessor)
    out = _run(m, inp)
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    remove_block_sparse_attention(m)
    assert torch.equal(_run(m, inp), ref)


def test_bsa_processor_sees_the_post_patch_grid():
    m = _model(False)
    inp = _inputs(False, F=3, H=10, W=6)
    seen = []
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(2, 2, 2)), backend="torch")
    orig = lk.integrations.diffusers.block_sparse_attn

    def spy(q, k, v, **kw):
        seen.append(kw["grid_q"])
        return orig(q, k, v, **kw)

    lk.integrations.diffusers.block_sparse_attn = spy
    try:
        _run(m, inp)
    finally:
        lk.integrations.diffusers.block_sparse_attn = orig
    assert seen == [(3, 5, 3)] * 2


def test_bad_arguments():
    m = _model(False)
    with pytest.raises(TypeError, match="params"):
        apply_block_sparse_attention(m, {"sparsity": 0.5})
    with pytest.raises(ValueError, match="layers"):
        apply_block_sparse_attention(m, lk.BlockSparseParams(), layers=[5])
    with pytest.raises(TypeError, match="transformer"):
        apply_block_sparse_attention(torch.nn.Linear(2, 2), lk.BlockSparseParams())
    apply_block_sparse_attention(m, lk.BlockSparseParams())
    with pytest.raises(ValueError, match="already"):
        apply_block_sparse_attention(m, lk.BlockSparseParams())
    remove_block_sparse_attention(m)
