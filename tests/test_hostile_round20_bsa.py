"""Hostile inputs, round 20 (block-sparse attention): each test names the silent behaviour it pins."""
from __future__ import annotations

import struct

import pytest
import torch

import longcat_kernels as lk


def _neg_nan() -> float:
    x = -float("nan")  # sign bit set: what x86 produces for inf - inf, 0 * inf, ...
    assert struct.pack(">f", x)[0] & 0x80
    return x


_DEVICES = [pytest.param("cpu", marks=pytest.mark.triton_interpret),
            pytest.param("cuda", marks=pytest.mark.triton_gpu)]  # the bit tricks compiled, not only interpreted


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("nk, n", [(7, 3), (100, 5), (100, 60), (33, 1)])  # bisect and pruned kernels
def test_triton_topk_puts_a_nan_with_the_sign_bit_first(nk, n, device):
    """The order-preserving uint32 key of a NaN depended on its sign and payload: a NaN with the sign bit
    set keyed below -inf (never selected: the NaN block was silently dropped), and NaNs of different
    payloads were not ties. torch's stable descending sort puts every NaN first, lower index first."""
    from longcat_kernels.ops.block_sparse_attn.triton import bsa_topk

    torch.manual_seed(0)
    s = torch.randn(2, nk)
    s[0, nk // 2] = _neg_nan()
    s[1, nk - 1] = _neg_nan()
    s[1, 0] = float("nan")
    # a positive NaN with another payload (0x7fffffff: CUDA's canonical NaN) ties with the others
    s.view(torch.int32)[0, nk // 3] = 0x7FFFFFFF
    got = bsa_topk(s.to(device), n).long().cpu().sort(-1).values
    ref = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :n].sort(-1).values
    assert torch.equal(got, ref)


@pytest.mark.parametrize("device", _DEVICES)
def test_triton_gating_keeps_a_key_block_whose_score_is_a_negative_nan(device):
    """A NaN (sign bit set) in k made that key block's score NaN; the Triton top-k dropped the block, so the
    NaN never reached the output (torch gating keeps it: a NaN score sorts first)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 32, 1, 16), torch.randn(1, 32, 1, 16)
    k[0, 5, 0, 3] = _neg_nan()  # token (t0, h0, w5): key block 2 of (1, 2, 2) chunks over (2, 2, 8)
    q, k = q.to(device), k.to(device)
    sels = [lk.select_blocks(q, k, grid_q=(2, 2, 8), chunk_q=(1, 2, 2), sparsity=0.5, backend=b)
            for b in ("torch", "triton")]
    for sel in sels:
        assert bool((sel.indices == 2).any(-1).all()), "the NaN key block was not selected"
    assert torch.equal(sels[0].to_mask(), sels[1].to_mask())
