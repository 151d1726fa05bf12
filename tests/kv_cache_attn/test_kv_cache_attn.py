"""attn_with_kv_cache / prefix_attn against the explicit formulations and the fp64 oracle.

Properties every backend must have (cache == explicit [cache; fresh] concatenation, prefix ==
the oracle's prefix mask, prefix == two calls == a cache split) are one test parameterised over
``backend`` (``torch``; ``triton``: the CPU interpreter without CUDA on the small cases, every case
on a GPU; each param skips with a reason where it cannot run). The rest checks the torch reference
in depth. Backend-specific: ``test_kv_cache_triton_kernels.py`` (Triton kernels, cuDNN route,
block-sparse over [cache; fresh], launch shapes), ``test_kv_cache_cuda_kernels.py`` (csrc kernel
families), ``test_flash_attn_compat.py``, ``test_attn_lse.py``.
"""

import pytest
import torch
from helpers import DEV, TRITON

import longcat_kernels as lk
from longcat_kernels.testing import (
    assert_close,
    attention_lowp,
    attention_oracle,
    bsa_token_mask,
    make_cache,
    make_qkv,
    prefix_mask,
    rope_oracle,
)

GRID_HW = (3, 5)  # tokens per frame 15 (odd)
HW = GRID_HW[0] * GRID_HW[1]


def _explicit(q, k, v, kc, vc, rope, c):
    """Rotate fresh q/k in fp64 longhand at frames c.., concatenate with the repeated cache."""
    B = q.shape[0]
    if rope is not None:
        q = rope_oracle(q, rope.grid, c)
        k = rope_oracle(k, rope.grid, c)
    if kc is None:
        return q, k, v
    ka = torch.cat([kc.double().expand(B, -1, -1, -1), k.double()], dim=1)
    va = torch.cat([vc.double().expand(B, -1, -1, -1), v.double()], dim=1)
    return q, ka, va


def _backend_params(cases, interpret):
    """``torch`` on every case; ``triton`` in the CPU interpreter on the ``interpret`` cases only (the
    others run on a GPU: ``triton_gpu``)."""
    out = []
    for name in cases:
        out.append(pytest.param("torch", name, id=f"torch-{name}"))
        marks = TRITON.marks if name in interpret else pytest.mark.triton_gpu
        out.append(pytest.param("triton", name, marks=marks, id=f"triton-{name}"))
    return out


# name: (use_rope, H, D, Sc, Sn, dtype, permuted q/k/v)
KV_CASES = {
    # 15 tokens per frame (odd), 2 cached frames, 3 fresh frames; RoPE of the fresh q/k in fp64 longhand
    "rope-H1-D128": (True, 1, 128, 2 * HW, 3 * HW, torch.float32, True),
    "rope-H3-D64": (True, 3, 64, 2 * HW, 3 * HW, torch.float32, True),
    "H1-D128": (False, 1, 128, 2 * HW, 3 * HW, torch.float32, True),
    "H3-D64": (False, 3, 64, 2 * HW, 3 * HW, torch.float32, True),
}
# odd / tile-aligned / tiny lengths and no cache (the interpreter runs 16x16 tiles)
for _dt in (torch.float32, torch.float16):
    for _Sc, _Sn, _D in [(37, 29, 64), (16, 48, 32), (5, 17, 128), (0, 33, 64)]:
        KV_CASES[f"Sc{_Sc}-Sn{_Sn}-D{_D}-{str(_dt)[6:]}"] = (False, 3, _D, _Sc, _Sn, _dt, False)
KV_INTERPRET = [n for n in KV_CASES if n.startswith("Sc")]


