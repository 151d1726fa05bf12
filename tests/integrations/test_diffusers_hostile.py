"""Hostile-user calls of ``apply_block_sparse_attention`` / ``remove_block_sparse_attention`` on tiny
random ``WanTransformer3DModel``s (fp32, CPU): bad arguments raise a named ValueError/TypeError
before the model is changed; odd grids and resolution changes after apply give diffusers' result."""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

import longcat_kernels as lk  # noqa: E402
from longcat_kernels.integrations.diffusers import (  # noqa: E402
    BlockSparseWanAttnProcessor, apply_block_sparse_attention, remove_block_sparse_attention,
)

HEADS, HEAD_DIM, TEXT_DIM = 2, 16, 24
P = lk.BlockSparseParams


def _model(num_layers=2):
    torch.manual_seed(0)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
        out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=48, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def _run(m, F, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, F, H, W, generator=g)
    txt = torch.randn(1, 7, TEXT_DIM, generator=g)
    with torch.no_grad():
        return m(hidden_states=x, timestep=torch.tensor([300]), encoder_hidden_states=txt, return_dict=False)[0]


def _untouched(m):
    """No hook, no marker, original processor classes: a rejected call changed nothing."""
    return (len(m._forward_pre_hooks) == 0 and not hasattr(m, "_longcat_block_sparse")
            and not any(isinstance(b.attn1.processor, BlockSparseWanAttnProcessor) for b in m.blocks))


@pytest.mark.parametrize("layers,exc", [
    ([0.5], TypeError),       # was int(0.5) == 0: block 0 changed silently
    ([1.9], TypeError),       # was block 1
    ("01", TypeError),        # was blocks 0 and 1 from the characters of a string
    ([True], TypeError),
    (3, TypeError),           # was TypeError: 'int' object is not iterable (argument not named)
    ([0, 0], ValueError),
    ([-1], ValueError),
    ([2], ValueError),
])
def test_layers(layers, exc):
    m = _model()
    with pytest.raises(exc, match=r"^layers: expected"):
        apply_block_sparse_attention(m, P(sparsity=0.5), layers=layers)
    assert _untouched(m)


def test_layers_from_a_generator_are_reported_in_the_error():
    m = _model()
    # the message used to print list(layers) of the already consumed generator: []
    with pytest.raises(ValueError, match=r"got \[0, 7\]"):
        apply_block_sparse_attention(m, P(sparsity=0.5), layers=(i for i in (0, 7)))


@pytest.mark.parametrize("params,exc,msg", [
    (P(sparsity=1.5), ValueError, r"params.sparsity: expected a float in \[0, 1\)"),
    (P(sparsity=-0.1), ValueError, r"params.sparsity: expected"),
    (P(sparsity="0"), TypeError, r"params.sparsity: expected"),       # "0" passed the dense-at-zero test
    (P(sparsity=None, cdf_threshold=None), ValueError, r"params.sparsity/cdf_threshold: expected"),
    (P(sparsity=None, cdf_threshold=2.0), ValueError, r"params.cdf_threshold: expected"),
    (P(chunk_q=(4, 4)), TypeError, r"params.chunk_q: expected"),
    (P(chunk_q=(0, 4, 4)), ValueError, r"params.chunk_q: expected"),
    (P(chunk_q=(2, 2, 2), chunk_k=(2.0, 2, 2)), TypeError, r"params.chunk_k: expected"),
])
def test_bad_sparsity_or_chunk_fails_at_apply_not_at_the_first_forward(params, exc, msg):
    m = _model()
    with pytest.raises(exc, match=rf"^{msg}"):
        apply_block_sparse_attention(m, params)
    assert _untouched(m)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(backend="flash"), ValueError, "backend: expected one of"),
    (dict(backend=None), TypeError, "backend: expected one of"),
    (dict(dense_at_zero="no"), TypeError, "dense_at_zero: expected a bool"),   # "no" was truthy
    (dict(fused_prologue=1), TypeError, "fused_prologue: expected a bool"),
])
def test_bad_flags_and_backend(kw, exc, msg):
    m = _model()
    with pytest.raises(exc, match=rf"^{msg}"):
        apply_block_sparse_attention(m, P(sparsity=0.5), **kw)
    assert _untouched(m)


def test_not_a_wan_model_changes_nothing():
    # config.patch_size and .blocks present, but the blocks have no attn1 (not Wan): this used to
    # register the hook and swap nothing, then fail with AttributeError, leaving a hook that
    # remove_block_sparse_attention could not remove (the model was never marked as applied)
    class NotWan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(patch_size=(1, 2, 2))
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    m = NotWan()
    with pytest.raises(TypeError, match=r"^transformer: expected a diffusers WanTransformer3DModel.*blocks\[0\]"):
        apply_block_sparse_attention(m, P(sparsity=0.5))
    assert len(m._forward_pre_hooks) == 0 and not hasattr(m, "_longcat_block_sparse")
    m.config.patch_size = 2  # e.g. a 2D model's int patch size: was TypeError: 'int' object is not iterable
    with pytest.raises(TypeError, match=r"^transformer: expected .*patch_size is 2"):
        apply_block_sparse_attention(m, P(sparsity=0.5))
    with pytest.raises(TypeError, match=r"^transformer: expected"):
        apply_block_sparse_attention("wan", P(sparsity=0.5))


