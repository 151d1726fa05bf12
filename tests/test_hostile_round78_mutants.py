"""Round 78: mutation testing of ``longcat_kernels/`` (do the tests catch wrong code?).

78 single-point mutations of the product code (token<->block maps, gating, the BSA and cached-KV references,
RoPE / RMSNorm, fp8 quantisation, validation predicates, dispatch rules) were applied one at a time, and the
tests that exercise that code were run (first the op's own folder and round files, then, for a survivor, the
other test files that name the feature). No product bug was found: every survivor is an equivalent mutant
(reason below) or a gap in the tests, closed here; each test below fails with its mutation and passes without.

Mutation table (mutation -> killed by; "NEW" = this file). Files: grid.py (G), selection.py (S), BSA
reference.py (R), kv_cache_attn (K), rope (P), fp8 reference (F), _validate / api checks (V), dispatch (D),
Triton transpose_selection (T).
  G1 num_blocks ceil -> floor-ish          round36_grid::test_block_token_index_matches_spec_enumeration
  G2 slot real: w < W -> w <= W            round36_grid (same)
  G3 slot real: t < T dropped              round36_grid (same)
  G4 cache_split_aligned in tokens         test_grid::test_cache_split_aligned
  G5 as_triple v <= 0 -> v < 0             test_input_validation::test_chunk_larger_than_grid
  G6 token_to_slot idx >= 0 -> > 0         block_sparse_attn::test_bsa_forward_matches_oracle_fp32
  G7 token index (t*H+h)*W+w axes swapped  round36_grid
  S1 top-k int(...) -> rounded             test_bsa_forward_matches_oracle_fp32
  S2 ties to the higher block id           round55_gating::test_triton_topk_of_a_long_row_breaks_ties...
  S3 cdf <= thr -> <                       round55_gating::test_gating_matches_an_fp64_oracle...
  S4 cdf count replaces max(top-k, cdf)    test_selection_equals_oracle_exactly_fp32
  S5 cdf softmax without / sqrt(D)         test_bsa_forward_matches_oracle_fp32
  S6 NaN row selects all: dropped          round55_gating::test_nan_in_one_token_stays_in_its_row
  S7 cdf_threshold >= 1.0 -> > 1.0         round40_interop::test_selection_oracle_keeps_every_block_at...
  S8 pooled mean over the full chunk       test_bsa_forward_matches_oracle_fp32
  S9 pooled mean not rounded to x.dtype    SURVIVED -> NEW test_gating_rounds_the_pooled_means_to_the_input_dtype
  S10 -1 past counts: < -> <=              test_bsa_forward_matches_oracle_fp32
  S11 keeps-nothing warning never          test_keeps_nothing_warning_points_at_the_callers_line
  S12 pooling with h/w swapped             test_bsa_forward_matches_oracle_fp32
  S13 indices batch/heads swapped          test_bsa_forward_matches_oracle_fp32
  R1 selected slots: < counts -> <=        test_bsa_forward_matches_oracle_fp32
  R2 padding key slots attended            test_bsa_forward_matches_oracle_fp32
  R3 empty row lse 0 instead of -inf       test_empty_selection_gives_zeros_no_nan
  R4 padding query slots not zeroed        test_properties::test_nan_value_does_not_reach_dq_through_padded...
  R5 non-finite row max taken as 0         SURVIVED -> NEW test_bsa_never_hides_a_nan_from_non_finite_keys
  R6 slots past counts gathered unmasked   round3::test_selection_slots_past_counts_are_ignored
  R7 default scale H^-0.5 (not D^-0.5)     test_bsa_forward_matches_oracle_fp32
  K1 softmax max of fresh keys only        round57_fp16::test_attention_ops_keep_fp16_scores_past_65504...
  K2 batch-1 cache matmul un-transposed    test_attn_lse::test_kv_cache_lse_matches_fp64
  K3 cond queries see one noisy key        test_kv_cache_attn::test_prefix_attn_matches_oracle
  K4 noisy queries miss the cond keys      test_prefix_attn_matches_oracle
  K5 fused path RoPE frame offset 0        test_kv_cache_equals_explicit_concat
  K6 GQA head h -> h % Hkv                 test_flash_attn_compat::test_gqa_mqa_dense_ops
  K7 prefix_len <= seq -> < seq            test_attn_lse::test_prefix_lse_matches_fp64
  K8 merge: both -inf guard dropped        equivalent: with the guard 1/(0+0) * 0 is NaN too; the dense cuDNN
                                           route merging it never has an lse of -inf
  K9 straddle fact from chunk_q            SURVIVED -> NEW test_cached_kv_straddle_fact_uses_the_key_chunk
  K10 lse log(den) -> log(den + 1e-30)     equivalent: den >= 1 (the max term is exp(0))
  K11 rotate-half RoPE frame offset 0      rope/test_rope_conventions::test_kv_cache_with_half_and_custom_rope
  P1 t/h/w split 2*round(D/6)              rope/test_rope::test_part_dims_and_tables_longhand
  P2 inv_freq exponent / (d + 2)           test_part_dims_and_tables_longhand
  P3 t table ignores frame_offset          test_part_dims_and_tables_longhand
  P4 rotation sign                         test_apply_rope_matches_longhand
  P5 RMSNorm eps fixed at 1e-6             round63_fuzz (only when it draws eps 1e-3) -> NEW
                                           test_qk_norm_uses_the_eps_it_is_given
  P6 weight multiplied before the cast     SURVIVED -> NEW test_rms_norm_multiplies_the_weight_after_the_cast
  P7 frame_offset + nf >= T refused        test_apply_rope_matches_longhand
  P8 qk_norm_rope offset 0                 rope/test_rope::test_qk_norm_rope
  P9 half pairs read the odd table lanes   equivalent: the tables hold each angle at both lanes of a pair
  P10 all-heads norm per head              test_rope_conventions::test_all_heads_norm_then_rope_is_wan
  P11 mixed norm kinds allowed             rope/test_rope_hostile::test_mixed_norm_kinds_raise_on_every_backend
  F1 scale floor dropped                   fp8_quant::test_reference_is_the_formula
  F2 clamp to +-448 dropped                equivalent: torch's e4m3fn cast saturates finite values to +-448
                                           and |y / s| <= 448 (1 + 2^-23)
  F3 adaLN (1 + scale) -> scale            test_reference_prologues_are_the_model_formulas
  F4 LayerNorm eps fixed                   test_reference_prologues_are_the_model_formulas
  F5 inf row scale not NaN                 round8_fp8::test_a_row_holding_inf_gets_a_nan_scale...
  F6 prologue y kept in fp32               SURVIVED -> NEW test_fp8_prologue_rounds_the_activation_to_the_input_dtype
  F7 scale floor 1e-12 -> 1e-20            SURVIVED -> NEW test_fp8_scale_floor_is_1e_12_over_448
  V1 sparsity < 1 -> <= 1                  test_input_validation::test_sparsity_out_of_range
  V2 cdf_threshold <= 1 -> < 1             test_selection_equals_oracle_exactly_fp32
  V3 chunk > grid -> >=                    test_input_validation::test_chunk_larger_than_grid
  V4 scale bound dropped                   round42_readme::test_scale_bound_in_error_and_readme...
  V5 counts bound max_sel (not min(., Nk)) SURVIVED (still raised, naming indices) -> NEW
                                           test_selection_counts_past_the_key_blocks_are_named_as_counts
  V6 v seq == k seq check dropped          SURVIVED -> NEW test_values_longer_than_the_keys_are_refused
  V7 eps >= 0 -> eps > 0                   SURVIVED -> NEW test_qk_norm_uses_the_eps_it_is_given (eps 0)
  V8 op-level grid_k (h, w) check dropped  SURVIVED -> NEW test_direct_op_call_with_grids_of_other_h_w_is_refused
  V9 api grid_k (h, w) check dropped       test_input_validation::test_grid_product_mismatch
  V10 non-empty seq check dropped          SURVIVED -> NEW test_empty_key_sequences_are_refused
  D1 auto on CPU may pick Triton           dispatch/test_dispatch::test_auto_table
  D2 interpreter dtype rule dropped        test_dispatch::test_interpreter_dtype_rule
  D3 BSA bwd head_dim > 256 -> >=          round5_kernels::test_bsa_training_past_the_triton_backward_head_dim...
  D4 ws BSA kernel for blocks <= 64        SURVIVED -> NEW test_dispatch_rules_at_their_edges
  D5 cuDNN head_dim % 8 dropped            round5_kernels::test_auto_sends_head_dims_cudnn_cannot_take_to_triton
  D6 env cuda replaces auto for every op   round3::test_backend_env_cuda_keeps_auto_for_ops_without_a_csrc_kernel
  D7 ws fwd + Triton bwd: key_segments     equivalent: block_sparse_attn's choice never has 2 key segments
  D8 sm90 kernels on capability != 9       SURVIVED -> NEW test_dispatch_rules_at_their_edges
  D9 fused KV head_dim > 256 -> >=         round5_kernels::test_cached_kv_past_the_fused_kernel_head_dim...
  T1 transpose_selection < counts -> <=    test_bsa_triton_kernels::test_deterministic_mode_bitwise
  T2 q block of a slot: perm % NQ          test_deterministic_mode_bitwise
  T3 transposed lists descending           test_bsa_triton_kernels::test_transpose_selection
"""