@pytest.mark.parametrize("Bc", [1, 2])
@pytest.mark.parametrize("backend,case", _backend_params(KV_CASES, KV_INTERPRET))
def test_kv_cache_equals_explicit_concat(backend, case, Bc):
    """Batch-1 broadcast and per-batch caches, with and without the fused 3D RoPE, against attention
    over the explicit [cache; fresh] concatenation (fp64)."""
    use_rope, H, D, Sc, Sn, dtype, permuted = KV_CASES[case]
    c, tn = Sc // HW, Sn // HW
    rope = lk.Rope3D((c + tn,) + GRID_HW, D, device=DEV) if use_rope else None
    q, k, v = make_qkv(2, Sn, H, D, dtype=dtype, permuted=permuted, device=DEV)
    kc, vc = make_cache(Bc, Sc, H, D, dtype=dtype, device=DEV) if Sc else (None, None)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    ref, _ = attention_oracle(*_explicit(q, k, v, kc, vc, rope, c))
    base = None
    if dtype != torch.float32:  # no rope in the low-precision cases
        K = k if kc is None else torch.cat([kc.expand(2, -1, -1, -1), k], 1)
        V = v if vc is None else torch.cat([vc.expand(2, -1, -1, -1), v], 1)
        base = attention_lowp(q, K, V)
    assert_close(out, ref, base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kv_cache_low_precision(dtype):
    c, tn, H, D = 1, 2, 2, 64
    rope = lk.Rope3D((c + tn,) + GRID_HW, D)
    q, k, v = make_qkv(2, tn * HW, H, D, dtype=dtype)
    kc, vc = make_cache(1, c * HW, H, D, dtype=dtype)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)
    qr, kr = lk.apply_rope_3d(q, rope, c), lk.apply_rope_3d(k, rope, c)
    ka, va = torch.cat([kc.expand(2, -1, -1, -1), kr], 1), torch.cat([vc.expand(2, -1, -1, -1), v], 1)
    ref, _ = attention_oracle(qr, ka, va)
    assert out.dtype == dtype
    assert_close(out, ref, attention_lowp(qr, ka, va))


def test_kv_cache_batch1_is_not_copied(monkeypatch):
    """A batch-1 cache must never be expanded/repeated into a batch-B tensor by the dense path."""
    c, tn, H, D = 2, 2, 2, 64
    q, k, v = make_qkv(3, tn * HW, H, D)
    kc, vc = make_cache(1, c * HW, H, D)
    seen = []
    orig_cat, orig_expand = torch.cat, torch.Tensor.expand

    def spy_cat(tensors, *a, **kw):
        out = orig_cat(tensors, *a, **kw)
        seen.append(tuple(out.shape))
        return out

    def spy_expand(self, *sizes):
        if self.data_ptr() in (kc.data_ptr(), vc.data_ptr()):
            raise AssertionError("the batch-1 cache was expanded")
        return orig_expand(self, *sizes)

    monkeypatch.setattr(torch, "cat", spy_cat)
    monkeypatch.setattr(torch.Tensor, "repeat", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("repeat")))
    monkeypatch.setattr(torch.Tensor, "expand", spy_expand)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc)
    monkeypatch.undo()
    assert all((c + tn) * HW not in s for s in seen), "the [cache; fresh] concatenation was materialised"
    ref, _ = attention_oracle(*_explicit(q, k, v, kc, vc, None, c))
    assert_close(out, ref)


def test_kv_cache_without_cache_is_dense_attention():
    rope = lk.Rope3D((2,) + GRID_HW, 64)
    q, k, v = make_qkv(2, 2 * HW, 3, 64)
    out = lk.attn_with_kv_cache(q, k, v, rope=rope)
    ref, _ = attention_oracle(rope_oracle(q, rope.grid), rope_oracle(k, rope.grid), v)
    assert_close(out, ref)


