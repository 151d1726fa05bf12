"""Property tests (hypothesis) for the kernels' hostile-input behaviour (issue 13).

Classes covered here: 1 (a backend refuses a dtype it cannot compute), 2 (NaN/Inf never hidden,
forward and gradients, torch and Triton agree), 6 (degenerate sizes: empty result or a named
error; Triton BSA at any head_dim; hand-built selections checked), 7 (the empty top-k trap warns,
NaN eps refused), plus parity of the torch reference against the fp64 oracle over random grids,
chunks, rules and strides. Shapes are tiny and example counts modest (profile in conftest.py;
``HYPOTHESIS_PROFILE=slow`` sweeps more).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import longcat_kernels as lk
from longcat_kernels._backend import BackendUnavailableError
from longcat_kernels.ops.block_sparse_attn import selection as selection_mod
from longcat_kernels.testing.oracle import attention_oracle, bsa_token_mask, selection_oracle, token_block_ids
from longcat_kernels.testing.tolerance import assert_close

# ----------------------------------------------------------------------------- strategies


@st.composite
def bsa_case(draw, max_tokens: int = 48):
    """(grid_q, grid_k, chunk_q, chunk_k, B, H, D) with few tokens."""
    h = draw(st.integers(1, 4))
    w = draw(st.integers(1, 4))
    tq = draw(st.integers(1, max(1, max_tokens // (h * w))))
    tk = draw(st.integers(tq, tq + 2))
    chunk_q = (draw(st.integers(1, tq)), draw(st.integers(1, h)), draw(st.integers(1, w)))
    chunk_k = chunk_q if draw(st.booleans()) else (draw(st.integers(1, tk)), draw(st.integers(1, h)), draw(st.integers(1, w)))
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 2))
    D = draw(st.sampled_from([4, 8, 16]))
    return (tq, h, w), (tk, h, w), chunk_q, chunk_k, B, H, D


# the Triton interpreter is slow: its property tests report the first failing example unshrunk
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)

RULES = [(0.5, None), (0.0, None), (None, 0.9), (None, 0.5), (0.75, 0.7), (None, 1.0)]
rules = st.sampled_from(RULES)


def _qkv(B, Sq, Sk, H, D, dtype=torch.float32, strided=False):
    """Fresh random q, k, v; ``strided`` gives BHSD storage seen as BSHD (non-contiguous)."""
    def one(S):
        if strided:
            return torch.randn(B, H, S, D, dtype=dtype).transpose(1, 2)
        return torch.randn(B, S, H, D, dtype=dtype)
    return one(Sq), one(Sk), one(Sk)


def _expected_nonfinite(sel, q, k, v):
    """Token-level ``[B, Sq, H]`` bool: outputs that depend on a non-finite input through ``sel``
    (their own query, or a key/value token of a selected block)."""
    mask = bsa_token_mask(sel.to_mask(), sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)  # [B,H,Sq,Sk]
    # a query whose block selects nothing outputs zeros whatever it holds (the empty top-k trap)
    tok_blk = token_block_ids(sel.grid_q, sel.chunk_q)
    attends = (sel.counts.long()[:, :, tok_blk] > 0).permute(0, 2, 1)  # [B, Sq, H]
    bad_q = ~torch.isfinite(q).all(-1) & attends  # [B, Sq, H]
    bad_kv = (~torch.isfinite(k).all(-1)) | (~torch.isfinite(v).all(-1))  # [B, Sk, H]
    hit = (mask & bad_kv.permute(0, 2, 1)[:, :, None, :]).any(-1)  # [B, H, Sq]
    return bad_q | hit.permute(0, 2, 1)


# ----------------------------------------------------------------------------- class 1


def _all_ops(dtype):
    q, k, v = (torch.randn(1, 32, 2, 16, dtype=dtype) for _ in range(3))
    rope = lk.Rope3D((2, 4, 4), head_dim=16)
    w = torch.ones(16)
    return {
        "block_sparse_attn": lambda: lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5,
                                                          backend="triton"),
        "select_blocks": lambda: lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5,
                                                  backend="triton"),
        "attn_with_kv_cache": lambda: lk.attn_with_kv_cache(q, k, v, k[:, :16], v[:, :16], backend="triton"),
        "prefix_attn": lambda: lk.prefix_attn(q, k, v, 8, backend="triton"),
        "qk_norm_rope": lambda: lk.qk_norm_rope(q, k, w, w, rope, backend="triton"),
    }


@pytest.mark.triton_interpret
@pytest.mark.parametrize("op", sorted(_all_ops(torch.float32)))
def test_interpreter_refuses_bf16_for_every_op(op):
    with pytest.raises(BackendUnavailableError, match="interpreter"):
        _all_ops(torch.bfloat16)[op]()


@pytest.mark.triton_interpret
def test_interpreter_dtype_rule_env_backend(monkeypatch):
    """LONGCAT_KERNELS_BACKEND=triton is an explicit request: refused the same way."""
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "triton")
    q = torch.randn(1, 8, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="fp32/fp16"):
        lk.prefix_attn(q, q, q, 4)


# ----------------------------------------------------------------------------- parity (torch vs fp64 oracle)


@given(case=bsa_case(), rule=rules, strided=st.booleans())
def test_reference_bsa_matches_fp64_oracle(case, rule, strided):
    gq, gk, cq, ck, B, H, D = case
    sparsity, cdf = rule
    q, k, v = _qkv(B, math.prod(gq), math.prod(gk), H, D, strided=strided)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the empty top-k warning (tested below)
        sel = lk.select_blocks(q, k, grid_q=gq, grid_k=gk, chunk_q=cq, chunk_k=ck, sparsity=sparsity,
                               cdf_threshold=cdf, backend="torch")
        out = lk.block_sparse_attn(q, k, v, selection=sel, backend="torch")
    _, _, counts_o = selection_oracle(q, k, gq, gk, cq, ck, sparsity, cdf)
    if cdf is None:  # cdf counts at the threshold may flip between fp32 and fp64 sums
        assert torch.equal(sel.counts.long(), counts_o)
    # score ties can go either way in fp32 vs fp64: compare attention over the selection it made
    tok = bsa_token_mask(sel.to_mask(), gq, gk, cq, ck)
    ref, _ = attention_oracle(q, k, v, tok)
    assert_close(out, ref, name="bsa torch vs fp64")


# ----------------------------------------------------------------------------- class 2: NaN/Inf never hidden


poison = st.sampled_from(["q", "k", "v"]).flatmap(
    lambda t: st.tuples(st.just(t), st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.integers(0, 10**6))
)


@given(case=bsa_case(max_tokens=32), rule=rules, bad=poison)
def test_nonfinite_input_reaches_every_dependent_output_torch(case, rule, bad):
    gq, gk, cq, ck, B, H, D = case
    sparsity, cdf = rule
    q, k, v = _qkv(B, math.prod(gq), math.prod(gk), H, D)
    which, val, pos = bad
    t = {"q": q, "k": k, "v": v}[which]
    t.view(-1)[pos % t.numel()] = val
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sel = lk.select_blocks(q, k, grid_q=gq, grid_k=gk, chunk_q=cq, chunk_k=ck, sparsity=sparsity,
                               cdf_threshold=cdf, backend="torch")
        out = lk.block_sparse_attn(q, k, v, selection=sel, backend="torch")
    bad_out = ~torch.isfinite(out).all(-1)
    expect = _expected_nonfinite(sel, q, k, v)
    assert not bool((bad_out & ~expect).any()), "a non-finite output that does not depend on the bad input"
    if math.isnan(val):
        # NaN always propagates; +-Inf may legitimately vanish (a -inf score is a zero weight)
        assert torch.equal(bad_out, expect), "NaN did not reach every output that depends on it"
    keeps = sparsity is not None and int((1 - sparsity) * sel.num_k_blocks) > 0
    if which == "k" and (cdf is not None or keeps):
        # a non-finite key makes its block's score non-finite for every query block: under cdf the
        # row selects every block, under top-k a NaN sorts first. +-Inf scores may stay ordered
        # (top-k), but a NaN score must always be selected.
        if cdf is not None and math.isnan(val):  # (a -inf score is a zero weight, not hidden)
            assert bool((sel.counts == sel.num_k_blocks).any()), "cdf rule hid a NaN key"
        if math.isnan(val):
            flat = pos % k.numel()
            b, h = flat // (k.shape[1] * H * D), flat // D % H
            assert bool(bad_out[b, :, h].all()), "NaN in k did not reach every output of its batch entry and head"


# the interpreter runs each launch slowly (fwd + 3 backward kernels): two small fixed geometries
TRITON_CASES = st.sampled_from([
    ((2, 2, 4), (2, 2, 4), (1, 2, 2), (1, 2, 2), 1, 2, 16),
    ((1, 3, 4), (2, 3, 4), (1, 2, 2), (1, 3, 2), 1, 1, 16),
])


# cdf_threshold=1.0 sits on the rounding edge: the sorted cdf of a finite row ends at 1.0 +- an ulp,
# and torch / Triton pooled scores differ by ulps, so the last block is a coin flip per row (about
# one run in two of this test failed on finite rows). Torch-vs-Triton gating parity is asserted on
# the other rules; the cdf=1.0 NaN rule is covered by the torch property test above.
TRITON_RULES = st.sampled_from([r for r in RULES if r != (None, 1.0)])


@pytest.mark.triton_interpret
@settings(max_examples=3, phases=NO_SHRINK)
@given(case=TRITON_CASES, rule=TRITON_RULES, bad=poison)
def test_nonfinite_forward_and_grads_agree_torch_vs_triton(case, rule, bad):
    gq, gk, cq, ck, B, H, D = case
    sparsity, cdf = rule
    q0, k0, v0 = _qkv(B, math.prod(gq), math.prod(gk), H, D)
    which, val, pos = bad
    t = {"q": q0, "k": k0, "v": v0}[which]
    t.view(-1)[pos % t.numel()] = val
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for backend in ("torch", "triton"):
            q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
            sel = lk.select_blocks(q, k, grid_q=gq, grid_k=gk, chunk_q=cq, chunk_k=ck, sparsity=sparsity,
                                   cdf_threshold=cdf, backend=backend)
            out = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend)
            out.backward(torch.ones_like(out))
            res[backend] = (sel.to_mask(), out.detach(), q.grad, k.grad, v.grad)
    (m_t, *a), (m_x, *b) = res["torch"], res["triton"]
    assert torch.equal(m_t, m_x), "gating differs between torch and triton"
    assert torch.equal(torch.isfinite(a[0]), torch.isfinite(b[0])), "out: non-finite placement differs"
    if math.isnan(val):  # with +-Inf inputs, which gradient entries become inf-inf = NaN is not specified
        for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
            assert torch.equal(torch.isnan(x), torch.isnan(y)), f"{name}: NaN placement differs torch vs triton"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_nan_value_does_not_reach_dq_through_padded_query_slots(backend):
    """Partial query blocks (grid h=3, chunk h=2): the reference gathers token 0 into the padding
    slots; a block attending a NaN value made their dS NaN and dq of token 0 (whose own block does
    not attend the NaN) NaN too. Triton never had it (the property test above found the mismatch)."""
    gq, gk, cq, ck = (1, 3, 4), (2, 3, 4), (1, 2, 2), (1, 3, 2)
    torch.manual_seed(0)
    q, k, v = _qkv(1, 12, 24, 1, 16)
    v[0, 8, 0, 3] = float("nan")  # key block 0
    # query block 0 (tokens 0, 1, 4, 5) -> key block 1; partial query block 2 (tokens 8, 9) -> key block 0
    idx = torch.tensor([[[[1], [1], [0], [1]]]], dtype=torch.int32)
    sel = selection_mod.BlockSelection(idx, torch.ones(1, 1, 4, dtype=torch.int32), gq, gk, cq, ck)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend)
    out.backward(torch.ones_like(out))
    bad_out = torch.isnan(out[0, :, 0]).any(-1).nonzero().flatten().tolist()
    bad_dq = torch.isnan(q.grad[0, :, 0]).any(-1).nonzero().flatten().tolist()
    assert bad_out == [8, 9] and bad_dq == [8, 9], (bad_out, bad_dq)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_cdf_rule_nan_in_k_and_inf_in_q(backend):
    """The issue's example: cdf rule + NaN in k (or +Inf in q) used to return exact zeros."""
    g = (2, 4, 4)
    q, k, v = _qkv(1, 32, 32, 2, 16)
    k[0, 5, 1, 3] = float("nan")
    out = lk.block_sparse_attn(q, k, v, grid_q=g, chunk_q=(2, 2, 2), sparsity=None, cdf_threshold=0.9,
                               backend=backend)
    assert bool(torch.isnan(out[:, :, 1]).all()) and bool(torch.isfinite(out[:, :, 0]).all())
    q, k, v = _qkv(1, 32, 32, 2, 16)
    q[0, 3, 0, 0] = float("inf")
    out = lk.block_sparse_attn(q, k, v, grid_q=g, chunk_q=(2, 2, 2), sparsity=None, cdf_threshold=0.9,
                               backend=backend)
    assert not bool(torch.isfinite(out[0, 3, 0]).any())
    assert bool(torch.isfinite(out[:, :, 1]).all())


