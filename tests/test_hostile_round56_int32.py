"""Hostile round 56: 32-bit index overflow in the kernels at the largest shapes users run.

Realistic worst case (SPEC 10/11): the 720p refinement of a 97-frame stage-1 video has 52 latent
frames x 3520 = 183,040 tokens; LongCat's DiT passes ``v`` as a view of its fused qkv projection
(row stride 3 * 32 * 128 = 12,288 elements, batch stride S * 12,288), so with the CFG batch of 2
the batch offset alone is 2.2e9 and ``row * 12288`` passes 2**31 from row 174,763 on (diffusers
Wan 14B: ``to_qkv(...).chunk(3)``, row stride 15,360, from row 139,811). The Triton cached-KV
kernel computed ``row * stride`` of its key tiles in int32 and read far off the tensor there.

The GPU tests below rebuild that layout small: q, k, v are views of one ``[2, 4096, 589824]`` bf16
buffer (9.7 GB), so rows of a 3840-key segment pass 2**31 elements (3840 * 589824 = 2.26e9) and the
batch stride is 2.4e9, and compare every kernel family with the torch reference on contiguous
copies. Markers ``triton_gpu`` / ``ext`` skip them on CPU; the ``triton_interpret`` test pins the
same strided views at a small size (partial tiles, two segments) on CPU.
"""
from __future__ import annotations

import gc

import pytest
import torch
from helpers import bsa_oracle, restrict_family  # noqa: F401

import longcat_kernels as lk
from longcat_kernels import BlockSparseParams, Rope3D, attn_with_kv_cache, block_sparse_attn, select_blocks
from longcat_kernels.testing import assert_close
from longcat_kernels.testing.oracle import attention_lowp, attention_oracle

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = pytest.param("triton", marks=pytest.mark.triton_gpu)
CUDA = pytest.param("cuda", marks=pytest.mark.ext)

