"""return_lse on every attention op and backend (SPEC 12).

lse is checked against a float64 ``logsumexp`` of the scaled scores over exactly the keys each
query attends to (built here from the op's own rule: dense, prefix, cache + fresh, the selected 3D
blocks); rows that attend to nothing must give ``-inf`` (and output 0, never NaN). Merging two
partial results over disjoint key sets reproduces attention over the union. CPU: torch backend and
Triton interpreter, fp32; GPU (cuda/triton_gpu markers): bf16 on the triton and cuda backends.
Cached-KV and prefix lse here, plus the cross-op checks (all ops on GPU, fullgraph compile of every
lse path, csrc ops without lse); block-sparse lse is in ``tests/block_sparse_attn/test_bsa_lse.py``.
The float64 references (``lse64``, ``out64``, ``check_lse``) are in ``tests/helpers.py``.
"""
from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS, DEV, GPU_BACKENDS, check_lse, lse64, n_blocks, out64
from helpers import randn as _rand

import longcat_kernels as lk
from longcat_kernels.testing.oracle import bsa_token_mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("Bc,Sc", [(1, 24), (2, 24), (1, 0)])
def test_kv_cache_lse_matches_fp64(backend, Bc, Sc):
    B, H, D, Sn = 2, 2, 32, 19
    q, k, v = (_rand(B, Sn, H, D) for _ in range(3))
    kc = vc = None
    if Sc:
        kc, vc = _rand(Bc, Sc, H, D), _rand(Bc, Sc, H, D)
    out, lse = lk.attn_with_kv_cache(q, k, v, kc, vc, backend=backend, return_lse=True)
    K = k if kc is None else torch.cat([kc.expand(B, -1, -1, -1), k], 1)
    V = v if vc is None else torch.cat([vc.expand(B, -1, -1, -1), v], 1)
    mask = torch.ones(Sn, K.shape[1], dtype=torch.bool, device=DEV)
    check_lse(lse, lse64(q, K, mask, D**-0.5), B, H, Sn)
    torch.testing.assert_close(out.double(), out64(q, K, V, mask, D**-0.5), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_block_sparse_lse_and_empty_rows(backend):
    B, H, D, hw, c, Tn = 1, 2, 32, (4, 4), 2, 2
    n = hw[0] * hw[1]
    q, k, v = (_rand(B, Tn * n, H, D) for _ in range(3))
    kc, vc = _rand(1, c * n, H, D), _rand(1, c * n, H, D)
    # cdf threshold 0 keeps no block: every query attends to nothing
    bs = lk.BlockSparseParams(sparsity=None, cdf_threshold=0.0, chunk_q=(2, 2, 2), frame_hw=hw)
    out, lse = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend=backend, return_lse=True)
    assert torch.isneginf(lse).all() and (out == 0).all()
    # all blocks kept: equals dense, lse included
    bs = lk.BlockSparseParams(sparsity=0.0, chunk_q=(2, 2, 2), frame_hw=hw)
    out, lse = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend=backend, return_lse=True)
    K = torch.cat([kc, k], 1)
    mask = torch.ones(q.shape[1], K.shape[1], dtype=torch.bool, device=DEV)
    check_lse(lse, lse64(q, K, mask, D**-0.5), B, H, q.shape[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("P", [0, 7, 23])
def test_prefix_lse_matches_fp64(backend, P):
    B, H, D, S = 2, 2, 32, 23
    q, k, v = (_rand(B, S, H, D) for _ in range(3))
    out, lse = lk.prefix_attn(q, k, v, P, backend=backend, return_lse=True)
    i = torch.arange(S, device=DEV)
    mask = (i[:, None] >= P) | (i[None, :] < P)
    check_lse(lse, lse64(q, k, mask, D**-0.5), B, H, S)
    torch.testing.assert_close(out.double(), out64(q, k, v, mask, D**-0.5), atol=1e-4, rtol=1e-4)


def merge(o1, l1, o2, l2):
    """SPEC 12 merge of two partial attentions over disjoint keys, written out."""
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).nan_to_num(0.0).transpose(1, 2)[..., None]
    w2 = torch.exp(l2 - lse).nan_to_num(0.0).transpose(1, 2)[..., None]
    return o1.double() * w1 + o2.double() * w2, lse


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_of_disjoint_partials_is_full_attention(backend):
    """Dense text-like keys (cache op over a cache alone) + sparse video keys (BSA) -> full attention."""
    B, H, D, grid, chunk = 1, 2, 32, (2, 4, 4), (2, 2, 2)
    S = grid[0] * grid[1] * grid[2]
    q, k, v = (_rand(B, S, H, D) for _ in range(3))
    kt, vt = _rand(B, 11, H, D), _rand(B, 11, H, D)
    o_vid, l_vid = lk.block_sparse_attn(q, k, v, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend=backend,
                                         return_lse=True)
    o_txt, l_txt = lk.flash_attn_with_kvcache(q, kt, vt, return_softmax_lse=True, backend=backend)
    out, lse = merge(o_vid, l_vid, o_txt, l_txt)
    sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")
    bm = torch.zeros(B, H, sel.counts.shape[2], n_blocks(grid, chunk), dtype=torch.bool)
    for h in range(H):
        for i in range(bm.shape[2]):
            bm[0, h, i, sel.indices[0, h, i, : sel.counts[0, h, i]].long()] = True
    mask = torch.cat([bsa_token_mask(bm, grid, grid, chunk, chunk).to(DEV),
                      torch.ones(B, H, S, 11, dtype=torch.bool, device=DEV)], -1)
    K, V = torch.cat([k, kt], 1), torch.cat([v, vt], 1)
    torch.testing.assert_close(out, out64(q, K, V, mask, D**-0.5), atol=1e-4, rtol=1e-4)
    check_lse(lse.float(), lse64(q, K, mask, D**-0.5), B, H, S)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_split_cache(backend):
    """Cache op over keys [a; b] == merge(cache op over a alone, cache op over b alone)."""
    B, H, D, Sn = 2, 2, 32, 17
    q, k, v = (_rand(B, Sn, H, D) for _ in range(3))
    kc, vc = _rand(1, 21, H, D), _rand(1, 21, H, D)
    full, l_full = lk.attn_with_kv_cache(q, k, v, kc, vc, backend=backend, return_lse=True)
    o1, l1 = lk.flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True, backend=backend)
    o2, l2 = lk.flash_attn_with_kvcache(q, k, v, return_softmax_lse=True, backend=backend)
    out, lse = merge(o1, l1, o2, l2)
    torch.testing.assert_close(out, full.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, l_full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU (bf16)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_lse_gpu_all_ops(backend):
    B, H, D, grid, chunk = 2, 4, 128, (5, 9, 10), (4, 4, 4)
    S = grid[0] * grid[1] * grid[2]
    dt = torch.bfloat16
    q, k, v = (_rand(B, S, H, D, dtype=dt) for _ in range(3))
    sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.5)
    counts = sel.counts.clone()
    counts[:, 1, ::3] = 0
    sel = lk.BlockSelection(sel.indices, counts, sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    _, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    _, exp = lk.block_sparse_attn(q.float(), k.float(), v.float(), selection=sel, backend="torch", return_lse=True)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exp)) and not torch.isnan(lse).any()
    fin = torch.isfinite(exp)
    assert (lse[fin] - exp[fin]).abs().max() < 2e-2
    hw = grid[1] * grid[2]
    kc, vc = _rand(1, 2 * hw, H, D, dtype=dt), _rand(1, 2 * hw, H, D, dtype=dt)
    _, lse = lk.attn_with_kv_cache(q, k, v, kc, vc, backend=backend, return_lse=True)
    _, exp = lk.attn_with_kv_cache(q.float(), k.float(), v.float(), kc.float(), vc.float(), backend="torch",
                                   return_lse=True)
    assert (lse - exp).abs().max() < 2e-2
    _, lse = lk.prefix_attn(q, k, v, 3 * hw, backend=backend, return_lse=True)
    _, exp = lk.prefix_attn(q.float(), k.float(), v.float(), 3 * hw, backend="torch", return_lse=True)
    assert (lse - exp).abs().max() < 2e-2