# ----------------------------------------------------------------------------- class 6: degenerate sizes


def _ops_on(q, k, v, backend):
    rope = lk.Rope3D((2, 4, 4), head_dim=16)
    w = torch.ones(q.shape[-1])
    return {
        "bsa": lambda: lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5,
                                            backend=backend),
        "select": lambda: lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5,
                                           backend=backend).counts,
        "bsa_cdf": lambda: lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=None,
                                                cdf_threshold=0.5, backend=backend),
        "kv": lambda: lk.attn_with_kv_cache(q, k, v, k[:, :16], v[:, :16], backend=backend),
        "prefix": lambda: lk.prefix_attn(q, k, v, 8, backend=backend),
        "qk": lambda: lk.qk_norm_rope(q, k, w, w, rope if q.shape[-1] == 16 else None, backend=backend)[0],
        "rope": lambda: lk.apply_rope_3d(q, rope),
    }


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
@pytest.mark.parametrize("dim", ["batch", "heads"])
def test_empty_batch_or_heads_give_empty_results(backend, dim):
    shape = [1, 32, 2, 16]
    shape[0 if dim == "batch" else 2] = 0
    q, k, v = (torch.randn(*shape) for _ in range(3))
    for name, f in _ops_on(q, k, v, backend).items():
        if name == "rope" and backend == "triton":
            continue  # apply_rope_3d has no backend argument
        out = f()
        assert out.numel() == 0, name
        if name != "select":
            assert tuple(out.shape) == tuple(shape), name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_head_dim_zero_is_a_named_error(backend):
    q, k, v = (torch.randn(1, 32, 2, 0) for _ in range(3))
    for name, f in _ops_on(q, k, v, backend).items():
        if name == "rope":
            continue  # Rope3D itself needs head_dim >= 6, checked against x
        with pytest.raises(ValueError, match="head_dim"):
            f()


