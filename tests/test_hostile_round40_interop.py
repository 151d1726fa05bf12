"""Hostile round 40, interop (SPEC 12): diffusers processor, the shared testing helpers other codebases'
parity tests use, grid helpers, bench on CPU."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing import attention_lowp, attention_oracle
from longcat_kernels.testing.baselines import sdpa_bshd


@pytest.mark.parametrize("hkv", [1, 2])
def test_oracles_and_sdpa_baseline_take_gqa_kv(hkv):
    """attention_oracle / attention_lowp / sdpa_bshd crashed on GQA/MQA k/v (2 or 1 kv heads for 4 query heads:
    "einsum(): subscript h has size 2 ..."), so the ops' GQA (SPEC 12) could not be checked with the shared
    oracle; they now repeat kv head h // group as the ops do, and name k for heads that do not divide."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 16, generator=g)
    k, v = torch.randn(2, 11, hkv, 16, generator=g), torch.randn(2, 11, hkv, 16, generator=g)
    out, lse = lk.flash_attn_with_kvcache(q, k, v, backend="torch", return_softmax_lse=True)
    rep = lambda x: x.repeat_interleave(4 // hkv, dim=2)  # noqa: E731
    o, l_ = attention_oracle(q, k, v)
    eo, el = attention_oracle(q, rep(k), rep(v))
    assert torch.equal(o, eo) and torch.equal(l_, el)
    torch.testing.assert_close(o.float(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_.float(), lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_lowp(q, k, v), attention_lowp(q, rep(k), rep(v)))
    torch.testing.assert_close(sdpa_bshd(q, k, v), sdpa_bshd(q, rep(k), rep(v)), atol=1e-6, rtol=1e-6)
    bad = torch.randn(2, 11, 3, 16)
    for f in (attention_oracle, attention_lowp, sdpa_bshd):
        with pytest.raises(ValueError, match=r"^k: expected .*divide.* 4.*got 3"):
            f(q, bad, bad)
