"""Hostile round 44, interop (SPEC 12): a tiny non-LongCat DiT attention (joint text + video tokens, padded
text per sample, [B, S, H, D] and [B, H, S, D] layouts) driven through the functional API, and the shared
oracles with the attention masks diffusers builds."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing import attention_lowp, attention_oracle

GRID, HEADS, D, L = (2, 4, 4), 2, 16, 5
LENS = (5, 2)  # valid text tokens per sample (batch 2, different padding)


def _sdpa_bshd(q, k, v, mask=None):
    """fp64 torch SDPA on BSHD tensors (mask broadcast to [B, H, Sq, Sk] as SDPA takes it)."""
    qt, kt, vt = (x.double().transpose(1, 2) for x in (q, k, v))
    m = mask.double() if mask is not None and mask.is_floating_point() else mask
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=m).transpose(1, 2)


def _joint_inputs(dtype, layout):
    """Video q/k/v over GRID and text k/v of L tokens (padding after LENS[b]); layout "bhsd" builds
    [B, H, S, D] tensors (a Hunyuan / CogVideoX processor's layout) and passes their BSHD views."""
    g = torch.Generator().manual_seed(44)
    S = GRID[0] * GRID[1] * GRID[2]
    B = len(LENS)

    def t(s):
        if layout == "bhsd":
            return torch.randn(B, HEADS, s, D, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, s, HEADS, D, generator=g).to(dtype)

    return t(S), t(S), t(S), t(L), t(L)


def _diffusers_masks(S):
    """The padding mask of the joint [video; text] keys in the shapes diffusers passes: bool [B, 1, 1, S+L]
    (True = attend) and additive float (0 / -inf)."""
    keep = torch.ones(len(LENS), 1, 1, S + L, dtype=torch.bool)
    for b, n in enumerate(LENS):
        keep[b, ..., S + n:] = False
    add = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    return keep, add


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("torch", torch.float32, 1e-5),
                                               ("triton", torch.float32, 1e-5), ("triton", torch.float16, 2e-3)])
def test_joint_text_video_attention_with_per_sample_text_padding(layout, backend, dtype, tol):
    """Pin (passed before): joint attention over [video; padded text] keys as SPEC 12 describes it (sparse video
    keys + dense text keys, merged with lse), text sliced to each sample's valid length, equals SDPA with
    diffusers' [B, 1, 1, S+L] padding mask, bool and additive."""
    q, k, v, kt, vt = _joint_inputs(dtype, layout)
    S = q.shape[1]
    o1, l1 = lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=(2, 2, 2), sparsity=0.0, return_lse=True,
                                  backend=backend)
    outs = []
    for b, n in enumerate(LENS):
        o2, l2 = lk.flash_attn_with_kvcache(q[b:b + 1], kt[b:b + 1, :n], vt[b:b + 1, :n], return_softmax_lse=True,
                                            backend=backend)
        lse = torch.logaddexp(l1[b:b + 1], l2)
        w1, w2 = (torch.exp(x - lse).transpose(1, 2)[..., None] for x in (l1[b:b + 1], l2))
        outs.append(o1[b:b + 1] * w1 + o2 * w2)
    out = torch.cat(outs)
    keep, add = _diffusers_masks(S)
    kk, vv = torch.cat([k, kt], 1), torch.cat([v, vt], 1)
    for m in (keep, add):
        ref = _sdpa_bshd(q, kk, vv, m)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (m.dtype, err)


@pytest.mark.parametrize("shape", ["b11l", "b1l_batch1"])
def test_oracles_take_diffusers_additive_float_masks(shape):
    """attention_oracle / attention_lowp (the fp64 oracle and low-precision baseline other codebases' parity
    tests use) crashed on an additive float mask (0 attend / -inf masked, diffusers' and SDPA's attn_mask
    convention): "~ (operator.invert) is only implemented on integer and Boolean-type tensors". A floating
    mask is now added to the scores as SDPA adds it (out and lse equal to the bool mask's)."""
    q, k, v, kt, vt = _joint_inputs(torch.float32, "bshd")
    kk, vv = torch.cat([k, kt], 1), torch.cat([v, vt], 1)
    keep, add = _diffusers_masks(q.shape[1])
    if shape == "b1l_batch1":  # [B, 1, L]: with batch 1 it broadcasts as SDPA broadcasts it
        q, kk, vv, keep, add = q[1:], kk[1:], vv[1:], keep[1:, 0], add[1:, 0]
    o_b, l_b = attention_oracle(q, kk, vv, mask=keep)
    o_a, l_a = attention_oracle(q, kk, vv, mask=add)
    torch.testing.assert_close(o_a, o_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(l_a, l_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(o_a, _sdpa_bshd(q, kk, vv, add), rtol=0, atol=1e-12)
    torch.testing.assert_close(attention_lowp(q, kk, vv, mask=add), attention_lowp(q, kk, vv, mask=keep))
    # a finite additive bias (ALiBi-like) is added, not read as keep/drop
    bias = torch.randn(1, 1, 1, kk.shape[1], dtype=torch.float64)
    torch.testing.assert_close(attention_oracle(q, kk, vv, mask=bias)[0], _sdpa_bshd(q, kk, vv, bias),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_oracles_name_an_integer_mask(dtype):
    """A 0/1 integer mask (a tokenizer's attention_mask) went through bitwise not (1 -> -2) and then crashed in
    masked_fill ("only supports boolean masks"); it is now refused naming ``mask``, its dtype and what to pass."""
    q, k, v, _, _ = _joint_inputs(torch.float32, "bshd")
    m = torch.ones(2, 1, 1, k.shape[1], dtype=dtype)
    for f in (attention_oracle, attention_lowp):
        with pytest.raises(TypeError, match=r"^mask: expected a bool .* or floating .*got torch\.(int64|uint8)"):
            f(q, k, v, mask=m)
