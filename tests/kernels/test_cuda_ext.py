"""The compiled extension (backend "cuda"): parity, semantics, registration. Marked ``ext``.

Every kernel family is exercised where the GPU can run it: ``sm90_ws`` (warp-specialised TMA +
wgmma where it applies: head_dim 128, BSA with 64-token blocks and one key segment; sm90
elsewhere), ``sm90`` (wgmma, Hopper with an sm_90a build) and ``sm80`` (mma.sync). The fixture
``impl`` restricts the families the extension reports (``_ext._STATE["kernels"]``), so the
dispatcher (``kernel=None`` -> ``dispatch.choose(requested="cuda")``) picks the best of those.
The C++ ops allocate their outputs with ``at::empty``, which the NaN-poisoning ``torch.empty`` of
conftest does not reach; ``_poison`` leaves a NaN block in the caching allocator right before each
call so that an unwritten output shows up as NaN.
"""

from __future__ import annotations

import random

import pytest
import torch

from longcat_kernels.testing.oracle import attention_lowp, attention_oracle, bsa_token_mask, prefix_mask
from longcat_kernels.testing.tolerance import assert_close

pytestmark = pytest.mark.ext

DEV = "cuda"


def _impls():
    from longcat_kernels._ext import csrc_kernels

    return list(csrc_kernels()) if torch.cuda.is_available() else []


_FAMILIES = ("sm90_ws", "sm90", "sm80")


def _restrict(monkeypatch, family):
    """Let the dispatcher see only ``family`` and the simpler ones (as the old env knob did)."""
    from longcat_kernels import _ext

    if family not in _impls():
        pytest.skip(f"kernel family {family} is not available here (needs a Hopper GPU / sm_90a build)")
    monkeypatch.setitem(_ext._STATE, "kernels", _FAMILIES[_FAMILIES.index(family):])


# sm90_ws: the warp-specialised kernels where they apply, sm90 elsewhere
@pytest.fixture(params=list(_FAMILIES))
def impl(request, monkeypatch):
    _restrict(monkeypatch, request.param)
    return request.param


def _family64():
    """The family that runs head_dim 64 here (sm90 on Hopper, else sm80)."""
    return "sm90" if "sm90" in _impls() else "sm80"


def _poison(like: torch.Tensor):
    x = torch.full((like.numel() * 2,), float("nan"), dtype=like.dtype, device=like.device)
    del x


def _rand(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype)


def _bsa_oracle(q, k, v, sel, scale):
    mask = bsa_token_mask(sel.to_mask(), sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    out, lse = attention_oracle(q, k, v, mask, scale)
    return out, lse, attention_lowp(q, k, v, mask, scale), mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize(
    "grid,chunk",
    [((4, 8, 8), (4, 4, 4)), ((5, 6, 10), (4, 4, 4)), ((4, 8, 12), (4, 4, 8)), ((3, 5, 7), (2, 2, 4))],
)
def test_bsa_forward_parity(impl, dtype, D, grid, chunk):
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda

    B, H = 2, 3
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (_rand(B, S, H, D, dtype=dtype) for _ in range(3))
    sel = select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=random.choice([0.5, 0.75]), backend="torch")
    _poison(q)
    out, lse = bsa_forward_cuda(q, k, v, sel, D**-0.5)
    ref, ref_lse, base, _ = _bsa_oracle(q, k, v, sel, D**-0.5)
    assert_close(out, ref, base, name=f"bsa out [{impl}]")
    assert_close(lse, ref_lse.float(), floor=1e-5, name=f"bsa lse [{impl}]")


def test_bsa_empty_and_full_selection(impl):
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda
    from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection

    grid, chunk, D = (5, 6, 10), (4, 4, 4), 128
    S = 5 * 6 * 10
    q, k, v = (_rand(1, S, 2, D, dtype=torch.bfloat16) for _ in range(3))
    full = select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.0, backend="torch")
    assert int(full.counts.min()) == full.num_k_blocks
    out, lse = bsa_forward_cuda(q, k, v, full, D**-0.5)
    ref, ref_lse = attention_oracle(q, k, v, None, D**-0.5)
    assert_close(out, ref, attention_lowp(q, k, v, None, D**-0.5), name="all blocks kept == dense")
    counts = full.counts.clone()
    counts[0, 1, :] = 0  # head 1: every query block selects nothing
    counts[0, 0, 3] = 0
    empty = BlockSelection(full.indices, counts, full.grid_q, full.grid_k, full.chunk_q, full.chunk_k)
    _poison(q)
    out, lse = bsa_forward_cuda(q, k, v, empty, D**-0.5)
    assert not out.isnan().any()
    assert torch.all(out[0, :, 1] == 0)
    assert torch.all(torch.isneginf(lse[0, 1]))
    ref, ref_lse, base, _ = _bsa_oracle(q, k, v, empty, D**-0.5)
    assert_close(out, ref, base, name="partly empty selection")