from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing.oracle import attention_oracle, bsa_token_mask

TRITON = pytest.param("triton", marks=pytest.mark.triton_interpret)


def _seed() -> int:
    """A fresh seed per test run, seeded into torch and returned for the assert messages."""
    s = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(s)
    return s


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_gating_rounds_the_pooled_means_to_the_input_dtype(backend):
    """SPEC 3 step 1 pools "in the input dtype" (DESIGN: fp32 sums, rounded to the input dtype). Two fp16 key
    blocks whose fp32 means differ by half an fp16 ulp round to the same mean: a tie, which goes to the lower
    block id. Mutant S9 (the mean kept in fp32) picked the higher block, and no test saw it."""
    seed = _seed()
    n_blocks = int(torch.randint(3, 7, ()).item())
    lo = int(torch.randint(0, n_blocks - 1, ()).item())  # the tie's lower block id
    hi = int(torch.randint(lo + 1, n_blocks, ()).item())
    c = float(2.0 ** int(torch.randint(-3, 4, ()).item()))  # exact power-of-two scale of the key values
    # key tokens: 2 per block along w; dim 0 decides the score (q's dim 1 is 0), dim 1 is noise
    k = torch.zeros(1, 1, 1, 2 * n_blocks, 1, 2)
    k[..., 0] = 0.25 * c  # every other block well below the two candidates
    k[:, :, :, 2 * lo: 2 * lo + 2, :, 0] = c  # mean c
    k[:, :, :, 2 * hi, :, 0] = c
    k[:, :, :, 2 * hi + 1, :, 0] = c * (1 + 2.0 ** -10)  # fp32 mean c * (1 + 2^-11): rounds to c in fp16
    k[..., 1] = torch.randn(k[..., 1].shape)
    k = k.reshape(1, 2 * n_blocks, 1, 2).half()
    q = torch.zeros(1, 2 * n_blocks, 1, 2)
    q[..., 0] = torch.rand(q[..., 0].shape) + 0.5  # positive: the larger key mean scores higher
    q = q.half()
    sel = lk.select_blocks(q, k, grid_q=(1, 1, 2 * n_blocks), chunk_q=(1, 1, 2), sparsity=1 - 1.5 / n_blocks,
                           backend=backend)
    assert torch.equal(sel.counts, torch.ones_like(sel.counts)), f"seed {seed}: {sel.counts}"
    picked = sel.indices[..., 0]
    assert (picked == lo).all(), (f"seed {seed}: blocks {lo} and {hi} tie in fp16 (the lower id wins), got "
                                  f"{picked.flatten().tolist()}")


