"""Hostile round 40, interop (SPEC 12): diffusers processor, the shared testing helpers other codebases'
parity tests use, grid helpers, bench on CPU."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing import attention_lowp, attention_oracle
from longcat_kernels.testing.baselines import sdpa_bshd
from helpers import tiny_wan


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


def _wan_model(num_layers=2):
    """A tiny random diffusers WanTransformer3DModel, fp32 (2 heads x 16, text dim 24)."""
    return tiny_wan(num_layers)


def _wan_run(m, F, H, W, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, F, H, W, generator=g)
    txt = torch.randn(batch, 7, 24, generator=g)
    with torch.no_grad():
        return m(hidden_states=x, timestep=torch.full((batch,), 300), encoder_hidden_states=txt, return_dict=False)[0]


@pytest.mark.parametrize("fused", [False, True])
def test_compile_repeated_blocks_fullgraph_with_the_processor(fused):
    """diffusers' regional compilation ``transformer.compile_repeated_blocks(fullgraph=True)`` failed with the
    processor installed ("Attempted to inline function marked as skipped: WeakIdKeyDictionary.get"; with the fused
    prologue also the data-dependent RoPE probe), while the untouched model compiles. It now compiles and equals
    the eager processor, also after a new grid with the same token count (2x8x8 -> 2x4x16 latents)."""
    pytest.importorskip("diffusers")
    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention

    params = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))
    eager, comp = _wan_model(), _wan_model()
    for m in (eager, comp):
        apply_block_sparse_attention(m, params, backend="torch", fused_prologue=fused)
    comp.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    for fhw in ((2, 8, 8), (2, 4, 16), (3, 8, 12)):
        torch.testing.assert_close(_wan_run(comp, *fhw), _wan_run(eager, *fhw), atol=1e-5, rtol=1e-5)


def test_processor_takes_the_chunk_types_apply_accepted():
    """apply_block_sparse_attention accepted ``chunk_q=VideoGrid(1, 2, 2)`` (as block_sparse_attn does), then the first
    forward crashed in the processor with "TypeError: 'VideoGrid' object is not iterable"; it now runs the chunk."""
    pytest.importorskip("diffusers")
    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention

    a, b = _wan_model(), _wan_model()
    apply_block_sparse_attention(a, lk.BlockSparseParams(sparsity=0.5, chunk_q=lk.VideoGrid(1, 2, 2),
                                                         chunk_k=lk.VideoGrid(2, 2, 2)), backend="torch")
    apply_block_sparse_attention(b, lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2), chunk_k=(2, 2, 2)),
                                 backend="torch")
    assert torch.equal(_wan_run(a, 2, 8, 8), _wan_run(b, 2, 8, 8))


def test_fused_prologue_under_offloading_hooks_uses_the_norm_modules():
    """With accelerate's sequential offload (``pipe.enable_sequential_cpu_offload()``: norm weights on meta, loaded
    by a hook when the module runs) the fused prologue read ``norm_q.weight`` without calling the module and raised
    "q_weight: expected a tensor on q's device cpu, got meta" (on a GPU: cuda vs meta; diffusers' leaf-level group
    offloading likewise). Norms whose forward is hooked now run as modules (diffusers' path): equal to the
    untouched model at sparsity 0."""
    pytest.importorskip("diffusers")
    accelerate = pytest.importorskip("accelerate")
    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention

    ref = _wan_run(_wan_model(), 2, 8, 8)
    m = _wan_model()
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 2, 2)), backend="torch",
                                 fused_prologue=True)
    accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
    torch.testing.assert_close(_wan_run(m, 2, 8, 8), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pairs", ["interleaved", "half"])
def test_rope_oracle_speaks_spec12_conventions(pairs):
    """rope_oracle (the fp64 oracle the tests and other codebases' parity tests use) knew only LongCat's split and
    interleaved pairs: a Rope3D(axis_dims=(8, 12, 12), pairs="half") (SPEC 12; HunyuanVideo-style rotate-half) had
    no oracle (TypeError: unexpected keyword 'axis_dims'). It now takes axis_dims and pairs."""
    from longcat_kernels.testing import rope_oracle

    grid, dims, theta = (3, 2, 4), (8, 12, 12), 700.0
    x = torch.randn(2, 24, 2, 32, dtype=torch.float64)
    rope = lk.Rope3D(grid, 32, theta, axis_dims=dims, pairs=pairs)
    torch.testing.assert_close(lk.apply_rope_3d(x.float(), rope).double(),
                               rope_oracle(x, grid, theta=theta, axis_dims=dims, pairs=pairs), atol=2e-5, rtol=1e-5)
    # the defaults are unchanged: LongCat's split, interleaved
    torch.testing.assert_close(rope_oracle(x, grid), rope_oracle(x, grid, axis_dims=(12, 10, 10)))
    with pytest.raises(ValueError, match="pairs"):
        rope_oracle(x, grid, pairs="rotate_half")
    with pytest.raises(ValueError, match="axis_dims"):
        rope_oracle(x, grid, axis_dims=(8, 12, 10))


def test_cuda_backend_keeps_the_fused_prologue_on_a_backend_that_has_it(monkeypatch):
    """``apply_block_sparse_attention(..., backend="cuda")`` passed "cuda" on to the fused q/k-norm+RoPE prologue
    (default on CUDA inputs), which has no csrc kernel: the first forward raised "qk_norm_rope: backend 'cuda'
    unavailable: qk_norm_rope has no csrc kernel". As in longcat_vc (``prologue_backend``), the prologue now runs
    on "auto" unless "torch"/"triton" was named; the attention keeps "cuda". (On this CPU machine the attention
    ops are redirected to the torch backend to reach the prologue.)"""
    pytest.importorskip("diffusers")
    import longcat_kernels.integrations.diffusers as D

    seen = {}

    def as_torch(fn, name):
        def call(*a, **kw):
            seen.setdefault(name, kw.get("backend"))
            return fn(*a, **{**kw, "backend": "torch"})
        return call

    monkeypatch.setattr(D, "block_sparse_attn", as_torch(D.block_sparse_attn, "attention"))
    monkeypatch.setattr(D, "flash_attn_with_kvcache", as_torch(D.flash_attn_with_kvcache, "attention"))
    prologue = D.qk_norm_rope
    monkeypatch.setattr(D, "qk_norm_rope", lambda *a, **kw: seen.setdefault("prologue", kw["backend"]) and prologue(*a, **kw))
    ref = _wan_run(_wan_model(), 2, 8, 8)
    m = _wan_model()
    D.apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=(1, 2, 2)), backend="cuda",
                                   fused_prologue=True)
    torch.testing.assert_close(_wan_run(m, 2, 8, 8), ref, atol=1e-5, rtol=1e-5)
    assert seen == {"prologue": "auto", "attention": "cuda"}


def test_make_video_qkv_takes_video_grids():
    """make_video_qkv(grid=VideoGrid(...)) crashed with "TypeError: 'VideoGrid' object is not iterable" (grid_k too),
    while the ops and the other helpers take a VideoGrid; it now builds the same inputs as for the tuple."""
    from longcat_kernels.testing import make_video_qkv

    a = make_video_qkv(1, lk.VideoGrid(2, 4, 4), 2, 8, grid_k=lk.VideoGrid(3, 4, 4),
                       generator=torch.Generator().manual_seed(3))
    b = make_video_qkv(1, (2, 4, 4), 2, 8, grid_k=(3, 4, 4), generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bench_bsa_skips_a_grid_shorter_than_its_chunk():
    """``python -m bench --suite bsa --shapes 2x3x5`` (a 5-frame video: 2 latent frames) errored every sparse case
    with "ValueError: chunk_q: expected each chunk size <= grid_q" (and exit 1 as a failure), where a sparsity that
    keeps no block is reported SKIPPED with its reason. The 4x4x4 chunk longer than the grid is now a named skip."""
    from bench.shapes import parse_grid
    from bench.suites import Context, bsa

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, log=lambda m: None, quick=True,
                  grids=[parse_grid("2x3x5")], sparsities=(0.5,), backends=["torch"])
    sparse = [c for c in bsa.cases(ctx) if c.params.get("kind") != "dense"]
    assert sparse and all(c.skip and "chunk 4x4x4" in c.skip and "2x3x5" in c.skip for c in sparse), \
        [(c.name, c.skip) for c in sparse]


def test_selection_oracle_keeps_every_block_at_cdf_threshold_one():
    """selection_oracle(cdf_threshold=1.0) dropped blocks (in 200 of 200 random draws): its fp64 cumulative sum ends a
    few ulps above 1.0, so searchsorted(right=True) stopped short, while a softmax's cumulative sum is <= 1 exactly
    (SPEC 3: every block) and the ops keep every block. A parity test of block_sparse_attn(cdf_threshold=1.0)
    against attention_oracle(bsa_token_mask(selection_oracle mask)) failed; the oracle now keeps every block."""
    from longcat_kernels.testing import bsa_token_mask, selection_oracle

    g, c = (4, 4, 4), (1, 2, 2)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask, s, cnt = selection_oracle(q, k, g, g, c, c, None, 1.0)
    assert mask.all() and (cnt == s.shape[-1]).all()
    exp, _ = attention_oracle(q, k, v, bsa_token_mask(mask, g, g, c, c))
    out = lk.block_sparse_attn(q, k, v, grid_q=g, chunk_q=c, sparsity=None, cdf_threshold=1.0, backend="torch")
    torch.testing.assert_close(out.double(), exp, atol=1e-5, rtol=1e-5)


def test_unfused_kv_cache_baseline_refuses_a_cache_batch_the_ops_refuse():
    """baselines.unfused_kv_cache_attn tiled a cache of batch 2 over a batch of 4 (sample 2 used sample 0's cache:
    a result no op computes; the ops raise "k_cache: expected batch 1 or 4") and crashed on batch 3 vs 2 with
    "Sizes of tensors must match ... Expected size 0"; it now raises naming k_cache_raw as the ops do."""
    from longcat_kernels.testing.baselines import unfused_kv_cache_attn

    rope = lk.Rope3D((3, 2, 2), 16)
    for B, Bc in ((4, 2), (2, 3)):
        q, kc = torch.randn(B, 8, 2, 16), torch.randn(Bc, 4, 2, 16)
        with pytest.raises(ValueError, match=rf"^k_cache_raw: expected batch 1 or {B}.*got {Bc}"):
            unfused_kv_cache_attn(q, q, q, kc, kc, rope=rope, impl="default")
