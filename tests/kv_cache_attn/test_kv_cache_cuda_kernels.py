"""Cached-KV and prefix attention in the compiled extension (backend "cuda"): every csrc kernel
family (fixture ``impl``: sm90_ws / sm90 / sm80, see ``tests/helpers.py``) against the fp64 oracle,
block-sparse over [cache; fresh], the warp-specialised dense kernel (sm90ws: partial tiles, fused
views, empty cache, large scores) and auto routing to it. Marked ``ext``. Outputs are checked after
``poison_allocator`` (a NaN block in the caching allocator: ``at::empty`` is not NaN-filled by conftest).
"""

from __future__ import annotations

import pytest
import torch
from helpers import bsa_oracle, csrc_impls, impl, poison_allocator, randn, restrict_family  # noqa: F401 (impl: fixture)

from longcat_kernels.testing.oracle import attention_lowp, attention_oracle, bsa_token_mask, prefix_mask
from longcat_kernels.testing.tolerance import assert_close

pytestmark = pytest.mark.ext

DEV = "cuda"


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
    q = randn(B, H, Sn, D, dtype=dtype).transpose(1, 2)  # permuted strides
    k, v = (randn(B, Sn, H, D, dtype=dtype) for _ in range(2))
    kc, vc = (randn(bc, Sc, H, D, dtype=dtype) for _ in range(2))
    poison_allocator(q)
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
    q, k, v = (randn(B, Sn, H, D, dtype=torch.bfloat16) for _ in range(3))
    out = attn_with_kv_cache_cuda(q, k, v, None, None, None, 0.1, None)
    ref, _ = attention_oracle(q, k, v, None, 0.1)
    assert_close(out, ref, attention_lowp(q, k, v, None, 0.1), name="no cache, seq 97")


@pytest.mark.parametrize("P", [0, 59, 100, 163])
def test_prefix_attn_parity(impl, P):
    from longcat_kernels.ops.kv_cache_attn.cuda import prefix_attn_cuda

    B, S, H, D = 2, 163, 2, 128
    q, k, v = (randn(B, S, H, D, dtype=torch.bfloat16) for _ in range(3))
    poison_allocator(q)
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
    q, k, v = (randn(B, Sn, H, D, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (randn(1, Sc, H, D, dtype=torch.bfloat16) for _ in range(2))
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


# ---------------------------------------------------------------------------------------------
# warp-specialised dense kernel (sm90ws): what is new there (TMA maps, partial tiles, variants)
# ---------------------------------------------------------------------------------------------
def _ws_or_skip(monkeypatch, variant=None):
    # one variant is compiled now (1: overlap, 2 stages); the others' numbers are in csrc/NOTES.md
    restrict_family(monkeypatch, "sm90_ws")


def _dense_check(q, k, v, kc, vc, scale, name):
    from longcat_kernels.ops.block_sparse_attn.cuda import ops

    B = q.shape[0]
    poison_allocator(q)
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
    q, k, v = (randn(B, Sn, H, D, dtype=dtype) for _ in range(3))
    kc, vc = (randn(bc, Sc, H, D, dtype=dtype) for _ in range(2))
    _dense_check(q, k, v, kc, vc, D**-0.5, f"sm90ws v{variant} {dtype} Bc={bc}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90ws_fused_qkv_views_and_odd_sizes(monkeypatch, dtype):
    """q/k/v as slices of one fused [B, S, 3, H, D] projection (seq stride 3*H*D), a BHSD cache
    viewed as BSHD, tiny and odd lengths."""
    _ws_or_skip(monkeypatch, 2)
    B, H, D = 2, 4, 128
    for Sn, Sc in ((257, 129), (5, 1), (128, 128), (1, 300)):
        qkv = randn(B, Sn, 3, H, D, dtype=dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        kc, vc = (randn(1, H, Sc, D, dtype=dtype).transpose(1, 2) for _ in range(2))
        _dense_check(q, k, v, kc, vc, 0.07, f"fused qkv Sn={Sn} Sc={Sc}")


def test_sm90ws_empty_cache_and_no_cache(monkeypatch):
    _ws_or_skip(monkeypatch, 2)
    B, H, D, Sn = 2, 2, 128, 190
    q, k, v = (randn(B, Sn, H, D, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (randn(1, 0, H, D, dtype=torch.bfloat16) for _ in range(2))
    _dense_check(q, k, v, kc, vc, D**-0.5, "empty seg0 (cache of 0 tokens)")
    _dense_check(q, k, v, None, None, D**-0.5, "no cache (seg1 empty)")


def test_sm90ws_large_scores_and_prefix(monkeypatch):
    """Large logits (the running max moves a lot: O rescaling) and the two-launch prefix op."""
    from longcat_kernels.ops.kv_cache_attn.cuda import prefix_attn_cuda

    _ws_or_skip(monkeypatch, 2)
    B, H, D, Sn, Sc = 1, 2, 128, 260, 390
    q, k, v = (randn(B, Sn, H, D, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (randn(1, Sc, H, D, dtype=torch.bfloat16) for _ in range(2))
    kc = kc * torch.linspace(0.1, 4.0, Sc, device=DEV).view(1, Sc, 1, 1).to(kc.dtype)
    _dense_check(q, k, v, kc, vc, 0.5, "large scores")
    S, P = 301, 130
    q, k, v = (randn(B, S, H, D, dtype=torch.bfloat16) for _ in range(3))
    poison_allocator(q)
    out = prefix_attn_cuda(q, k, v, P, D**-0.5)
    mask = prefix_mask(S, P, DEV)
    ref, _ = attention_oracle(q, k, v, mask, D**-0.5)
    assert_close(out, ref, attention_lowp(q, k, v, mask, D**-0.5), name="sm90ws prefix")


def test_auto_routes_dense_kv_cache_to_sm90ws(monkeypatch):
    """backend="auto": cached-KV attention runs csrc_sm90_ws where it applies (D 128, bf16/fp16,
    Hopper with the extension), the Triton prologue + cuDNN route otherwise; block-sparse calls with
    64-token blocks run the warp-specialised BSA kernel where it applies, the fused Triton kernel
    otherwise; what ran is what the dispatcher recorded."""
    from longcat_kernels.dispatch import record_choices
    from longcat_kernels.ops.kv_cache_attn.api import BlockSparseParams, attn_with_kv_cache

    monkeypatch.delenv("LONGCAT_KERNELS_BACKEND", raising=False)
    ws = "sm90_ws" in csrc_impls()
    q, k, v = (randn(1, 256, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    q64 = randn(1, 256, 2, 64, dtype=torch.bfloat16)
    with record_choices() as got:
        attn_with_kv_cache(q, k, v)
        attn_with_kv_cache(q64, q64, q64)
        out = attn_with_kv_cache(q, k, v, block_sparse=BlockSparseParams(sparsity=0.5, frame_hw=(8, 8)))
    impls = [c.impl for c in got if c.op == "attn_with_kv_cache"]
    assert impls == ["csrc_sm90_ws" if ws else "triton_prologue_cudnn", "triton_prologue_cudnn",
                     "csrc_sm90_ws" if ws else "triton_fused"]
    assert out.shape == q.shape and not out.isnan().any()
    restrict_family(monkeypatch, "sm90")  # an extension without the warp-specialised kernels
    with record_choices() as got:
        attn_with_kv_cache(q, k, v)
    assert got[-1].impl == "triton_prologue_cudnn"