@pytest.mark.triton_interpret
def test_return_lse_compiles_fullgraph():
    B, H, D, grid, chunk = 1, 2, 32, (2, 4, 4), (2, 2, 2)
    S = 32
    q, k, v = (_rand(B, S, H, D) for _ in range(3))
    kc, vc = _rand(1, 16, H, D), _rand(1, 16, H, D)
    sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")

    def f(q, k, v, kc, vc):
        a = lk.block_sparse_attn(q, k, v, selection=sel, backend="triton", return_lse=True)
        b = lk.flash_attn_with_kvcache(q, kc, vc, k, v, return_softmax_lse=True, backend="triton")
        c = lk.prefix_attn(q, k, v, 5, backend="triton", return_lse=True)
        return a, b, c

    with torch.no_grad():
        eager = f(q, k, v, kc, vc)  # eager first: the resolver imports triton.py outside the graph
        torch._dynamo.reset()
        comp = torch.compile(f, fullgraph=True)(q, k, v, kc, vc)
    for (eo, el), (co, cl) in zip(eager, comp):
        torch.testing.assert_close(co, eo, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cl, el, atol=1e-5, rtol=1e-5)


@pytest.mark.ext
@pytest.mark.parametrize("kernel", ["sm90_ws", "sm90", "sm80"])
def test_cuda_ops_skip_lse_when_not_asked(kernel):
    """The csrc ops take return_lse (default True): False gives an empty lse and the same output,
    for every kernel family this extension can run here."""
    from longcat_kernels._ext import csrc_kernels
    from longcat_kernels.ops.block_sparse_attn.cuda import ops, selection_args

    if kernel not in csrc_kernels():
        pytest.skip(f"kernel {kernel!r} not in this build/device ({csrc_kernels()})")
    B, H, D, grid = 1, 2, 128, (4, 8, 8)
    S = 256
    q, k, v = (_rand(B, S, H, D, dtype=torch.bfloat16) for _ in range(3))
    sel = lk.select_blocks(q, k, grid_q=grid, sparsity=0.5)  # 4x4x4 = 64-token blocks: sm90_ws applies
    o1, l1 = ops().bsa_fwd_cuda(q, k, v, None, None, *selection_args(sel), 0.1, kernel)
    o0, l0 = ops().bsa_fwd_cuda(q, k, v, None, None, *selection_args(sel), 0.1, kernel, False)
    assert l1.shape == (B, H, S) and l0.numel() == 0 and torch.equal(o0, o1)
    assert not o1.isnan().any() and not l1.isnan().any()
    o1, l1 = ops().kv_cache_attn_fwd_cuda(q, k, v, k, v, *[None] * 6, 0, 0, 0.1, kernel)
    o0, l0 = ops().kv_cache_attn_fwd_cuda(q, k, v, k, v, *[None] * 6, 0, 0, 0.1, kernel, False)
    assert l1.shape == (B, H, S) and l0.numel() == 0 and torch.equal(o0, o1)
    o1, l1 = ops().prefix_attn_fwd_cuda(q, k, v, 64, 0.1, kernel)
    o0, l0 = ops().prefix_attn_fwd_cuda(q, k, v, 64, 0.1, kernel, False)
    assert l1.shape == (B, H, S) and l0.numel() == 0 and torch.equal(o0, o1)


