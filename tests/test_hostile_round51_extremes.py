"""Hostile round 51: numerical extremes of the attention ops (torch reference vs Triton interpreter) against fp64."""

from __future__ import annotations

import math

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing.oracle import attention_oracle, bsa_token_mask, prefix_mask

pytestmark = pytest.mark.triton_interpret

B, H, D = 1, 2, 16
GRID, CHUNK = (2, 4, 4), (1, 2, 2)  # 8 query / key blocks of 4 tokens
S = 32


def _qkv(dtype, scale=1.0):
    return [(torch.randn(B, S, H, D, dtype=torch.float64) * scale).to(dtype) for _ in range(3)]


def _bsa_oracle(q, k, v, selection):
    mask = bsa_token_mask(selection.to_mask(), GRID, GRID, CHUNK, CHUNK)
    return attention_oracle(q, k, v, mask)


def _assert_matches(out, lse, ro, rl, tol):
    """NaN exactly where the fp64 oracle has it (out and lse; an lse of +inf there is a NaN row: its output is
    inf - inf), everything else close."""
    rn = ro.isnan()
    assert torch.equal(out.isnan(), rn)
    row_nan = rn.any(-1).transpose(1, 2)  # [B, H, Sq]
    assert torch.equal(lse.isnan(), row_nan)
    fin = ~rn
    assert not out[fin].isnan().any()
    torch.testing.assert_close(out.double()[fin], ro[fin], atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double()[~row_nan], rl[~row_nan], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_bsa_one_nonfinite_query_lane_gives_nan_out_and_lse_in_that_row_only(backend, dtype, bad):
    # the torch reference took a row max of +inf as 0: out NaN but lse = log(inf) = +inf (Triton: NaN)
    q, k, v = _qkv(dtype)
    q[0, 5, 1, 3] = bad
    sel = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend="torch")
    out, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    ro, rl = _bsa_oracle(q, k, v, sel)
    _assert_matches(out, lse, ro, rl, 2e-3 if dtype == torch.float16 else 1e-5)
    assert lse[0, 1, 5].isnan() and out[0, 5, 1].isnan().all()
    assert not out[:, :5].isnan().any() and not out[:, 6:].isnan().any() and not out[0, 5, 0].isnan().any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_bsa_one_infinite_key_lane_gives_nan_lse_wherever_its_output_is_nan(backend, bad):
    q, k, v = _qkv(torch.float32)
    k[0, 9, 0, 4] = bad
    sel = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, cdf_threshold=0.9, backend="torch")
    out, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    ro, rl = _bsa_oracle(q, k, v, sel)
    _assert_matches(out, lse, ro, rl, 1e-5)
    assert not out[:, :, 1].isnan().any()  # the other head never sees it


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_ops_confine_a_nan_query_lane_to_its_row(backend, dtype):
    q, k, v = _qkv(dtype)
    q[0, 6, 0, 1] = math.nan
    calls = [
        (lambda: lk.prefix_attn(q, k, v, 4, backend=backend, return_lse=True), attention_oracle(q, k, v, prefix_mask(S, 4))),
        (lambda: lk.attn_with_kv_cache(q[:, 4:], k[:, 4:], v[:, 4:], k[:, :4], v[:, :4], backend=backend,
                                       return_lse=True), attention_oracle(q[:, 4:], k, v)),
        (lambda: lk.flash_attn_with_kvcache(q[:, 4:], k[:, :4], v[:, :4], k[:, 4:], v[:, 4:], backend=backend,
                                            return_softmax_lse=True), attention_oracle(q[:, 4:], k, v)),
    ]
    for call, (ro, rl) in calls:
        out, lse = call()
        _assert_matches(out, lse, ro, rl, 2e-3 if dtype == torch.float16 else 1e-5)
        assert int(out.isnan().any(-1).sum()) == 1 and int(lse.isnan().sum()) == 1


@pytest.mark.parametrize("rule", [(0.5, None), (None, 0.9), (0.75, 0.3)])
def test_all_equal_block_scores_select_the_lowest_block_ids_on_every_backend(rule):
    sparsity, cdf = rule
    q = torch.full((B, S, H, D), 0.25)
    k = torch.full((B, S, H, D), -0.5)
    sels = [lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=sparsity, cdf_threshold=cdf, backend=be)
            for be in ("torch", "triton")]
    for sel in sels:
        n = int(sel.counts.flatten()[0])
        assert (sel.counts == n).all()
        want = torch.arange(n, dtype=sel.indices.dtype).expand(B, H, 8, n)
        assert torch.equal(sel.indices[..., :n].sort(-1).values, want)
    assert torch.equal(sels[0].to_mask(), sels[1].to_mask())
    # 8 equal blocks: p = 1/8 each, cumulative sums 0.125 .. 1
    assert int(sels[0].counts.flatten()[0]) == {(0.5, None): 4, (None, 0.9): 7, (0.75, 0.3): 2}[rule]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,mag", [(torch.float16, 300.0), (torch.float16, 1e-6), (torch.float32, 1e17),
                                       (torch.float32, 1e-30)])
def test_bsa_scores_past_fp16_range_and_denormal_inputs_match_fp64(backend, dtype, mag):
    q, k, v = _qkv(dtype)
    q = (q.double() * mag).to(dtype)
    k = (k.double() * mag).to(dtype)
    sel_t = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend="torch")
    sel = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend)
    assert torch.equal(sel.to_mask(), sel_t.to_mask())
    out, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    ro, rl = _bsa_oracle(q, k, v, sel)
    assert not out.isnan().any() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), ro, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(lse.double(), rl, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, -math.inf, math.inf, math.nan])
def test_non_positive_or_non_finite_scales_raise_naming_the_argument(scale):
    q, k, v = _qkv(torch.float32)
    with pytest.raises(ValueError, match=r"^scale: expected a finite positive float"):
        lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, scale=scale, backend="torch")
    with pytest.raises(ValueError, match=r"^scale: expected a finite positive float"):
        lk.prefix_attn(q, k, v, 4, scale=scale, backend="triton")
    with pytest.raises(ValueError, match=r"^scale: expected a finite positive float"):
        lk.attn_with_kv_cache(q, k, v, k, v, scale=scale, backend="triton")
    with pytest.raises(ValueError, match=r"^softmax_scale: expected a finite positive float"):
        lk.flash_attn_with_kvcache(q, k, v, softmax_scale=scale, backend="torch")