# ---------------------------------------------------------------------------------------------- q/k RMSNorm
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_multiplies_the_weight_after_the_cast(dtype):
    """SPEC 6 step 4: normalise in fp32, cast to the input dtype, *then* multiply by the weight (in that dtype).
    Mutant P6 (the weight multiplied in fp32 before one final cast) rounds once instead of twice: within every
    tolerance, so no test saw it; the torch backend is exact here."""
    seed = _seed()
    B, S, H, D = 2, 5, 3, 32
    q, k = torch.randn(B, S, H, D).to(dtype), (3 * torch.randn(B, S, H, D)).to(dtype)
    wq, wk = (torch.rand(D) * 2).to(dtype), (torch.randn(D)).to(dtype)
    qo, ko = lk.qk_norm_rope(q, k, wq, wk, eps=1e-6, backend="torch")

    def spec(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * w

    for name, got, want in (("q", qo, spec(q, wq)), ("k", ko, spec(k, wk))):
        assert got.dtype == dtype
        bad = (got != want).sum().item()
        assert bad == 0, f"seed {seed}: {name}: {bad} of {got.numel()} elements differ from SPEC 6's double rounding"


# ------------------------------------------------------------------------------------------------ BSA reference
@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_bsa_never_hides_a_nan_from_non_finite_keys(backend):
    """NaN is never hidden (selection.py, SPEC 12): a query block whose selected keys all score -inf (an -inf
    key against a positive query) outputs NaN, not the zeros of an empty selection, and a +inf score gives a
    NaN lse, not +inf. Mutant R5 (a non-finite row max taken as 0) returned zeros / lse +inf, and no test saw
    it. The other query block, attending finite keys only, stays exact."""
    seed = _seed()
    B, H, D = 1, 2, 8
    grid, chunk = (1, 2, 4), (1, 2, 2)  # 2 blocks: tokens 0, 1, 4, 5 and 2, 3, 6, 7
    q = torch.rand(B, 8, H, D) + 0.5  # positive
    k, v = torch.randn(B, 8, H, D), torch.randn(B, 8, H, D)
    blk1 = [2, 3, 6, 7]
    sign = float("-inf") if torch.rand(()) < 0.5 else float("inf")
    k[:, blk1[int(torch.randint(0, 4, ()).item())]] = sign
    if sign < 0:
        k[:, blk1] = sign  # every key of block 1 scores -inf
    # query block 0 attends key block 1 only; query block 1 attends key block 0 only
    idx = torch.tensor([1, 0], dtype=torch.int32).view(1, 1, 2, 1).expand(B, H, 2, 1).contiguous()
    sel = lk.BlockSelection(idx, torch.ones(B, H, 2, dtype=torch.int32), grid, grid, chunk, chunk)
    out, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    blk0 = [0, 1, 4, 5]
    assert out[:, blk0].isnan().all(), f"seed {seed}: k={sign}: block 0 output {out[:, blk0]}"
    assert lse[:, :, blk0].isnan().all(), f"seed {seed}: k={sign}: block 0 lse {lse[:, :, blk0]}"
    mask = bsa_token_mask(sel.to_mask(), grid, grid, chunk, chunk)
    kf = torch.where(torch.isfinite(k), k, 0.0)  # block 1's queries never read the non-finite keys
    exp_out, exp_lse = attention_oracle(q, kf, v, mask)
    assert (out[:, blk1].double() - exp_out[:, blk1]).abs().max().item() < 1e-5, f"seed {seed}"
    assert (lse[:, :, blk1].double() - exp_lse[:, :, blk1]).abs().max().item() < 1e-5, f"seed {seed}"


# ------------------------------------------------------------------------------------------ cached-KV attention
def test_cached_kv_straddle_fact_uses_the_key_chunk():
    """``Facts.key_split_aligned`` (whether the warp-specialised BSA kernel may run [cache; fresh] keys: no key
    block straddles the cache end) is about *key* blocks: cache frames a multiple of ``chunk_k[0]``. Mutant K9
    (``chunk_q[0]`` used) called a 1-frame cache with 2-frame key blocks aligned, and no test saw it: on an H100
    that call would have gone to a kernel that needs the split aligned."""
    from longcat_kernels.ops.kv_cache_attn.api import BlockSparseParams, _split_aligned

    seed = _seed()
    ct_k = int(torch.randint(2, 5, ()).item())
    frames = int(torch.randint(1, 4 * ct_k, ()).item())
    kc = torch.zeros(1, frames * 12, 1, 8)
    bs = BlockSparseParams(chunk_q=(1, 2, 2), chunk_k=(ct_k, 2, 2), frame_hw=(3, 4))
    assert _split_aligned(kc, bs) == (frames % ct_k == 0), f"seed {seed}: {frames} frames, chunk_k t {ct_k}"
    bs_default = BlockSparseParams(chunk_q=(ct_k, 2, 2), frame_hw=(3, 4))  # chunk_k None: chunk_q
    assert _split_aligned(kc, bs_default) == (frames % ct_k == 0), f"seed {seed}"


# ---------------------------------------------------------------------------------------------- RMSNorm eps
@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_qk_norm_uses_the_eps_it_is_given(backend):
    """``eps`` reaches the norm (0 included: check_eps takes it). Mutant P5 (the norm adding 1e-6 whatever eps
    was) passed every test: they all ran at the default, or at eps too small to show."""
    seed = _seed()
    B, S, H, D = 2, 3, 2, 16
    q, k = 0.3 * torch.randn(B, S, H, D), 0.3 * torch.randn(B, S, H, D)
    wq, wk = torch.randn(D), torch.randn(D)
    for eps in (0.0, float(torch.rand(()) * 0.5 + 0.1)):
        qo, ko = lk.qk_norm_rope(q, k, wq, wk, eps=eps, backend=backend)
        for name, x, w, got in (("q", q, wq, qo), ("k", k, wk, ko)):
            want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * w.double()
            err = (got.double() - want).abs().max().item()
            assert err < 1e-5, f"seed {seed}: eps={eps}: {name} max abs err {err}"


# ------------------------------------------------------------------------------------------------------ fp8
def test_fp8_prologue_rounds_the_activation_to_the_input_dtype():
    """``y = LayerNorm_fp32(x).to(x.dtype)`` (and the adaLN one) is what the unfused model holds and what gets
    quantised; ``return_input`` returns it in x's dtype. Mutant F6 (y kept in fp32) passed every test (they
    compare in fp32 or with tolerances)."""
    seed = _seed()
    import torch.nn.functional as F

    x = torch.randn(2, 3, 5, 48).bfloat16()
    w, b = torch.randn(48).bfloat16(), torch.randn(48).bfloat16()
    q, s, y = lk.fp8_layer_norm_quantize(x, w, b, eps=1e-5, return_input=True, backend="torch")
    want = F.layer_norm(x.float(), (48,), w.float(), b.float(), 1e-5).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want), f"seed {seed}"
    amax = want.float().abs().amax(-1, keepdim=True)
    assert torch.equal(s, amax.clamp(min=1e-12) / 448), f"seed {seed}"
    assert torch.equal(q.float(), (want.float() / s).to(torch.float8_e4m3fn).float()), f"seed {seed}"
    shift, scale = torch.randn(2, 3, 1, 48), torch.randn(2, 3, 1, 48)
    _, _, ym = lk.fp8_modulate_quantize(x, shift, scale, eps=1e-6, return_input=True, backend="torch")
    wantm = (F.layer_norm(x.float(), (48,), eps=1e-6) * (1 + scale) + shift).to(torch.bfloat16)
    assert ym.dtype == torch.bfloat16 and torch.equal(ym, wantm), f"seed {seed}"


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_fp8_scale_floor_is_1e_12_over_448(backend):
    """``s = max(amax, 1e-12) / 448`` (the op's semantics): an all-zero row and rows below the floor get exactly
    ``1e-12 / 448``. Mutant F7 (floor 1e-20) passed every test: none had a row below 1e-12."""
    seed = _seed()
    x = torch.randn(6, 40)
    x[0] = 0.0
    x[1] *= 1e-14
    x[2] = 0.0
    x[2, int(torch.randint(0, 40, ()).item())] = -3e-13
    q, s = lk.fp8_quantize_rows(x, backend=backend)
    floor = torch.tensor(1e-12, dtype=torch.float32) / 448
    assert torch.equal(s[:3], floor.expand(3, 1)), f"seed {seed}: {s[:3].flatten().tolist()}"
    assert torch.equal(s[3:], x[3:].abs().amax(-1, keepdim=True) / 448), f"seed {seed}"
    assert torch.equal(q[0].float(), torch.zeros(40)), f"seed {seed}"


