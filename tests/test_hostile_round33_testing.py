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