# 16 x 16 x 16 grid (4096 tokens, 256 a frame), 2 heads of 128 (the sm90_ws kernels need 128)
GRID, H, D, B = (16, 16, 16), 2, 128, 2
S = GRID[0] * GRID[1] * GRID[2]
HW = GRID[1] * GRID[2]
ROW = 2 ** 19 + 2 ** 16  # elements between rows: (S - HW) * ROW = 2.26e9 > 2**31, a multiple of 64
assert (S - HW) * ROW > 2 ** 31 and S * ROW > 2 ** 31


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _fused(n=3, dtype=torch.bfloat16, seed=0):
    """n views ``[B, S, H, D]`` of one ``[B, S, ROW]`` buffer (columns i*H*D..): a fused-qkv layout whose
    rows and batches sit past 2**31 elements, filled with fresh random values (the rest is never read)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    buf = torch.empty((B, S, ROW), dtype=dtype, device=DEV)
    views = []
    for i in range(n):
        x = buf[:, :, i * H * D:(i + 1) * H * D].unflatten(-1, (H, D))
        x.copy_(torch.randn((B, S, H, D), generator=g, device=DEV, dtype=torch.float32).to(dtype))
        views.append(x)
    assert views[-1].stride(0) > 2 ** 31
    return buf, views


def _check(out, exp, base, name):
    assert not out.isnan().any(), name
    assert_close(out, exp, base, name=name)


# ------------------------------------------------------------------------------ cached-KV attention
@pytest.mark.parametrize("backend", [TRITON, CUDA])
@pytest.mark.parametrize("mode", ["dense", "rope", "block_sparse"])
def test_kv_cache_attn_over_fused_qkv_views_past_2_31(backend, mode):
    """The DiT's cache-off call ``attn_with_kv_cache(q[:, P:], k[:, P:], v[:, P:], k[:, :P], v[:, :P])``
    on fused-qkv views whose key rows pass 2**31 elements. Before the fix the Triton kernel's
    ``row * stride`` wrapped in int32 past row 3641 (an illegal address or another row's values)."""
    buf, (q, k, v) = _fused(seed=1)
    # one cond frame (segment 2 rows pass 2**31); block-sparse: four, a key-block boundary (the sm90_ws split)
    c = 4 if mode == "block_sparse" else 1
    P = c * HW
    rope = Rope3D(GRID, D, device=DEV) if mode == "rope" else None
    sel = bs = None
    if mode == "block_sparse":
        # one selection for the kernel and the oracle (noisy queries against [cond; noisy] keys)
        sel = select_blocks(q[:, P:], k, grid_q=(GRID[0] - c,) + GRID[1:], grid_k=GRID, sparsity=0.75,
                            backend="torch")
        bs = BlockSparseParams(sparsity=None, selection=sel)
    out, lse = attn_with_kv_cache(q[:, P:], k[:, P:], v[:, P:], k[:, :P], v[:, :P], rope=rope, block_sparse=bs,
                                  backend=backend, return_lse=True)
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    del buf, q, k, v
    _free()
    qr, kr = qc[:, P:], kc
    if rope is not None:
        qr, kr = lk.apply_rope_3d(qr, rope, c), torch.cat([kc[:, :P], lk.apply_rope_3d(kc[:, P:], rope, c)], 1)
    if sel is None:
        exp, exp_lse = attention_oracle(qr, kr, vc)
        base = attention_lowp(qr, kr, vc)
    else:
        exp, exp_lse, base, _ = bsa_oracle(qr, kr, vc, sel, D ** -0.5)
    _check(out, exp, base, f"{backend} {mode}")
    assert not lse.isnan().any()
    assert_close(lse, exp_lse.float(), floor=1e-4, name=f"{backend} {mode} lse")


@pytest.mark.parametrize("backend", [TRITON, CUDA])
def test_prefix_attn_over_fused_qkv_views_past_2_31(backend):
    """The no-cache dense rule in one call (``prefix_attn``): segment 2 is the whole sequence after P."""
    buf, (q, k, v) = _fused(seed=2)
    P = HW
    out = lk.prefix_attn(q, k, v, P, backend=backend)
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    del buf, q, k, v
    _free()
    exp = lk.prefix_attn(qc.double(), kc.double(), vc.double(), P, backend="torch")
    base = lk.prefix_attn(qc, kc, vc, P, backend="torch")
    _check(out, exp, base, f"{backend} prefix_attn")


@pytest.mark.parametrize("family", ["sm90_ws", "sm90", "sm80"])
@pytest.mark.ext
def test_csrc_families_dense_and_sparse_over_views_past_2_31(monkeypatch, family):
    """Every csrc family (TMA maps, cp.async gathers) on the far views: dense and block-sparse."""
    restrict_family(monkeypatch, family)
    buf, (q, k, v) = _fused(seed=3)
    out_d = attn_with_kv_cache(q, k, v, backend="cuda")
    sel = select_blocks(q, k, grid_q=GRID, sparsity=0.75, backend="torch")
    out_s = block_sparse_attn(q, k, v, selection=sel, backend="cuda")
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    del buf, q, k, v
    _free()
    exp, _ = attention_oracle(qc, kc, vc)
    _check(out_d, exp, attention_lowp(qc, kc, vc), f"{family} dense")
    exp_s, _, base_s, _ = bsa_oracle(qc, kc, vc, sel, D ** -0.5)
    _check(out_s, exp_s, base_s, f"{family} block-sparse")


# ------------------------------------------------------------------------------ block-sparse attention
@pytest.mark.parametrize("backend", [TRITON, CUDA])
def test_block_sparse_attn_and_gating_over_views_past_2_31(backend):
    """Gating (pool + scores + top-k) and the forward on far views: the selection equals the one of
    contiguous copies, the output and lse match the oracle."""
    buf, (q, k, v) = _fused(seed=4)
    gate = "triton" if backend == "triton" else "auto"
    sel = select_blocks(q, k, grid_q=GRID, sparsity=0.75, backend=gate)
    out, lse = block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    del buf, q, k, v
    _free()
    sel_c = select_blocks(qc, kc, grid_q=GRID, sparsity=0.75, backend=gate)
    assert torch.equal(sel.counts, sel_c.counts) and torch.equal(sel.indices, sel_c.indices)
    exp, exp_lse, base, _ = bsa_oracle(qc, kc, vc, sel, D ** -0.5)
    _check(out, exp, base, f"{backend} bsa")
    assert not lse.isnan().any()
    assert_close(lse, exp_lse.float(), floor=1e-4, name=f"{backend} bsa lse")


@pytest.mark.triton_gpu
def test_block_sparse_backward_over_views_past_2_31():
    """The Triton backward kernels (preprocess, dk/dv over the transposed selection, dq) reading q, k, v,
    out and do from views past 2**31 elements, against autograd of the torch reference."""
    buf, (q, k, v, do) = _fused(n=4, seed=5)
    sel = select_blocks(q, k, grid_q=GRID, sparsity=0.75, backend="torch")
    scale = D ** -0.5
    out, lse = block_sparse_attn(q, k, v, selection=sel, backend="triton", return_lse=True)
    o_far = buf[:, :, 4 * H * D:5 * H * D].unflatten(-1, (H, D))  # out at a far address too
    o_far.copy_(out)
    g = sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k
    dq, dk, dv = torch.ops.longcat_kernels.bsa_bwd(do, q, k, v, o_far, lse, sel.indices, sel.counts,
                                                   *(list(x) for x in g), scale, False)
    qc, kc, vc, doc = (x.contiguous() for x in (q, k, v, do))
    del buf, q, k, v, do, o_far
    _free()

    def grads(dtype):
        xs = [x.to(dtype).requires_grad_() for x in (qc, kc, vc)]
        block_sparse_attn(*xs, selection=sel, backend="torch").backward(doc.to(dtype))
        return [x.grad for x in xs]

    for name, got, exp, base in zip(("dq", "dk", "dv"), (dq, dk, dv), grads(torch.float64), grads(torch.bfloat16)):
        assert not got.isnan().any(), name
        assert_close(got, exp, base, factor=3.0, name=name)


# ------------------------------------------------------------------------------ rope / qk-norm prologue
@pytest.mark.triton_gpu
@pytest.mark.parametrize("wan", [False, True])
def test_qk_norm_rope_over_views_past_2_31(wan):
    """The Triton prologue (per-head RMSNorm = LongCat, all-heads RMSNorm = Wan) on far views."""
    buf, (q, k) = _fused(n=2, seed=6)
    rope = Rope3D(GRID, D, device=DEV)
    n = H * D if wan else D
    wq, wk = (torch.rand(n, device=DEV, dtype=torch.bfloat16) + 0.5 for _ in range(2))
    oq, ok = lk.qk_norm_rope(q, k, wq, wk, rope, backend="triton")
    qc, kc = q.contiguous(), k.contiguous()
    del buf, q, k
    _free()
    eq, ek = lk.qk_norm_rope(qc, kc, wq, wk, rope, backend="torch")
    for got, exp in ((oq, eq), (ok, ek)):
        assert not got.isnan().any()
        assert (got.float() - exp.float()).abs().max().item() <= 0.02 * exp.float().abs().max().item()


# ------------------------------------------------------------------------------ fp8 rows, cuDNN merge
@pytest.mark.triton_gpu
def test_fp8_quantize_rows_over_a_view_past_2_31():
    buf, (x,) = _fused(n=1, seed=7)
    x = x.flatten(-2)  # [B, S, H*D] rows ROW apart
    qt, st = lk.fp8_quantize_rows(x, backend="triton")
    xc = x.contiguous()
    del buf, x
    _free()
    qr, sr = lk.fp8_quantize_rows(xc, backend="torch")
    assert not st.isnan().any()
    torch.testing.assert_close(st, sr, rtol=2e-6, atol=0)

    def codes(t):  # e4m3 codes as signed steps from zero (+0 and -0 alike)
        b = t.view(torch.uint8).to(torch.int16)
        return torch.where(b >= 128, -(b - 128), b)

    assert int((codes(qt) - codes(qr)).abs().max()) == 0


@pytest.mark.triton_gpu
def test_merge_partial_attention_over_views_past_2_31():
    from longcat_kernels.ops.kv_cache_attn.cudnn import merge_partial_attention

    buf, (o1, o2) = _fused(n=2, seed=8)
    l1, l2 = (torch.randn(B, H, S, device=DEV) for _ in range(2))
    out = merge_partial_attention(o1, l1, o2, l2)
    a, b = o1.float(), o2.float()
    del buf, o1, o2
    _free()
    lse = torch.logaddexp(l1, l2).transpose(1, 2)[..., None]
    exp = a * torch.exp(l1.transpose(1, 2)[..., None] - lse) + b * torch.exp(l2.transpose(1, 2)[..., None] - lse)
    assert not out.isnan().any()
    assert_close(out.float(), exp, floor=1e-2, name="merge")


# ------------------------------------------------------------------------------ CPU: the same layout, small
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_cache_triton_tiles_of_fused_qkv_views_with_partial_tiles(dtype):
    """The key-tile addressing (tile base in int64 + row in tile) on fused-qkv views, two segments,
    partial tiles in both (the interpreter runs 16-row tiles), a batch-1 cache broadcast, lse."""
    g = torch.Generator().manual_seed(56)
    Bs, Hs, Ds, Ss, P = 2, 2, 16, 45, 19
    qkv = torch.randn(Bs, Ss, 3 * Hs * Ds + 8, generator=g).to(dtype)
    q, k, v = (qkv[..., i * Hs * Ds:(i + 1) * Hs * Ds].unflatten(-1, (Hs, Ds)) for i in range(3))
    out, lse = attn_with_kv_cache(q[:, P:], k[:, P:], v[:, P:], k[:1, :P], v[:1, :P], backend="triton",
                                  return_lse=True)
    K = torch.cat([k[:1, :P].expand(Bs, -1, -1, -1), k[:, P:]], 1)
    V = torch.cat([v[:1, :P].expand(Bs, -1, -1, -1), v[:, P:]], 1)
    exp, exp_lse = attention_oracle(q[:, P:], K, V)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close(out, exp, attention_lowp(q[:, P:], K, V))
    assert_close(lse, exp_lse.float(), floor=1e-5, name="lse")
    # prefix_attn: rows below P see the prefix only
    out_p = lk.prefix_attn(q, k, v, P, backend="triton")
    exp_p = lk.prefix_attn(q.double(), k.double(), v.double(), P, backend="torch")
    assert not out_p.isnan().any()
    assert_close(out_p, exp_p, lk.prefix_attn(q, k, v, P, backend="torch"))