# ---------------------------------------------------------------- a NaN reaching a row
# NaN in, NaN out, in the lse too: the kernels used to call a NaN row sum "no key seen" (``l > 0``
# false) and write lse = -inf, the value SPEC 12 gives rows that attend to nothing, so a ring
# merge or a caller masking empty rows dropped the NaN (the output row was NaN either way).
_NAN_ROW, _NAN_HEAD = 37, 1


def _nan_q(B, S, H, D, dt):
    q = _rand(B, S, H, D, dtype=dt)
    q[0, _NAN_ROW, _NAN_HEAD, 3] = float("nan")
    return q


def _check_nan_row(out, lse, name):
    assert out.shape[:3] == (lse.shape[0], lse.shape[2], lse.shape[1])
    assert torch.isnan(lse[0, _NAN_HEAD, _NAN_ROW]), f"{name}: lse of the NaN row is {lse[0, _NAN_HEAD, _NAN_ROW]}"
    assert torch.isnan(out[0, _NAN_ROW, _NAN_HEAD]).all(), name
    ok = torch.ones(lse.shape, dtype=torch.bool, device=lse.device)
    ok[0, _NAN_HEAD, _NAN_ROW] = False
    assert torch.isfinite(lse[ok]).all(), f"{name}: other rows not finite"
    assert torch.isfinite(out.transpose(1, 2)[ok]).all(), f"{name}: other rows not finite"