# ----------------------------------------------------------------------------------------------- validation
def test_selection_counts_past_the_key_blocks_are_named_as_counts():
    """A hand-built selection with ``max_sel > Nk`` and a count above Nk: the error names ``selection.counts``
    and the bound min(max_sel, Nk). Mutant V5 (bound max_sel) still raised, but about duplicated indices."""
    seed = _seed()
    grid, chunk = (1, 2, 4), (1, 2, 2)  # Nk = 2
    q = torch.randn(1, 8, 1, 8)
    idx = torch.tensor([[[[0, 1, 0], [1, 0, 1]]]], dtype=torch.int32)
    cnt = torch.tensor([[[3, 2]]], dtype=torch.int32)
    sel = lk.BlockSelection(idx, cnt, grid, grid, chunk, chunk)
    with pytest.raises(ValueError, match=r"selection\.counts: expected values in \[0, 2\].*got 3"):
        lk.block_sparse_attn(q, q, q, selection=sel, backend="torch")
    del seed


@pytest.mark.parametrize("op", ["block_sparse_attn", "prefix_attn", "attn_with_kv_cache"])
def test_values_longer_than_the_keys_are_refused(op):
    """v must have k's sequence length. Mutant V6 (the check dropped): all three ops returned an output from a
    longer v without a word (the BSA reference gathers v by key index: the extra values were never read), and no
    test saw it."""
    seed = _seed()
    extra = int(torch.randint(1, 5, ()).item())
    q, k = torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    v = torch.randn(1, 16 + extra, 2, 8)
    call = {"block_sparse_attn": lambda: lk.block_sparse_attn(q, k, v, grid_q=(1, 4, 4), chunk_q=(1, 2, 2),
                                                              sparsity=0.5, backend="torch"),
            "prefix_attn": lambda: lk.prefix_attn(q, k, v, 4, backend="torch"),
            "attn_with_kv_cache": lambda: lk.attn_with_kv_cache(q, k, v, backend="torch")}[op]
    with pytest.raises(ValueError, match=rf"v: expected seq 16 \(same as k\), got {16 + extra}"):
        call()
    del seed


