"""Round 33: the public test helpers (longcat_kernels.testing) must not let a wrong output pass."""

import math

import pytest
import torch

from longcat_kernels.testing import (
    attention_lowp,
    attention_oracle,
    check_close,
    make_qkv,
    make_video_qkv,
    prefix_mask,
)


@pytest.mark.parametrize("kw", [dict(factor=float("inf")), dict(floor=float("inf"))])
def test_check_close_refuses_an_infinite_tolerance(kw):
    """An inf ``factor`` (with a baseline) or ``floor`` made tol inf: an all-zero output passed."""
    e = torch.randn(64, dtype=torch.float64)
    base = (e + 1e-3 * torch.randn_like(e)).float()
    with pytest.raises(ValueError, match=r"expected a finite number >= 0, got inf"):
        check_close(torch.zeros(64), e, base, **kw)


def test_check_close_fails_a_zero_output_against_a_baseline_of_another_computation():
    """A baseline that computes something else (wrong mask, zeros) has rel L2 ~1 against the oracle:
    tol = 2 x 1 + floor passed an all-zero kernel output, silently."""
    q, k, v = make_qkv(1, 16, 2, 8, dtype=torch.bfloat16)
    mask = torch.rand(16, 16) < 0.5
    mask[:, 0] = True
    exp, _ = attention_oracle(q, k, v, mask)
    wrong_base = attention_lowp(q, k, v, ~mask)  # the complementary mask: not the same computation
    msg = check_close(torch.zeros_like(q), exp, wrong_base)
    assert msg is not None and "baseline is too far from the reference" in msg
    msg = check_close(torch.zeros_like(q), exp, torch.zeros_like(q))
    assert msg is not None and "baseline is too far" in msg
    # the right baseline still gives a tolerance the real computation meets, and zeros fail it
    good = attention_lowp(q, k, v, mask)
    assert check_close(good, exp, good) is None
    assert "rel L2" in check_close(torch.zeros_like(q), exp, good)


@pytest.mark.parametrize("p", [-1, 17, 2.5, True])
def test_prefix_mask_refuses_a_prefix_outside_the_sequence(p):
    """A negative or too long prefix gave an all-True mask (plain attention, not the cond/noisy rule),
    a fractional one a mask where row 2 of prefix 2.5 saw 3 columns: the oracle of a rule no kernel has."""
    with pytest.raises((ValueError, TypeError), match="prefix_len"):
        prefix_mask(16, p)


def test_prefix_mask_matches_the_rule_written_out():
    """SPEC 4: cond rows (< p) see cond columns only; noisy rows see everything."""
    S = int(torch.randint(4, 12, ()))
    for p in (0, 1, S // 2, S):
        m = prefix_mask(S, p)
        want = torch.tensor([[(r >= p) or (c < p) for c in range(S)] for r in range(S)])
        assert torch.equal(m, want)


@pytest.mark.parametrize("corr", [(1.4, 1.4, 1.4), (2.5, 2.5, 2.5), (3.4, 1.2, 5.3)])
def test_video_qkv_has_the_grid_s_token_count_for_fractional_correlation_lengths(corr):
    """The coarse lattice was sized by the unrounded corr: with round(c) < c it came out shorter than
    the grid and q, k, v had 729 tokens for a 10x10x10 grid, silently."""
    grid, grid_k = (9, 10, 11), (13, 10, 11)
    q, k, v = make_video_qkv(1, grid, 2, 8, grid_k=grid_k, corr=corr)
    assert q.shape == (1, math.prod(grid), 2, 8)
    assert k.shape == v.shape == (1, math.prod(grid_k), 2, 8)
    assert torch.isfinite(q).all() and abs(float(q.float().std()) - 1.0) < 1e-3


def test_check_selection_refuses_a_cdf_count_far_past_the_threshold():
    """A cdf count that differs from the oracle's was allowed when EITHER end of the gap was within
    cdf_atol of the threshold: a selection of all 8 key blocks passed where the oracle keeps 1 (its
    2nd cumulative sum being near the threshold). Now the whole gap must lie within cdf_atol."""
    import longcat_kernels as lk
    from longcat_kernels.testing import check_selection, selection_oracle

    gq, gk, ch = (2, 2, 2), (16, 2, 2), (2, 2, 2)
    while True:
        q = torch.randn(1, 8, 1, 16)
        k = torch.randn(1, 64, 1, 16)
        _, s, _ = selection_oracle(q, k, gq, gk, ch, ch, None, None)
        cdf = torch.cumsum(torch.softmax(s / 4.0, -1).sort(-1, descending=True).values, -1).flatten()
        if cdf[1] - cdf[0] > 0.02 and cdf[2] - cdf[1] > 0.02:
            break
    thr = float(cdf[1]) - 0.004  # the oracle keeps 1 block; the 2nd is within cdf_atol of the threshold
    kw = dict(grid_q=gq, grid_k=gk, chunk_q=ch, chunk_k=ch)
    assert int(selection_oracle(q, k, gq, gk, ch, ch, None, thr)[2]) == 1
    every = lk.select_blocks(q, k, sparsity=None, cdf_threshold=1.0, backend="torch", **kw)
    assert int(every.counts) == 8
    msg = check_selection(every, q, k, None, thr, cdf_atol=1e-2)
    assert msg is not None and "counts" in msg
    two = lk.select_blocks(q, k, sparsity=0.75, backend="torch", **kw)  # the top 2: a near-threshold count
    assert int(two.counts) == 2 and check_selection(two, q, k, None, thr, cdf_atol=1e-2) is None
    one = lk.select_blocks(q, k, sparsity=None, cdf_threshold=thr, backend="torch", **kw)
    assert check_selection(one, q, k, None, thr, cdf_atol=1e-2) is None