def test_rope_sequence_zero():
    rope = lk.Rope3D((2, 4, 4), head_dim=16)
    x = torch.randn(2, 0, 3, 16)
    assert lk.apply_rope_3d(x, rope, frame_offset=1).shape == x.shape
    qo, ko = lk.qk_norm_rope(x, x, torch.ones(16), torch.ones(16), rope, frame_offset=2)
    assert qo.shape == x.shape and ko.shape == x.shape


@pytest.mark.triton_interpret
@settings(max_examples=3, phases=NO_SHRINK)
@given(D=st.sampled_from([4, 8, 12, 24, 40]), rule=st.sampled_from([(0.5, None), (None, 0.8)]))
def test_triton_bsa_any_head_dim_matches_torch_with_grads(D, rule):
    g = (1, 4, 4)
    sparsity, cdf = rule
    q0, k0, v0 = _qkv(1, 16, 16, 1, D)
    res = {}
    for backend in ("torch", "triton"):
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
        out = lk.block_sparse_attn(q, k, v, grid_q=g, chunk_q=(1, 2, 2), sparsity=sparsity, cdf_threshold=cdf,
                                   backend=backend)
        do = torch.randn_like(out) if backend == "torch" else res["torch"][-1]
        out.backward(do)
        res[backend] = (out.detach(), q.grad, k.grad, v.grad, do)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close(res["triton"][i], res["torch"][i].double(), name=f"{name} D={D}")


