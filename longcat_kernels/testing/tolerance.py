"""The tolerance rule (STYLE.md, after FlashAttention).

A kernel's error against an fp64/fp32 oracle must be at most ``factor`` (2 for outputs, 3 for
gradients) times the error of PyTorch itself computing the same thing in the low precision
(the ``baseline``), plus a small per-dtype ``floor``. Errors are relative L2 norms; NaN never passes.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["FLOORS", "rel_l2", "max_abs", "assert_close", "check_close", "floor_for"]

# additive floor of the rule, per dtype of the tensor under test (relative L2)
FLOORS = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}
TF32_FLOOR = 3e-4


def floor_for(dtype: torch.dtype, tf32: bool = False) -> float:
    if tf32 and dtype == torch.float32:
        return TF32_FLOOR
    return FLOORS.get(dtype, 1e-5)


def _finite_pair(actual: torch.Tensor, expected: torch.Tensor):
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    return a, e


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_2 / ||expected||_2`` in fp64 over entries finite in ``expected``
    (infinite entries must match exactly and are excluded); NaN anywhere in actual -> nan."""
    a, e = _finite_pair(actual, expected)
    if torch.isnan(a).any():
        return float("nan")
    fin = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), fin) or not torch.equal(a[~fin], e[~fin]):
        return float("inf")
    a, e = a[fin], e[fin]
    num = torch.linalg.vector_norm(a - e)
    den = torch.linalg.vector_norm(e)
    if den == 0:
        return float(num)
    return float(num / den)


def max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = _finite_pair(actual, expected)
    fin = torch.isfinite(e) & torch.isfinite(a)
    if not fin.any():
        return 0.0
    return float((a[fin] - e[fin]).abs().max())


def check_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    baseline: Optional[torch.Tensor] = None,
    *,
    factor: float = 2.0,
    floor: Optional[float] = None,
    tf32: bool = False,
    name: str = "output",
) -> Optional[str]:
    """None if ``actual`` passes the rule, else the failure message (see ``assert_close``)."""
    # a NaN factor or floor made every check fail as "rel L2 ... > tol nan": reported as the kernel's
    # inaccuracy, not the test's argument
    # an inf factor or floor made the tolerance inf: every finite output passed, silently
    for arg, val in (("factor", factor), ("floor", floor)):
        if val is not None and not 0.0 <= float(val) < float("inf"):
            raise ValueError(f"{arg}: expected a finite number >= 0, got {val!r}")
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return f"{name}: expected tensors, got {type(actual).__name__} and {type(expected).__name__}"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    n_nan = int(torch.isnan(actual.detach()).sum())
    if n_nan:
        return f"{name}: {n_nan} NaN of {actual.numel()} entries (dtype {actual.dtype})"
    n_nan = int(torch.isnan(expected.detach()).sum())
    if n_nan:  # was "rel L2 inf > tol": the kernel blamed for the reference's NaN
        return f"{name}: the expected (reference) tensor has {n_nan} NaN of {expected.numel()} entries"
    if floor is None:
        floor = floor_for(actual.dtype, tf32)
    err = rel_l2(actual, expected)
    base = 0.0
    if baseline is not None:
        if tuple(baseline.shape) != tuple(expected.shape):  # was reported as "the baseline itself is NaN/inf"
            return f"{name}: baseline shape {tuple(baseline.shape)} != expected {tuple(expected.shape)}"
        base = rel_l2(baseline, expected)
        if base != base or base == float("inf"):
            return f"{name}: the baseline itself is NaN/inf against the reference (rel L2 {base})"
        # a baseline that computes something else (wrong mask, zeros) made tol >= 1: an all-zero output passed
        if factor * base >= 1.0:
            return (f"{name}: the baseline is too far from the reference (rel L2 {base:.3e}; {factor} x it >= 1 "
                    f"would pass an all-zero output): it does not compute the same thing")
    tol = factor * base + floor
    if not err <= tol:
        return (
            f"{name}: rel L2 {err:.3e} > tol {tol:.3e} (= {factor} x baseline {base:.3e} + floor {floor:.1e}); "
            f"max abs {max_abs(actual, expected):.3e}; dtype {actual.dtype}, shape {tuple(actual.shape)}"
        )
    return None


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    baseline: Optional[torch.Tensor] = None,
    *,
    factor: float = 2.0,
    floor: Optional[float] = None,
    tf32: bool = False,
    name: str = "output",
) -> float:
    """Asserts ``rel_l2(actual, expected) <= factor * rel_l2(baseline, expected) + floor``.

    Args:
        actual: the tensor under test (kernel output or gradient).
        expected: the oracle (fp64 preferred; see ``oracle.py``).
        baseline: torch computing the same in the low precision (e.g. ``attention_lowp``), or None
            to use the floor alone.
        factor: 2.0 for outputs, 3.0 for gradients.
        floor: additive floor; default per ``actual.dtype`` (``FLOORS``; ``TF32_FLOOR`` if tf32).
        name: used in the message.

    Returns:
        The relative L2 error. Raises AssertionError with err, tol, baseline and max abs error.
    """
    msg = check_close(actual, expected, baseline, factor=factor, floor=floor, tf32=tf32, name=name)
    if msg is not None:
        raise AssertionError(msg)
    return rel_l2(actual, expected)