def test_bsa_selection_batch_broadcast_and_strides(impl):
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda
    from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection

    grid, chunk, D, H = (4, 8, 8), (4, 4, 4), 64, 2
    S = 256
    # BHSD storage passed as BSHD views (no copy in the op)
    q, k, v = (_rand(2, H, S, D, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    sel1 = select_blocks(q[:1], k[:1], grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")
    out, _ = bsa_forward_cuda(q, k, v, sel1, D**-0.5)
    sel2 = BlockSelection(sel1.indices.expand(2, -1, -1, -1).contiguous(), sel1.counts.expand(2, -1, -1).contiguous(),
                          sel1.grid_q, sel1.grid_k, sel1.chunk_q, sel1.chunk_k)
    ref, _, base, _ = _bsa_oracle(q, k, v, sel2, D**-0.5)
    assert_close(out, ref, base, name="batch-1 selection broadcast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bc", [1, 2])
@pytest.mark.parametrize("with_rope", [True, False])
def test_kv_cache_parity(impl, dtype, bc, with_rope):
    from longcat_kernels.ops.kv_cache_attn.cuda import attn_with_kv_cache_cuda
    from longcat_kernels.ops.rope.api import Rope3D, apply_rope_3d

    B, H, D = 2, 3, 128
    Hf, Wf, c, tn = 5, 7, 2, 3
    rope = Rope3D((c + tn, Hf, Wf), D, device=DEV) if with_rope else None
    Sc, Sn = c * Hf * Wf, tn * Hf * Wf
    q = _rand(B, H, Sn, D, dtype=dtype).transpose(1, 2)  # permuted strides
    k, v = (_rand(B, Sn, H, D, dtype=dtype) for _ in range(2))
    kc, vc = (_rand(bc, Sc, H, D, dtype=dtype) for _ in range(2))
    _poison(q)
    out = attn_with_kv_cache_cuda(q, k, v, kc, vc, rope, D**-0.5, None)
    qr = apply_rope_3d(q, rope, frame_offset=c) if with_rope else q
    kr = apply_rope_3d(k, rope, frame_offset=c) if with_rope else k
    k_all = torch.cat([kc.expand(B, -1, -1, -1), kr], 1)
    v_all = torch.cat([vc.expand(B, -1, -1, -1), v], 1)
    ref, _ = attention_oracle(qr, k_all, v_all, None, D**-0.5)
    assert_close(out, ref, attention_lowp(qr, k_all, v_all, None, D**-0.5), name=f"kv-cache [{impl}]")


def test_kv_cache_no_cache_and_odd_lengths(impl):
    from longcat_kernels.ops.kv_cache_attn.cuda import attn_with_kv_cache_cuda

    B, H, D, Sn = 1, 2, 64, 97
    q, k, v = (_rand(B, Sn, H, D, dtype=torch.bfloat16) for _ in range(3))
    out = attn_with_kv_cache_cuda(q, k, v, None, None, None, 0.1, None)
    ref, _ = attention_oracle(q, k, v, None, 0.1)
    assert_close(out, ref, attention_lowp(q, k, v, None, 0.1), name="no cache, seq 97")


@pytest.mark.parametrize("P", [0, 59, 100, 163])
def test_prefix_attn_parity(impl, P):
    from longcat_kernels.ops.kv_cache_attn.cuda import prefix_attn_cuda

    B, S, H, D = 2, 163, 2, 128
    q, k, v = (_rand(B, S, H, D, dtype=torch.bfloat16) for _ in range(3))
    _poison(q)
    out = prefix_attn_cuda(q, k, v, P, D**-0.5)
    mask = prefix_mask(S, P, DEV)
    ref, _ = attention_oracle(q, k, v, mask, D**-0.5)
    assert_close(out, ref, attention_lowp(q, k, v, mask, D**-0.5), name=f"prefix P={P}")


def test_block_sparse_over_cache_and_fresh(impl):
    from longcat_kernels.ops.kv_cache_attn.api import BlockSparseParams, attn_with_kv_cache
    from longcat_kernels.ops.rope.api import Rope3D

    B, H, D = 2, 2, 128
    Hf, Wf, c, tn = 8, 8, 4, 4
    rope = Rope3D((c + tn, Hf, Wf), D, device=DEV)
    Sc, Sn = c * Hf * Wf, tn * Hf * Wf
    q, k, v = (_rand(B, Sn, H, D, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (_rand(1, Sc, H, D, dtype=torch.bfloat16) for _ in range(2))
    # gating inside the op (selection=None): runs, right shape, no NaN
    out = attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=BlockSparseParams(sparsity=0.5),
                             backend="cuda")
    assert out.shape == q.shape and not out.isnan().any()
    # parity with an explicit selection over the rotated [cache; fresh] keys
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.rope.api import apply_rope_3d

    qr, kr = apply_rope_3d(q, rope, frame_offset=c), apply_rope_3d(k, rope, frame_offset=c)
    k_all = torch.cat([kc.expand(B, -1, -1, -1), kr], 1)
    v_all = torch.cat([vc.expand(B, -1, -1, -1), v], 1)
    sel = select_blocks(qr, k_all, grid_q=(tn, Hf, Wf), grid_k=(c + tn, Hf, Wf), sparsity=0.5, backend="torch")
    out = attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=BlockSparseParams(selection=sel),
                             backend="cuda")
    mask = bsa_token_mask(sel.to_mask(), sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    ref, _ = attention_oracle(qr, k_all, v_all, mask, D**-0.5)
    assert_close(out, ref, attention_lowp(qr, k_all, v_all, mask, D**-0.5), name="BSA over [cache; fresh]")


def test_public_api_dispatch_and_refusals():
    from longcat_kernels._backend import BackendUnavailableError, available_backends
    from longcat_kernels.ops.block_sparse_attn.api import block_sparse_attn, select_blocks

    assert available_backends("block_sparse_attn", "cuda")["cuda"] is None
    grid = (4, 8, 8)
    q, k, v = (_rand(1, 256, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    out = block_sparse_attn(q, k, v, grid_q=grid, sparsity=0.5, backend="cuda")
    assert out.shape == q.shape and not out.isnan().any()
    sel = select_blocks(q, k, grid_q=grid, sparsity=0.5, backend="torch")
    with pytest.raises(BackendUnavailableError, match="float32"):
        block_sparse_attn(q.float(), k.float(), v.float(), selection=sel, backend="cuda")
    qg = q.clone().requires_grad_(True)
    with pytest.raises(BackendUnavailableError, match="forward only"):
        block_sparse_attn(qg, k, v, selection=sel, backend="cuda")
    q96 = _rand(1, 256, 2, 96, dtype=torch.bfloat16)
    sel96 = select_blocks(q96, q96, grid_q=grid, sparsity=0.5, backend="torch")
    with pytest.raises(BackendUnavailableError, match="head_dim"):
        block_sparse_attn(q96, q96, q96, selection=sel96, backend="cuda")


def test_torch_check_messages():
    from longcat_kernels.ops.block_sparse_attn.cuda import ops

    q = _rand(1, 64, 2, 128, dtype=torch.bfloat16)
    k = _rand(1, 64, 2, 128, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="cast all inputs to one dtype"):
        ops().kv_cache_attn_fwd_cuda(q, k, k, None, None, *[None] * 6, 0, 0, 0.1, "sm80")
    with pytest.raises(RuntimeError, match="grid_q"):
        idx = torch.zeros(1, 2, 1, 1, dtype=torch.int32, device=DEV)
        cnt = torch.ones(1, 2, 1, dtype=torch.int32, device=DEV)
        ops().bsa_fwd_cuda(q, q, q, None, None, idx, cnt, [1, 4, 8], [1, 8, 8], [4, 4, 4], [4, 4, 4], 0.1, "sm80")
    # the kernel family is named by the caller: an unknown one, or one that cannot run the call, raises
    with pytest.raises(RuntimeError, match="kernel must be 'sm90_ws', 'sm90' or 'sm80'"):
        ops().kv_cache_attn_fwd_cuda(q, q, q, None, None, *[None] * 6, 0, 0, 0.1, "sm90ws")
    q64 = _rand(1, 64, 2, 64, dtype=torch.bfloat16)
    if "sm90_ws" in _impls():
        with pytest.raises(RuntimeError, match="kernel 'sm90_ws' cannot run this call"):
            ops().kv_cache_attn_fwd_cuda(q64, q64, q64, None, None, *[None] * 6, 0, 0, 0.1, "sm90_ws")
    if "sm90" not in _impls():
        with pytest.raises(RuntimeError, match="needs a compute capability 9.x GPU"):
            ops().kv_cache_attn_fwd_cuda(q64, q64, q64, None, None, *[None] * 6, 0, 0, 0.1, "sm90")


def test_opcheck_registered_ops():
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.block_sparse_attn.cuda import ops, selection_args
    from longcat_kernels.ops.rope.api import Rope3D

    grid = (4, 8, 8)
    q = _rand(1, 2, 256, 64, dtype=torch.bfloat16).transpose(1, 2)  # permuted strides
    k, v = (_rand(1, 256, 2, 64, dtype=torch.bfloat16) for _ in range(2))
    sel = select_blocks(q, k, grid_q=grid, sparsity=0.5, backend="torch")
    o = ops()
    fam = _family64()
    torch.library.opcheck(o.bsa_fwd_cuda.default, (q, k, v, None, None, *selection_args(sel), 0.125, fam))
    torch.library.opcheck(o.kv_cache_attn_fwd_cuda.default,
                          (q, k, v, k[:, :64], v[:, :64], *[None] * 6, 0, 0, 0.125, fam))
    torch.library.opcheck(o.prefix_attn_fwd_cuda.default, (q, k, v, 100, 0.125, fam))
    # return_lse=False: an empty lse (the fakes must agree on its shape)
    torch.library.opcheck(o.bsa_fwd_cuda.default, (q, k, v, None, None, *selection_args(sel), 0.125, fam, False))
    torch.library.opcheck(o.kv_cache_attn_fwd_cuda.default,
                          (q, k, v, k[:, :64], v[:, :64], *[None] * 6, 0, 0, 0.125, fam, False))
    torch.library.opcheck(o.prefix_attn_fwd_cuda.default, (q, k, v, 100, 0.125, fam, False))
    rope = Rope3D((4, 8, 8), 64, device=DEV)
    torch.library.opcheck(o.rope3d_cuda.default,
                          (k, rope.cos_t, rope.sin_t, rope.cos_h, rope.sin_h, rope.cos_w, rope.sin_w, 8, 8, 0))


def test_torch_compile_fullgraph():
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda
    from longcat_kernels.ops.kv_cache_attn.cuda import attn_with_kv_cache_cuda

    grid = (4, 8, 8)
    q, k, v = (_rand(1, 256, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    sel = select_blocks(q, k, grid_q=grid, sparsity=0.5, backend="torch")
    bsa_forward_cuda(q, k, v, sel, 0.1)  # eager first: loads the extension and registers the fakes
    f = torch.compile(lambda a, b, c: bsa_forward_cuda(a, b, c, sel, 0.1)[0] * 2, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), bsa_forward_cuda(q, k, v, sel, 0.1)[0] * 2)
    g = torch.compile(lambda a, b, c: attn_with_kv_cache_cuda(a, b, c, b[:, :64], c[:, :64], None, 0.1, None),
                      fullgraph=True)
    torch.testing.assert_close(g(q, k, v), attn_with_kv_cache_cuda(q, k, v, k[:, :64], v[:, :64], None, 0.1, None))
    h = torch.compile(lambda a, b, c: attn_with_kv_cache_cuda(a, b, c, None, None, None, 0.1, None, True), fullgraph=True)
    (ho, hl), (eo, el) = h(q, k, v), attn_with_kv_cache_cuda(q, k, v, None, None, None, 0.1, None, True)
    torch.testing.assert_close(ho, eo)
    torch.testing.assert_close(hl, el)


def test_gqa_refused_with_reason():
    """csrc kernels take equal head counts: backend='cuda' refuses GQA/MQA with the reason, auto runs Triton."""
    from longcat_kernels import BackendUnavailableError, attn_with_kv_cache, prefix_attn
    from longcat_kernels.dispatch import last_choice

    q = _rand(1, 128, 4, 128, dtype=torch.bfloat16)
    k, v = (_rand(1, 128, 2, 128, dtype=torch.bfloat16) for _ in range(2))
    with pytest.raises(BackendUnavailableError, match="GQA"):
        attn_with_kv_cache(q, k, v, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="GQA"):
        prefix_attn(q, k, v, 64, backend="cuda")
    attn_with_kv_cache(q, k, v)
    assert last_choice("attn_with_kv_cache").impl == "triton_fused"


# ---------------------------------------------------------------------------------------------
# warp-specialised dense kernel (sm90ws): what is new there (TMA maps, partial tiles, variants)
# ---------------------------------------------------------------------------------------------
def _ws_or_skip(monkeypatch, variant=None):
    # one variant is compiled now (1: overlap, 2 stages); the others' numbers are in csrc/NOTES.md
    _restrict(monkeypatch, "sm90_ws")


def _dense_check(q, k, v, kc, vc, scale, name):
    from longcat_kernels.ops.block_sparse_attn.cuda import ops

    B = q.shape[0]
    _poison(q)
    out, lse = ops().kv_cache_attn_fwd_cuda(q, k, v, kc, vc, *[None] * 6, 0, 0, scale, "sm90_ws")
    if kc is None:
        k_all, v_all = k, v
    else:
        k_all = torch.cat([kc.expand(B, -1, -1, -1), k], 1)
        v_all = torch.cat([vc.expand(B, -1, -1, -1), v], 1)
    ref, ref_lse = attention_oracle(q, k_all, v_all, None, scale)
    assert not out.isnan().any() and not lse.isnan().any(), name
    assert_close(out, ref, attention_lowp(q, k_all, v_all, None, scale), name=name)
    assert_close(lse, ref_lse.float(), floor=1e-5, name=name + " lse")


@pytest.mark.parametrize("variant", [1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bc", [1, 2])
def test_sm90ws_partial_tiles_broadcast(monkeypatch, variant, dtype, bc):
    """Cache 200 (last cache tile 72 of 128 keys), fresh 300 (Sq not a multiple of 128)."""
    _ws_or_skip(monkeypatch, variant)
    B, H, D, Sc, Sn = 2, 3, 128, 200, 300
    q, k, v = (_rand(B, Sn, H, D, dtype=dtype) for _ in range(3))
    kc, vc = (_rand(bc, Sc, H, D, dtype=dtype) for _ in range(2))
    _dense_check(q, k, v, kc, vc, D**-0.5, f"sm90ws v{variant} {dtype} Bc={bc}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90ws_fused_qkv_views_and_odd_sizes(monkeypatch, dtype):
    """q/k/v as slices of one fused [B, S, 3, H, D] projection (seq stride 3*H*D), a BHSD cache
    viewed as BSHD, tiny and odd lengths."""
    _ws_or_skip(monkeypatch, 2)
    B, H, D = 2, 4, 128
    for Sn, Sc in ((257, 129), (5, 1), (128, 128), (1, 300)):
        qkv = _rand(B, Sn, 3, H, D, dtype=dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        kc, vc = (_rand(1, H, Sc, D, dtype=dtype).transpose(1, 2) for _ in range(2))
        _dense_check(q, k, v, kc, vc, 0.07, f"fused qkv Sn={Sn} Sc={Sc}")


def test_sm90ws_empty_cache_and_no_cache(monkeypatch):
    _ws_or_skip(monkeypatch, 2)
    B, H, D, Sn = 2, 2, 128, 190
    q, k, v = (_rand(B, Sn, H, D, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (_rand(1, 0, H, D, dtype=torch.bfloat16) for _ in range(2))
    _dense_check(q, k, v, kc, vc, D**-0.5, "empty seg0 (cache of 0 tokens)")
    _dense_check(q, k, v, None, None, D**-0.5, "no cache (seg1 empty)")


def test_sm90ws_large_scores_and_prefix(monkeypatch):
    """Large logits (the running max moves a lot: O rescaling) and the two-launch prefix op."""
    from longcat_kernels.ops.kv_cache_attn.cuda import prefix_attn_cuda

    _ws_or_skip(monkeypatch, 2)
    B, H, D, Sn, Sc = 1, 2, 128, 260, 390
    q, k, v = (_rand(B, Sn, H, D, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (_rand(1, Sc, H, D, dtype=torch.bfloat16) for _ in range(2))
    kc = kc * torch.linspace(0.1, 4.0, Sc, device=DEV).view(1, Sc, 1, 1).to(kc.dtype)
    _dense_check(q, k, v, kc, vc, 0.5, "large scores")
    S, P = 301, 130
    q, k, v = (_rand(B, S, H, D, dtype=torch.bfloat16) for _ in range(3))
    _poison(q)
    out = prefix_attn_cuda(q, k, v, P, D**-0.5)
    mask = prefix_mask(S, P, DEV)
    ref, _ = attention_oracle(q, k, v, mask, D**-0.5)
    assert_close(out, ref, attention_lowp(q, k, v, mask, D**-0.5), name="sm90ws prefix")


def test_auto_routes_dense_kv_cache_to_sm90ws(monkeypatch):
    """backend="auto": cached-KV attention runs csrc_sm90_ws where it applies (D 128, bf16/fp16,
    Hopper with the extension), the Triton prologue + cuDNN route otherwise, and the fused Triton
    kernel for block-sparse calls; what ran is what the dispatcher recorded."""
    from longcat_kernels.dispatch import record_choices
    from longcat_kernels.ops.kv_cache_attn.api import BlockSparseParams, attn_with_kv_cache

    monkeypatch.delenv("LONGCAT_KERNELS_BACKEND", raising=False)
    ws = "sm90_ws" in _impls()
    q, k, v = (_rand(1, 256, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    q64 = _rand(1, 256, 2, 64, dtype=torch.bfloat16)
    with record_choices() as got:
        attn_with_kv_cache(q, k, v)
        attn_with_kv_cache(q64, q64, q64)
        out = attn_with_kv_cache(q, k, v, block_sparse=BlockSparseParams(sparsity=0.5, frame_hw=(8, 8)))
    impls = [c.impl for c in got if c.op == "attn_with_kv_cache"]
    assert impls == ["csrc_sm90_ws" if ws else "triton_prologue_cudnn", "triton_prologue_cudnn", "triton_fused"]
    assert out.shape == q.shape and not out.isnan().any()
    _restrict(monkeypatch, "sm90")  # an extension without the warp-specialised kernels
    with record_choices() as got:
        attn_with_kv_cache(q, k, v)
    assert got[-1].impl == "triton_prologue_cudnn"


# ---------------------------------------------------------------------------------------------
# warp-specialised block-sparse kernel (sm90ws BSA, csrc/bsa_fwd_sm90_ws.cu): one TMA box per
# 3D chunk of 64 tokens, D 128; partial edge blocks, odd block counts, strided views, variants
# ---------------------------------------------------------------------------------------------
def _bsa_ws_or_skip(monkeypatch, variant=None):
    # one variant is compiled now (1: overlap, 2 stages); the others' numbers are in csrc/NOTES.md
    _restrict(monkeypatch, "sm90_ws")


def _bsa_check(q, k, v, sel, scale, name):
    from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda

    _poison(q)
    out, lse = bsa_forward_cuda(q, k, v, sel, scale)
    ref, ref_lse, base, _ = _bsa_oracle(q, k, v, sel, scale)
    assert not out.isnan().any() and not lse.isnan().any(), name
    assert_close(out, ref, base, name=name)
    assert_close(lse, ref_lse.float(), floor=1e-5, name=name + " lse")


@pytest.mark.parametrize("variant", [1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "grid,chunk",
    [((8, 8, 12), (4, 4, 4)), ((5, 6, 10), (4, 4, 4)), ((9, 9, 9), (4, 4, 4)), ((6, 5, 19), (2, 4, 8)),
     ((3, 10, 33), (1, 4, 16))],
)
def test_sm90ws_bsa_parity(monkeypatch, variant, dtype, grid, chunk):
    """Divisible and partial grids, an odd number of query blocks (9x9x9: 27), non-cubic chunks."""
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks

    _bsa_ws_or_skip(monkeypatch, variant)
    B, H, D = 2, 3, 128
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (_rand(B, S, H, D, dtype=dtype) for _ in range(3))
    sel = select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=random.choice([0.25, 0.5, 0.75]), backend="torch")
    _bsa_check(q, k, v, sel, D**-0.5, f"sm90ws bsa v{variant} {dtype} grid {grid} chunk {chunk}")


@pytest.mark.parametrize("variant", [1])
def test_sm90ws_bsa_empty_shuffled_fused_views(monkeypatch, variant):
    """Fused [B, S, 3, H, D] views, a batch-1 selection broadcast, selection lists in shuffled
    order, empty lists (out 0, lse -inf), large logits (O rescaling)."""
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection

    _bsa_ws_or_skip(monkeypatch, variant)
    grid, chunk, B, H, D = (5, 6, 10), (4, 4, 4), 2, 2, 128
    S = 300
    qkv = _rand(B, S, 3, H, D, dtype=torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    k = k * torch.linspace(0.1, 4.0, S, device=DEV).view(1, S, 1, 1).to(k.dtype)
    sel = select_blocks(q[:1], k[:1], grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")
    idx = sel.indices.clone()
    cnt = sel.counts.clone()
    for hh in range(H):
        for qb in range(idx.shape[2]):
            n = int(cnt[0, hh, qb])
            idx[0, hh, qb, :n] = idx[0, hh, qb, :n][torch.randperm(n, device=DEV)]
    cnt[0, 1, 2] = 0
    sel = BlockSelection(idx, cnt, sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda

    _poison(q)
    out, lse = bsa_forward_cuda(q, k, v, sel, 0.3)
    sel2 = BlockSelection(idx.expand(B, -1, -1, -1).contiguous(), cnt.expand(B, -1, -1).contiguous(),
                          sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    ref, ref_lse, base, mask = _bsa_oracle(q, k, v, sel2, 0.3)
    assert not out.isnan().any()
    empty_rows = ~mask.any(-1)  # [B or 1, H, Sq]
    assert bool(empty_rows.any())
    assert torch.all(torch.isneginf(lse[empty_rows.expand_as(lse)]))
    assert_close(out, ref, base, name=f"sm90ws bsa fused views v{variant}")
    assert_close(lse[~empty_rows.expand_as(lse)], ref_lse.float()[~empty_rows.expand_as(lse)], floor=1e-5,
                 name="lse")


def test_auto_routes_bsa_forward_to_sm90ws(monkeypatch):
    """backend="auto": block_sparse_attn runs csrc_sm90_ws where it applies (Hopper, D 128,
    bf16/fp16, 64-token blocks, no gradient needed); triton otherwise (and gradients flow)."""
    from longcat_kernels.dispatch import record_choices
    from longcat_kernels.ops.block_sparse_attn.api import block_sparse_attn, select_blocks

    monkeypatch.delenv("LONGCAT_KERNELS_BACKEND", raising=False)
    ws = "sm90_ws" in _impls()
    grid = (4, 8, 8)
    q, k, v = (_rand(1, 256, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    sel = select_blocks(q, k, grid_q=grid, chunk_q=(4, 4, 4), sparsity=0.5, backend="torch")
    sel8 = select_blocks(q, k, grid_q=grid, chunk_q=(4, 4, 8), sparsity=0.5, backend="torch")
    with record_choices() as got:
        out = block_sparse_attn(q, k, v, selection=sel)
        block_sparse_attn(q, k, v, selection=sel8)
        qg = q.clone().requires_grad_(True)
        out_g = block_sparse_attn(qg, k, v, selection=sel)
    impls = [c.impl for c in got if c.op == "block_sparse_attn"]
    assert impls == ["csrc_sm90_ws" if ws else "triton", "triton", "triton"]
    ref, _, base, _ = _bsa_oracle(q, k, v, sel, 128**-0.5)
    assert not out.isnan().any()
    assert_close(out, ref, base, name="auto bsa")
    out_g.float().sum().backward()
    assert qg.grad is not None and not qg.grad.isnan().any()