def test_apply_twice_and_remove_when_not_applied():
    m = _model()
    ref = _run(m, 2, 4, 4, 0)
    assert remove_block_sparse_attention(m) is m and _untouched(m)  # not applied: unchanged
    apply_block_sparse_attention(m, P(sparsity=0.0, chunk_q=(1, 1, 1)), backend="torch")
    procs = [b.attn1.processor for b in m.blocks]
    with pytest.raises(ValueError, match="already applied"):
        apply_block_sparse_attention(m, P(sparsity=0.5), backend="torch")
    assert [b.attn1.processor for b in m.blocks] == procs and len(m._forward_pre_hooks) == 1
    remove_block_sparse_attention(m)
    remove_block_sparse_attention(m)  # twice: the second is a no-op
    assert _untouched(m) and torch.equal(_run(m, 2, 4, 4, 0), ref)


def test_processors_set_by_hand_are_not_wrapped_again():
    m = _model()
    apply_block_sparse_attention(m, P(sparsity=0.5), backend="torch")
    stolen = m.blocks[0].attn1.processor
    remove_block_sparse_attention(m)
    m.blocks[0].attn1.set_processor(stolen)  # a processor of ours, not installed by apply on this model
    with pytest.raises(ValueError, match="already have a BlockSparseWanAttnProcessor"):
        apply_block_sparse_attention(m, P(sparsity=0.5), backend="torch")
    assert len(m._forward_pre_hooks) == 0 and not hasattr(m, "_longcat_block_sparse")


@pytest.mark.parametrize("fused", [False, True])
def test_grids_that_do_not_divide_and_resolution_changes_after_apply(fused):
    # odd H/W (patch 2 floors them, as diffusers' patch embedding does) and a new resolution on every
    # call after apply: at sparsity 0 each equals the untouched model; the RoPE tables follow the grid
    m = _model()
    shapes = [(3, 9, 7), (2, 6, 10), (3, 9, 7), (1, 5, 5)]
    refs = [_run(m, *s, seed=i) for i, s in enumerate(shapes)]
    apply_block_sparse_attention(m, P(sparsity=0.0, chunk_q=(2, 2, 2)), backend="torch", dense_at_zero=False,
                                 fused_prologue=fused)
    for i, (s, ref) in enumerate(zip(shapes, refs)):
        out = _run(m, *s, seed=i)
        assert out.shape == ref.shape and not torch.isnan(out).any()
        err = (out - ref).abs().max().item()
        assert err < 1e-5 * max(1.0, ref.abs().max().item()), (s, err)
    remove_block_sparse_attention(m)


@pytest.mark.parametrize("cdf", [None, 0.5])
def test_chunk_longer_than_a_later_grid_axis_is_capped(cdf):
    # 1 latent frame (an image) after applying with a 2-frame chunk: block_sparse_attn rejects a chunk
    # longer than the grid; the processor caps it (one partial block == the block of the axis length)
    m = _model()
    kw = dict(sparsity=0.5, cdf_threshold=cdf)
    apply_block_sparse_attention(m, P(chunk_q=(1, 2, 1), **kw), backend="torch")
    want = _run(m, 1, 8, 6, 0)  # grid (1, 4, 3)
    remove_block_sparse_attention(m)
    apply_block_sparse_attention(m, P(chunk_q=(2, 2, 1), chunk_k=(4, 2, 1), **kw), backend="torch")
    got = _run(m, 1, 8, 6, 0)
    remove_block_sparse_attention(m)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert _untouched(m)


def test_fused_prologue_uses_the_models_own_rope():
    # a model whose RoPE differs from Wan's default (another theta; ChronoEdit's temporal skip) got
    # Rope3D's default angles from the fused prologue: rel error ~1e-2 at sparsity 0
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    m = _model()
    m.rope = WanRotaryPosEmbed(HEAD_DIM, (1, 2, 2), 32, theta=1000.0)
    ref = _run(m, 3, 8, 8, seed=1)
    apply_block_sparse_attention(m, P(sparsity=0.0, chunk_q=(1, 2, 2)), backend="torch", fused_prologue=True)
    torch.testing.assert_close(_run(m, 3, 8, 8, seed=1), ref, rtol=1e-4, atol=1e-4)
    remove_block_sparse_attention(m)
    m2 = _model()  # the default RoPE still takes the fused path (and agrees)
    ref2 = _run(m2, 3, 8, 8, seed=1)
    apply_block_sparse_attention(m2, P(sparsity=0.0, chunk_q=(1, 2, 2)), backend="torch", fused_prologue=True)
    torch.testing.assert_close(_run(m2, 3, 8, 8, seed=1), ref2, rtol=1e-4, atol=1e-4)
    assert m2._longcat_block_sparse.state.rope_ok is True


