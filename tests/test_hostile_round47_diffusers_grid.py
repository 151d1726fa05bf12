"""Round 47 (diffusers integration): how each forward's video grid reaches the attention processors.

The grid came from a pre-forward hook on the transformer and a "forward began" mark (``_fresh``) that the
first new RoPE tables consumed; a forward hook with ``always_call=True`` cleared a mark left by a failed call.
torch runs ``always_call`` hooks on an Exception only, so a KeyboardInterrupt before the first block left the
mark set, and a compiled block recomputed by activation checkpointing read the current forward's grid.
The grid is now also recorded where the RoPE tables are made (a forward hook on ``transformer.rope``) and tagged
onto the tables, which eager and compiled blocks both read.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from helpers import tiny_wan  # noqa: E402

import longcat_kernels as lk  # noqa: E402
from longcat_kernels.integrations.diffusers import (  # noqa: E402
    apply_block_sparse_attention, remove_block_sparse_attention,
)

P = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))


def _model():
    return tiny_wan()


def _inputs(F, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, F, H, W, generator=g), timestep=torch.tensor([300]),
                encoder_hidden_states=torch.randn(1, 7, 24, generator=g), return_dict=False)


def _interrupt(*_):
    raise KeyboardInterrupt


def test_keyboard_interrupt_before_the_blocks_leaves_no_mark_for_a_direct_forward():
    """A KeyboardInterrupt (Ctrl-C) raised after the pre-forward hook and before the first block skipped the
    always_call forward hook, so the mark stayed set: a following ``transformer.forward(...)`` at (2, 6, 4) (same
    24 tokens) ran on the interrupted call's grid (2, 4, 6) with no error; it is now refused as any direct call."""
    m = _model()
    apply_block_sparse_attention(m, P, backend="torch")
    with torch.no_grad():
        h = m.patch_embedding.register_forward_pre_hook(_interrupt)
        with pytest.raises(KeyboardInterrupt):
            m(**_inputs(2, 8, 12))
        h.remove()
        with pytest.raises(RuntimeError, match=r"RoPE tables of a forward the pre-forward hook did not see"):
            m.forward(**_inputs(2, 12, 8))
        out = m(**_inputs(2, 12, 8))[0]
    assert m._longcat_block_sparse.state.grid == (2, 6, 4) and torch.isfinite(out).all()
    remove_block_sparse_attention(m)
    assert not m._forward_hooks and not m._forward_pre_hooks and not m.rope._forward_hooks


def _grads(shapes, compiled):
    m = _model()
    apply_block_sparse_attention(m, P, backend="torch")
    m.train()
    if compiled:
        m.enable_gradient_checkpointing()
        m.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    losses = []
    for i, fhw in enumerate(shapes):
        out = m(**_inputs(*fhw, seed=i))[0]
        losses.append((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum())
    sum(losses).backward()
    return {n.replace("_orig_mod.", ""): p.grad for n, p in m.named_parameters() if p.grad is not None}


def test_compiled_checkpointed_blocks_recompute_with_their_own_grid():
    """compile_repeated_blocks(fullgraph=True) + enable_gradient_checkpointing, forwards at (2, 4, 6) then (2, 6, 4)
    latents grids (same token count) before one backward: the first forward's blocks were recomputed on the second
    grid, silently wrong gradients (documented as a limitation); they now equal the eager, uncheckpointed ones."""
    shapes = [(2, 8, 12), (2, 12, 8)]
    torch._dynamo.reset()
    try:
        want, got = _grads(shapes, False), _grads(shapes, True)
    finally:
        torch._dynamo.reset()  # the block's compiled entries would count against other tests' recompile limit
    assert got.keys() == want.keys() and any("attn1.to_q" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")