def test_kv_cache_cached_keys_are_not_rotated():
    """Cached K is stored rotated: the op must not rotate it again (result depends on it as given)."""
    c, tn = 2, 1
    rope = lk.Rope3D((c + tn,) + GRID_HW, 64)
    q, k, v = make_qkv(1, tn * HW, 2, 64)
    kc, vc = make_cache(1, c * HW, 2, 64)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)
    wrong, _ = attention_oracle(*_explicit(q, k, v, rope_oracle(kc, rope.grid, 0).float(), vc, rope, c))
    right, _ = attention_oracle(*_explicit(q, k, v, kc, vc, rope, c))
    assert_close(out, right)
    assert (out.double() - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("Bc", [1, 2])
def test_kv_cache_block_sparse(Bc):
    c, tn, H, D = 2, 3, 2, 64
    grid_k = (c + tn,) + GRID_HW
    rope = lk.Rope3D(grid_k, D)
    q, k, v = make_qkv(2, tn * HW, H, D)
    kc, vc = make_cache(Bc, c * HW, H, D)
    params = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=params)
    qr, kr = lk.apply_rope_3d(q, rope, c), lk.apply_rope_3d(k, rope, c)
    ka, va = torch.cat([kc.expand(2, -1, -1, -1), kr], 1), torch.cat([vc.expand(2, -1, -1, -1), v], 1)
    grid_q = (tn,) + GRID_HW
    sel = lk.select_blocks(qr, ka, grid_q=grid_q, grid_k=grid_k, chunk_q=(1, 2, 2), sparsity=0.5)
    ref, _ = attention_oracle(qr, ka, va, bsa_token_mask(sel.to_mask(), grid_q, grid_k, (1, 2, 2), (1, 2, 2)))
    assert_close(out, ref)
    # a precomputed selection gives the same result; sparsity 0 equals dense
    out2 = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=lk.BlockSparseParams(selection=sel))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    dense = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)
    full = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 2, 2)))
    assert_close(full, dense.double(), floor=2e-5)


# name: (S, P, H, D, dtype, permuted q/k/v)
PREFIX_CASES = {f"S{S}-P{P}-H{H}-D{D}": (S, P, H, D, torch.float32, True)
                for S, P, H, D in [(37, 0, 3, 64), (37, 1, 1, 128), (37, 17, 3, 64), (37, 37, 1, 64), (59, 30, 3, 128)]}
# P on a tile boundary (16, 32), inside a tile (7, 24, 1), and the dense ends (0, S)
for _dt in (torch.float32, torch.float16):
    for _S, _P in [(45, 0), (45, 16), (45, 7), (45, 32), (45, 45), (48, 24), (33, 1)]:
        PREFIX_CASES[f"S{_S}-P{_P}-{str(_dt)[6:]}"] = (_S, _P, 2, 64, _dt, False)
PREFIX_INTERPRET = [n for n in PREFIX_CASES if n.endswith(("float32", "float16"))]


@pytest.mark.parametrize("backend,case", _backend_params(PREFIX_CASES, PREFIX_INTERPRET))
def test_prefix_attn_matches_oracle(backend, case):
    S, P, H, D, dtype, permuted = PREFIX_CASES[case]
    q, k, v = make_qkv(2, S, H, D, dtype=dtype, permuted=permuted, device=DEV)
    out = lk.prefix_attn(q, k, v, P, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    m = prefix_mask(S, P, DEV)
    ref, _ = attention_oracle(q, k, v, m)
    assert_close(out, ref, attention_lowp(q, k, v, m) if dtype != torch.float32 else None)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_prefix_equals_two_calls_and_cache_split(backend):
    """prefix_attn == [prefix rows attend to the prefix; the rest attend to everything] (fp64), and
    its noisy rows == attn_with_kv_cache with the prefix as the cache (same backend)."""
    S, p = 45, 13
    q, k, v = make_qkv(2, S, 2, 64, device=DEV)
    out = lk.prefix_attn(q, k, v, p, scale=0.1, backend=backend)
    cond, _ = attention_oracle(q[:, :p], k[:, :p], v[:, :p], scale=0.1)
    noisy, _ = attention_oracle(q[:, p:], k, v, scale=0.1)
    assert_close(out, torch.cat([cond, noisy], dim=1))
    b = lk.attn_with_kv_cache(q[:, p:], k[:, p:], v[:, p:], k[:, :p], v[:, :p], scale=0.1, backend=backend)
    assert_close(out[:, p:], b.double(), floor=1e-6, name="noisy rows vs cache split")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefix_attn_low_precision(dtype):
    S, p = 40, 13
    q, k, v = make_qkv(1, S, 2, 64, dtype=dtype)
    m = prefix_mask(S, p)
    out = lk.prefix_attn(q, k, v, p)
    ref, _ = attention_oracle(q, k, v, m)
    assert_close(out, ref, attention_lowp(q, k, v, m))