def _nan_row_all_ops(backend, D, dt):
    B, H, grid, hw = 1, 2, (4, 8, 8), (8, 8)
    S = 256
    q = _nan_q(B, S, H, D, dt)
    k, v = _rand(B, S, H, D, dtype=dt), _rand(B, S, H, D, dtype=dt)
    kc, vc = _rand(1, 128, H, D, dtype=dt), _rand(1, 128, H, D, dtype=dt)
    _check_nan_row(*lk.attn_with_kv_cache(q, k, v, kc, vc, backend=backend, return_lse=True), "kv cache")
    _check_nan_row(*lk.prefix_attn(q, k, v, 64, backend=backend, return_lse=True), "prefix")
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(4, 4, 4), frame_hw=hw)
    _check_nan_row(*lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend=backend, return_lse=True),
                   "kv cache, block-sparse")
    _check_nan_row(*lk.block_sparse_attn(q, k, v, grid_q=grid, sparsity=0.5, backend=backend, return_lse=True),
                   "block_sparse_attn")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_row_gives_nan_lse(backend):
    _nan_row_all_ops(backend, 32, torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_nan_row_gives_nan_lse_gpu(backend):
    _nan_row_all_ops(backend, 128, torch.bfloat16)


@pytest.mark.ext
@pytest.mark.parametrize("kernel", ["sm90_ws", "sm90", "sm80"])
def test_nan_row_gives_nan_lse_each_csrc_kernel(kernel):
    """The raw csrc ops of every kernel family (``auto`` would pick one)."""
    from longcat_kernels._ext import csrc_kernels
    from longcat_kernels.ops.block_sparse_attn.cuda import ops, selection_args

    if kernel not in csrc_kernels():
        pytest.skip(f"kernel {kernel!r} not in this build/device ({csrc_kernels()})")
    B, H, D, S, dt = 1, 2, 128, 256, torch.bfloat16
    q = _nan_q(B, S, H, D, dt)
    k, v = _rand(B, S, H, D, dtype=dt), _rand(B, S, H, D, dtype=dt)
    sel = lk.select_blocks(q, k, grid_q=(4, 8, 8), sparsity=0.5)
    _check_nan_row(*ops().bsa_fwd_cuda(q, k, v, None, None, *selection_args(sel), 0.1, kernel), f"bsa [{kernel}]")
    _check_nan_row(*ops().kv_cache_attn_fwd_cuda(q, k, v, k, v, *[None] * 6, 0, 0, 0.1, kernel), f"kv [{kernel}]")
    _check_nan_row(*ops().prefix_attn_fwd_cuda(q, k, v, 64, 0.1, kernel), f"prefix [{kernel}]")