def test_direct_op_call_with_grids_of_other_h_w_is_refused():
    """The registered Triton ops check the block geometry themselves (a direct ``torch.ops`` call): grid_k must
    have grid_q's (h, w), or the kernels place key tokens on the wrong grid. Mutant V8 (that check dropped)
    passed every test."""
    pytest.importorskip("triton")
    import importlib

    importlib.import_module("longcat_kernels.ops.block_sparse_attn.triton")
    q = torch.randn(1, 16, 1, 16)
    with pytest.raises(ValueError, match=r"bsa_pool_scores: grid_k: expected grid_q's \(h, w\) \[4, 4\]"):
        torch.ops.longcat_kernels.bsa_pool_scores(q, q, [1, 4, 4], [1, 2, 8], [1, 2, 2], [1, 2, 2])


def test_empty_key_sequences_are_refused():
    """Attention over zero keys has no softmax to take: check_qkv refuses an empty q or k, naming
    both. Mutant V10 (that check dropped) passed every test: ``attn_with_kv_cache`` with an empty k then returned
    an output (no key attended) without a word, and ``prefix_attn`` of an empty sequence failed with an
    IndexError."""
    q = torch.randn(1, 4, 2, 8)
    k0 = torch.randn(1, 0, 2, 8)
    with pytest.raises(ValueError, match=r"q/k: expected non-empty sequences, got seq_q=4, seq_k=0"):
        lk.attn_with_kv_cache(q, k0, k0, backend="torch")
    with pytest.raises(ValueError, match=r"q/k: expected non-empty sequences, got seq_q=0, seq_k=0"):
        lk.prefix_attn(k0, k0, k0, 0, backend="torch")


