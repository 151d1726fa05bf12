"""Block-sparse attention and its gating against the independent fp64 oracle.

Properties every backend must have (selection == oracle, all blocks kept == dense, empty selection
== zeros / -inf lse / zero gradients) are one test parameterised over ``backend`` (``torch``, and
``triton``: the CPU interpreter without CUDA, compiled kernels on a GPU; each param skips with a
reason where it cannot run). The rest checks the torch reference in depth (gating rules, lse,
low precision, gradients, the grouped/checkpointed path). Backend-specific tests live next to this
file: ``test_bsa_triton_kernels.py`` (Triton kernels: launch configs, top-k, opcheck, compile),
``test_bsa_cuda_kernels.py`` (csrc kernel families, forward only, bf16/fp16), ``test_bsa_lse.py``,
``test_bsa_video_inputs.py`` (video-like inputs, selection overlap). The pair kernel's parity test left
with the kernel (``bench/dev/bsa_pairs_triton.py``).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEV, TRITON, n_blocks

import longcat_kernels as lk
from longcat_kernels.ops.block_sparse_attn.api import _forward
from longcat_kernels.testing import (
    assert_close,
    attention_lowp,
    attention_oracle,
    bsa_token_mask,
    check_selection,
    make_qkv,
    selection_oracle,
)

# (grid_q, grid_k or None, chunk_q, chunk_k or None): divisible, non-divisible (480p-like), odd,
# Tq != Tk (noise queries vs cond+noise keys), different key chunk
CASES = [
    ((4, 8, 8), None, (4, 4, 4), None),
    ((6, 6, 13), None, (4, 4, 4), None),
    ((5, 7, 9), (7, 7, 9), (2, 4, 4), None),
    ((3, 5, 6), (4, 5, 6), (2, 2, 4), (1, 2, 2)),
]
RULES = [(0.5, None), (None, 0.3), (0.75, 0.5), (0.9375, None)]
# the cuda backend (forward only, bf16/fp16) is tested per kernel family in test_bsa_cuda_kernels.py
BACKENDS = ["torch", TRITON]


def _numel(g):
    return g[0] * g[1] * g[2]


def _run(grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf, *, B=2, H=3, D=64, dtype=torch.float32, grad=False):
    gk = grid_k or grid_q
    q, k, v = make_qkv(B, _numel(grid_q), H, D, _numel(gk), dtype=dtype, permuted=True, requires_grad=grad)
    sel = lk.select_blocks(
        q, k, grid_q=grid_q, grid_k=grid_k, chunk_q=chunk_q, chunk_k=chunk_k, sparsity=sparsity, cdf_threshold=cdf,
        backend="torch",
    )
    msg = check_selection(sel, q, k, sparsity, cdf)
    assert msg is None, msg
    out = lk.block_sparse_attn(
        q, k, v, grid_q=grid_q, grid_k=grid_k, chunk_q=chunk_q, chunk_k=chunk_k, sparsity=sparsity,
        cdf_threshold=cdf, backend="torch",
    )
    mask = bsa_token_mask(sel.to_mask(), grid_q, gk, sel.chunk_q, sel.chunk_k)
    return q, k, v, sel, out, mask


@pytest.mark.parametrize("grid_q,grid_k,chunk_q,chunk_k", CASES)
@pytest.mark.parametrize("sparsity,cdf", RULES)
def test_bsa_forward_matches_oracle_fp32(grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf):
    q, k, v, sel, out, mask = _run(grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf)
    ref, _ = attention_oracle(q, k, v, mask)
    assert out.dtype == q.dtype and out.is_contiguous() and out.shape == q.shape
    assert_close(out, ref, name="out")


@pytest.mark.parametrize("H,D", [(1, 64), (1, 128), (3, 128)])
def test_bsa_head_configs(H, D):
    q, k, v, sel, out, mask = _run((6, 6, 13), (7, 6, 13), (4, 4, 4), None, 0.5, 0.6, B=1, H=H, D=D)
    ref, _ = attention_oracle(q, k, v, mask)
    assert_close(out, ref)


# (grid_q, grid_k, chunk_q, chunk_k, B, H, D, rules): odd grids with the default chunk_k (= chunk_q),
# and Tq != Tk with a different key chunk (the rules the Triton gating was first checked with)
SEL_CASES = {
    "odd_default_chunk_k": ((5, 7, 9), (7, 7, 9), (2, 4, 4), None, 2, 3, 64, RULES + [(0.0, None), (None, 0.0)]),
    "key_chunk": ((3, 5, 6), (5, 5, 6), (2, 2, 4), (2, 2, 2), 1, 2, 16, [(0.5, None), (None, 0.6), (0.75, 0.3), (0.99, None)]),
}
SEL_PARAMS = [
    pytest.param("torch", "odd_default_chunk_k", id="torch-odd_default_chunk_k"),
    pytest.param("torch", "key_chunk", id="torch-key_chunk"),
    pytest.param("triton", "key_chunk", marks=TRITON.marks, id="triton-key_chunk"),
    # 315 x 441 tokens, 6 rules: too slow for the interpreter
    pytest.param("triton", "odd_default_chunk_k", marks=pytest.mark.triton_gpu, id="triton-odd_default_chunk_k"),
]


@pytest.mark.parametrize("backend,case", SEL_PARAMS)
def test_selection_equals_oracle_exactly_fp32(backend, case):
    """Counts and block sets equal the oracle's exactly (random fp32 data: no ties) for every rule;
    order within a row may differ between backends."""
    grid_q, grid_k, chunk_q, chunk_k, B, H, D, rules = SEL_CASES[case]
    q, k, _ = make_qkv(B, _numel(grid_q), H, D, _numel(grid_k), device=DEV)
    for sparsity, cdf in rules:
        sel = lk.select_blocks(q, k, grid_q=grid_q, grid_k=grid_k, chunk_q=chunk_q, chunk_k=chunk_k,
                               sparsity=sparsity, cdf_threshold=cdf, backend=backend)
        mask, _, counts = selection_oracle(q.cpu(), k.cpu(), grid_q, grid_k, chunk_q, chunk_k or chunk_q, sparsity, cdf)
        assert torch.equal(sel.counts.long().cpu(), counts), (sparsity, cdf)
        assert torch.equal(sel.to_mask().cpu(), mask), (sparsity, cdf)
        assert sel.indices.dtype == torch.int32 and sel.counts.dtype == torch.int32
        assert sel.grid_q == grid_q and sel.grid_k == grid_k and sel.chunk_k == (chunk_k or chunk_q)
    # threshold 1.0 sits on the rounding boundary of the cumulative sum: semantic check only
    sel = lk.select_blocks(q, k, grid_q=grid_q, grid_k=grid_k, chunk_q=chunk_q, chunk_k=chunk_k, sparsity=None,
                           cdf_threshold=1.0, backend=backend)
    assert check_selection(sel, q, k, None, 1.0) is None


def test_selection_rule_counts():
    grid = (8, 8, 12)  # 12 blocks of 4x4x4
    q, k, _ = make_qkv(1, 768, 2, 64)
    topk = lk.select_blocks(q, k, grid_q=grid, sparsity=0.75)
    assert (topk.counts == 3).all() and topk.indices.shape[-1] == 3
    cdf = lk.select_blocks(q, k, grid_q=grid, sparsity=None, cdf_threshold=0.5)
    both = lk.select_blocks(q, k, grid_q=grid, sparsity=0.75, cdf_threshold=0.5)
    assert torch.equal(both.counts, torch.maximum(topk.counts, cdf.counts))
    # highest scores first: the top-k ids are a prefix of the combined selection
    assert torch.equal(both.indices[..., :3], topk.indices)
    assert (both.counts >= 3).all() and (cdf.counts < 12).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]])
def test_bsa_low_precision_tolerance_rule(case, dtype):
    q, k, v, sel, out, mask = _run(*case, 0.5, None, dtype=dtype)
    ref, _ = attention_oracle(q, k, v, mask)
    assert out.dtype == dtype
    assert_close(out, ref, attention_lowp(q, k, v, mask), name="out")


@pytest.mark.parametrize("H,D", [(1, 128), (3, 64)])
@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
def test_bsa_gradients_match_oracle(case, H, D):
    q, k, v, sel, out, mask = _run(*case, 0.5, 0.4, H=H, D=D, grad=True)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = attention_oracle(qd, kd, vd, mask)
    exp = torch.autograd.grad(ref, (qd, kd, vd), g.double())
    assert_close(out, ref, name="out")
    for name, a, e in zip(("dq", "dk", "dv"), got, exp):
        assert_close(a, e, factor=3.0, name=name)


def test_forward_lse_matches_oracle():
    grid_q, grid_k = (5, 7, 9), (7, 7, 9)
    q, k, v = make_qkv(2, _numel(grid_q), 3, 64, _numel(grid_k), permuted=True)
    sel = lk.select_blocks(q, k, grid_q=grid_q, grid_k=grid_k, chunk_q=(2, 4, 4), sparsity=0.5, cdf_threshold=0.2)
    out, lse = _forward(q, k, v, sel, None, "torch")
    mask = bsa_token_mask(sel.to_mask(), grid_q, grid_k, (2, 4, 4), (2, 4, 4))
    ref, lse_ref = attention_oracle(q, k, v, mask)
    assert lse.shape == (2, 3, q.shape[1]) and lse.dtype == torch.float32
    assert_close(out, ref, name="out")
    assert_close(lse, lse_ref, name="lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_blocks_selected_equals_dense(backend):
    """Every key block kept == dense attention: sparsity 0 through the op's own gating on permuted
    (BHSD-strided) inputs, also against SDPA; and a hand-built full selection listed in reverse
    order. Output and lse against the fp64 oracle."""
    grid, chunk = (3, 5, 6), (2, 2, 4)  # partial edge blocks on every axis
    S, H, D = _numel(grid), 2, 16
    q, k, v = make_qkv(1, S, H, D, permuted=True, device=DEV)
    out, lse = lk.block_sparse_attn(q, k, v, grid_q=grid, chunk_q=chunk, sparsity=0.0, backend=backend,
                                    return_lse=True)
    ref, lse_ref = attention_oracle(q, k, v)
    assert_close(out, ref, name="sparsity 0")
    assert_close(lse, lse_ref, name="sparsity 0 lse")
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert_close(out, sdpa, floor=2e-5)
    q, k, v = make_qkv(1, S, H, D, device=DEV)
    n = n_blocks(grid, chunk)
    idx = torch.arange(n, dtype=torch.int32, device=DEV).flip(0).expand(1, H, n, n).contiguous()
    sel = lk.BlockSelection(idx, torch.full((1, H, n), n, dtype=torch.int32, device=DEV), grid, grid, chunk, chunk)
    out, lse = lk.block_sparse_attn(q, k, v, selection=sel, scale=D**-0.5, backend=backend, return_lse=True)
    ref, lse_ref = attention_oracle(q, k, v, None, D**-0.5)
    assert_close(out, ref, name="full selection, reversed")
    assert_close(lse, lse_ref, name="full selection lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_selection_gives_zeros_no_nan(backend):
    """No key block anywhere: output 0, lse -inf, gradients 0, never NaN; through the op's gating
    (cdf threshold 0 keeps nothing) and through a hand-built selection of -1 padding."""
    grid, chunk = (2, 4, 4), (2, 2, 2)
    q, k, v = make_qkv(1, 32, 2, 16, device=DEV, requires_grad=True)
    n = n_blocks(grid, chunk)
    hand = lk.BlockSelection(torch.full((1, 2, n, 1), -1, dtype=torch.int32, device=DEV),
                             torch.zeros((1, 2, n), dtype=torch.int32, device=DEV), grid, grid, chunk, chunk)
    for kw in (dict(grid_q=grid, chunk_q=chunk, sparsity=None, cdf_threshold=0.0), dict(selection=hand, scale=0.25)):
        out, lse = lk.block_sparse_attn(q, k, v, backend=backend, return_lse=True, **kw)
        assert torch.equal(out, torch.zeros_like(out)), kw
        assert torch.isneginf(lse).all(), kw
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for g in grads:
            assert not torch.isnan(g).any() and torch.equal(g, torch.zeros_like(g)), kw


def test_partially_empty_selection_rows():
    """Some query blocks select nothing (cdf), the others attend normally; no NaN anywhere."""
    grid = (4, 8, 8)
    q, k, v = make_qkv(1, 256, 2, 64)
    sel = lk.select_blocks(q, k, grid_q=grid, sparsity=None, cdf_threshold=0.3)
    counts = sel.counts.clone()
    counts[0, 0, ::2] = 0  # hand-edit: empty rows in head 0
    idx = torch.where(torch.arange(sel.max_selected) < counts[..., None], sel.indices, -1).to(torch.int32)
    sel2 = lk.BlockSelection(idx, counts, sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    out, lse = _forward(q, k, v, sel2, None, "torch")
    ref, lse_ref = attention_oracle(q, k, v, bsa_token_mask(sel2.to_mask(), grid, grid, (4, 4, 4), (4, 4, 4)))
    assert not torch.isnan(out).any()
    assert_close(out, ref)
    assert_close(lse, lse_ref, name="lse")


def test_selection_reuse_and_scale():
    grid = (3, 5, 6)
    q, k, v = make_qkv(2, 90, 3, 64)
    sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=(2, 2, 4), sparsity=0.5)
    a = lk.block_sparse_attn(q, k, v, selection=sel, scale=0.3)
    b = lk.block_sparse_attn(q, k, v, grid_q=grid, chunk_q=(2, 2, 4), sparsity=0.5, scale=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref, _ = attention_oracle(q, k, v, bsa_token_mask(sel.to_mask(), grid, grid, (2, 2, 4), (2, 2, 4)), scale=0.3)
    assert_close(a, ref)


def test_permuted_strides_equal_contiguous():
    grid = (6, 6, 13)
    q, k, v = make_qkv(1, _numel(grid), 2, 64, permuted=True)
    assert not q.is_contiguous()
    a = lk.block_sparse_attn(q, k, v, grid_q=grid, sparsity=0.5)
    b = lk.block_sparse_attn(q.contiguous(), k.contiguous(), v.contiguous(), grid_q=grid, sparsity=0.5)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_random_shape_sweep():
    """Seeded sweep over random grids, chunks, rules (values fresh; shapes reproducible)."""
    rng = torch.Generator().manual_seed(1234)
    for _ in range(6):
        g = tuple(int(x) for x in torch.randint(1, 7, (3,), generator=rng))
        c = tuple(int(torch.randint(1, gi + 1, (1,), generator=rng)) for gi in g)
        tk = g[0] + int(torch.randint(0, 3, (1,), generator=rng))
        sp = float(torch.rand(1, generator=rng)) * 0.9
        cdf = None if torch.rand(1, generator=rng) < 0.5 else float(torch.rand(1, generator=rng))
        q, k, v, sel, out, mask = _run(g, (tk, g[1], g[2]), c, None, sp, cdf, B=1, H=2, D=64)
        ref, _ = attention_oracle(q, k, v, mask)
        assert_close(out, ref, name=f"out grid={g} chunk={c} Tk={tk} sparsity={sp:.3f} cdf={cdf}")


def test_grouped_and_checkpointed_path(monkeypatch):
    """Tiny memory budget: many query-block groups, recomputed in backward; same results."""
    from longcat_kernels.ops.block_sparse_attn import reference

    monkeypatch.setattr(reference, "CPU_BUDGET_BYTES", 1 << 12)
    grid = (6, 6, 13)
    q, k, v = make_qkv(1, 468, 2, 64, requires_grad=True, permuted=True)
    sel = lk.select_blocks(q, k, grid_q=grid, sparsity=0.5, cdf_threshold=0.3)
    out, lse = _forward(q, k, v, sel, None, "torch")
    mask = bsa_token_mask(sel.to_mask(), grid, grid, (4, 4, 4), (4, 4, 4))
    ref, lse_ref = attention_oracle(q, k, v, mask)
    assert_close(out, ref)
    assert_close(lse, lse_ref, name="lse")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    exp = torch.autograd.grad(ref, (q, k, v), g.double())
    for name, a, e in zip(("dq", "dk", "dv"), got, exp):
        assert_close(a, e, factor=3.0, name=name)


def test_keeps_nothing_warning_points_at_the_callers_line():
    """The shared ``_validate.user_stacklevel`` attributes the gating's keeps-nothing warning to this file,
    past the op's dispatch and the custom op wrappers."""
    import warnings

    q = torch.randn(1, 64, 1, 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lk.block_sparse_attn(q, q, q, grid_q=(1, 8, 8), chunk_q=(1, 4, 4), sparsity=0.9, backend="torch")
    hits = [x for x in w if "keeps int((1 - sparsity) * Nk) = 0" in str(x.message)]
    assert len(hits) == 1 and hits[0].filename == __file__, [(str(x.message)[:60], x.filename) for x in w]