@st.composite
def corrupted_selection(draw):
    kind = draw(st.sampled_from(["index_high", "index_negative", "count_high", "count_negative", "duplicate"]))
    return kind, draw(st.integers(0, 10**6))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
@settings(max_examples=10)
@given(bad=corrupted_selection())
def test_hand_built_selection_out_of_range_is_refused(backend, bad):
    g = (2, 4, 4)
    q, k, v = _qkv(1, 32, 32, 2, 16)
    sel = lk.select_blocks(q, k, grid_q=g, chunk_q=(2, 2, 2), sparsity=0.5, backend="torch")  # 2 of 4 blocks
    kind, pos = bad
    idx, cnt = sel.indices.clone(), sel.counts.clone()
    r = pos % cnt.numel()
    if kind == "index_high":
        idx.view(-1, idx.shape[-1])[r, pos % 2] = 4 + pos % 5
    elif kind == "index_negative":
        idx.view(-1, idx.shape[-1])[r, pos % 2] = -1 - pos % 3
    elif kind == "count_high":
        cnt.view(-1)[r] = 3 + pos % 7
    elif kind == "count_negative":
        cnt.view(-1)[r] = -1 - pos % 4
    else:
        row = idx.view(-1, idx.shape[-1])[r]
        row[1] = row[0]
    bad_sel = dataclasses.replace(sel, indices=idx, counts=cnt)
    with pytest.raises(ValueError, match="selection\\.(indices|counts)"):
        lk.block_sparse_attn(q, k, v, selection=bad_sel, backend=backend)