# ------------------------------------------------------------------------------------------------- dispatch
def test_dispatch_rules_at_their_edges():
    """Rules of ``choose_kernel`` that no test reached at their edge (each mutant passed the dispatch tests):
    D4: the warp-specialised BSA kernel takes 64-token query and key blocks only: ``== (64, 64)`` -> ``<= 64``
        sent 32-token blocks to it. D8: the sm_90a kernels run on compute capability 9.x only: ``!= 9`` ->
        ``< 9`` sent a 10.0 GPU (where their build is a trap) to them."""
    from longcat_kernels.dispatch import Facts, choose_kernel

    f = Facts()
    for bt in ((32, 32), (64, 32), (32, 64), (16, 16), (8, 64)):
        for req in ("cuda", "auto"):
            c = choose_kernel("block_sparse_attn", f._replace(block_sparse=True, block_tokens=bt), req)
            assert c.impl != "csrc_sm90_ws", (bt, req, c)
        assert choose_kernel("block_sparse_attn", f._replace(block_sparse=True, block_tokens=bt), "cuda").impl == \
            "csrc_sm90"
    for cap in ((10, 0), (12, 0), (8, 9)):
        c = choose_kernel("prefix_attn", f._replace(capability=cap), "cuda")
        assert c.impl == "csrc_sm80", (cap, c)
        with pytest.raises(lk.BackendUnavailableError, match="sm_90a kernels only"):
            choose_kernel("prefix_attn", f._replace(capability=cap, csrc_kernels=("sm90_ws", "sm90")), "cuda")