def test_deepcopy_of_an_applied_model_uses_its_own_grid():
    import copy

    m = _model()
    apply_block_sparse_attention(m, P(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    _run(m, 2, 8, 12, seed=2)  # grid (2, 4, 6)
    c = copy.deepcopy(m)  # e.g. an EMA copy
    out = _run(c, 2, 12, 8, seed=3)  # grid (2, 6, 4): same token count, another grid
    assert c._longcat_block_sparse.state.grid == (2, 6, 4)
    assert m._longcat_block_sparse.state.grid == (2, 4, 6)  # the original's state untouched
    fresh = copy.deepcopy(c)
    remove_block_sparse_attention(fresh)
    apply_block_sparse_attention(fresh, P(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    torch.testing.assert_close(out, _run(fresh, 2, 12, 8, seed=3), rtol=0, atol=0)


def test_a_custom_attn1_processor_is_not_silently_replaced():
    m = _model()

    class Half:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *a, **k):
            return self.inner(*a, **k) * 0.5

    m.blocks[1].attn1.set_processor(Half(m.blocks[1].attn1.processor))
    with pytest.raises(ValueError, match=r"^transformer.blocks\[1\].attn1: its processor .*Half is not one of diffusers"):
        apply_block_sparse_attention(m, P(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    assert _untouched(m)
    apply_block_sparse_attention(m, P(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch", layers=[0])  # left out: fine


def test_torch_save_of_an_applied_model_round_trips(tmp_path):
    # the hook was a closure: "Can't pickle local object 'apply_block_sparse_attention.<locals>.hook'"
    m = _model()
    apply_block_sparse_attention(m, P(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    ref = _run(m, 2, 8, 12, seed=4)
    torch.save(m, tmp_path / "m.pt")
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(_run(m2, 2, 12, 8, seed=5), _run(m, 2, 12, 8, seed=5), rtol=0, atol=0)
    torch.testing.assert_close(_run(m2, 2, 8, 12, seed=4), ref, rtol=0, atol=0)
    remove_block_sparse_attention(m2)
    assert _untouched(m2)


def test_training_at_sparsity_zero_matches_diffusers_gradients():
    # dense_at_zero sent training forwards to the forward-only dense op: backward raised
    # "flash_attn_with_kvcache is forward-only" from a call the user never made
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    txt = torch.randn(1, 7, TEXT_DIM, generator=g)

    def grads(m):
        m.train()
        out = m(hidden_states=x, timestep=torch.tensor([300]), encoder_hidden_states=txt, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_out, ref = grads(_model())
    m = _model()
    apply_block_sparse_attention(m, P(sparsity=0.0, chunk_q=(1, 2, 2)), backend="torch")
    out, got = grads(m)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert got.keys() == ref.keys() and any("attn1.to_q" in n for n in got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")


def test_nothing_to_patch_is_refused_not_reported_as_applied():
    # layers=[] (or a model without blocks) installed no processor, registered the grid hook and marked
    # the model as block-sparse: a silent no-op
    m = _model()
    with pytest.raises(ValueError, match="layers: expected at least one block index"):
        apply_block_sparse_attention(m, P(sparsity=0.5), layers=[])
    assert not any(isinstance(b.attn1.processor, BlockSparseWanAttnProcessor) for b in m.blocks)
    apply_block_sparse_attention(m, P(sparsity=0.5), layers=[0])  # not marked as applied by the refusal
    empty = _model(num_layers=0)
    with pytest.raises(ValueError, match="the model has no transformer blocks"):
        apply_block_sparse_attention(empty, P(sparsity=0.5))


def test_a_sharded_sequence_is_named_as_such():
    # diffusers' context parallelism hands each rank a slice of the sequence: the error said only
    # "expected N tokens (grid ...), got N/2"
    m = _model()
    apply_block_sparse_attention(m, P(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    proc = m.blocks[0].attn1.processor
    seen = {}
    orig = type(proc).__call__

    def spy(self, attn, hidden_states, *a, **k):
        seen.setdefault("args", (attn, hidden_states, a, k))
        return orig(self, attn, hidden_states, *a, **k)

    type(proc).__call__ = spy
    try:
        _run(m, 2, 8, 8, 0)
    finally:
        type(proc).__call__ = orig
    attn, hs, a, k = seen["args"]
    with pytest.raises(ValueError, match=r"got 16 \(1/2 of the grid: a sequence sharded by context parallelism\?"):
        proc(attn, hs[:, : hs.shape[1] // 2], *a, **k)
    with pytest.raises(ValueError, match=r"got 31$"):
        proc(attn, hs[:, :31], *a, **k)