def test_selection_check_sees_in_place_edits():
    g = (2, 4, 4)
    q, k, v = _qkv(1, 32, 32, 2, 16)
    sel = lk.select_blocks(q, k, grid_q=g, chunk_q=(2, 2, 2), sparsity=0.5, backend="torch")
    lk.block_sparse_attn(q, k, v, selection=sel, backend="torch")  # checked and remembered
    sel.indices[0, 0, 0, 0] = 17
    with pytest.raises(ValueError, match="selection.indices"):
        lk.block_sparse_attn(q, k, v, selection=sel, backend="torch")


# ----------------------------------------------------------------------------- class 7: traps warn / are refused


def test_empty_topk_warns_once_naming_the_grid(monkeypatch):
    monkeypatch.setattr(selection_mod, "_WARNED_EMPTY", set())
    q, k, v = _qkv(1, 32, 32, 1, 16)
    with pytest.warns(RuntimeWarning, match=r"grid_k=\(2, 4, 4\).*sparsity <= 0\.7500"):
        out = lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(2, 2, 2))  # default 0.9375, 4 blocks
    assert bool((out == 0).all())  # upstream's semantics kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(2, 2, 2))  # once only
        lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5)  # keeps 2: silent


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-6])
def test_qk_norm_rope_refuses_bad_eps(eps):
    q = torch.randn(1, 16, 1, 16)
    with pytest.raises(ValueError, match="eps"):
        lk.qk_norm_rope(q, q, torch.ones(16), torch.ones(16), None, eps=eps)


# ----------------------------------------------------------------------------- GPU: the same NaN rules on device


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton_gpu),
                                     pytest.param("cuda", marks=pytest.mark.ext)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", [(0.5, None), (None, 0.9), (0.75, 0.5)])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nonfinite_placement_matches_torch_on_gpu(backend, dtype, rule, which):
    """Each GPU backend (fwd; triton also grads) puts NaN exactly where the torch reference does,
    over the same selection, for a NaN at a random place of q, k or v."""
    g, c = (4, 8, 8), (4, 4, 4)  # 64-token blocks, 4 key blocks
    sparsity, cdf = rule
    q0, k0, v0 = (torch.randn(1, 256, 2, 64, device="cuda", dtype=dtype) for _ in range(3))
    t = {"q": q0, "k": k0, "v": v0}[which]
    t.view(-1)[torch.randint(0, t.numel(), ()).item()] = float("nan")
    sel = lk.select_blocks(q0, k0, grid_q=g, chunk_q=c, sparsity=sparsity, cdf_threshold=cdf, backend="torch")
    res = {}
    for b in ("torch", backend):
        grad = b != "cuda"  # the cuda backend is forward only
        q, k, v = (x.clone().requires_grad_(grad) for x in (q0, k0, v0))
        out = lk.block_sparse_attn(q, k, v, selection=sel, backend=b)
        if grad:
            out.float().sum().backward()
        res[b] = [out.detach()] + ([q.grad, k.grad, v.grad] if grad else [])
    for name, x, y in zip(("out", "dq", "dk", "dv"), res["torch"], res[backend]):
        assert torch.equal(torch.isnan(x), torch.isnan(y)), f"{backend} {name}: NaN placement differs from torch"
    expect = _expected_nonfinite(sel.to("cpu"), q0.cpu(), k0.cpu(), v0.cpu())
    assert torch.equal((~torch.isfinite(res[backend][0]).all(-1)).cpu(), expect), "NaN not exactly where it belongs"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
@pytest.mark.parametrize("where", ["k_cache", "k"])
def test_kv_cache_block_sparse_cdf_nan_in_keys_not_hidden(backend, where):
    """attn_with_kv_cache gates [cache; fresh] keys on its own path (two-segment block sums):
    a NaN key under the cdf rule must still reach every output of its head."""
    Hf, Wf, c, tn = 4, 4, 2, 2
    q, k, v = _qkv(1, tn * Hf * Wf, tn * Hf * Wf, 2, 16)
    kc, vc = torch.randn(1, c * Hf * Wf, 2, 16), torch.randn(1, c * Hf * Wf, 2, 16)
    {"k_cache": kc, "k": k}[where][0, 3, 1, 5] = float("nan")
    bs = lk.BlockSparseParams(sparsity=None, cdf_threshold=0.6, chunk_q=(1, 2, 2), frame_hw=(Hf, Wf))
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend=backend)
    assert bool(torch.isnan(out[:, :, 1]).all()), "NaN key hidden by the cdf gating"
    assert bool(torch.isfinite(out[:, :, 0]).all())
