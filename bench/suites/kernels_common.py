"""Shared helpers of the kernel suites: backend lists, head-sliced parity, input sizing."""

from __future__ import annotations

import torch

from bench.suites import REL_L2_TOL, Case

# bytes of one input set above which rotating several sets buys nothing (far beyond any L2)
_ROTATE_LIMIT = 256 * 2**20


def kernel_backends(ctx, op: str) -> list[tuple[str, str | None]]:
    """``[(backend, skip_reason_or_None)]`` to time for ``op``.

    Default: on GPU every available compiled backend (triton, cuda) and not the torch reference
    (minutes at real shapes); on CPU the torch reference. ``--backends`` picks explicitly (an
    unavailable one is reported as skipped with the reason, never silently replaced)."""
    from longcat_kernels import available_backends

    avail = available_backends(op, ctx.device.type)
    if ctx.backends:
        out = []
        for b in ctx.backends:
            reason = None if b == "auto" else avail.get(b, f"unknown backend {b!r}")
            out.append((b, reason))
        return out
    if ctx.is_cuda:
        found = [(b, None) for b in ("triton", "cuda") if avail.get(b) is None]
        return found or [("torch", None)]
    return [("torch", None)]


def n_input_sets(nbytes_one_set: int) -> int:
    """Rotate 3 input sets unless one set is already far larger than the L2 cache."""
    return 1 if nbytes_one_set > _ROTATE_LIMIT else 3


def tol(dtype: torch.dtype) -> float:
    return REL_L2_TOL.get(dtype, 1e-2)


def heads_for_check(ctx, heads: int) -> int:
    """Heads compared against the fp32 reference: all on CPU, 2 on GPU (the reference is slow)."""
    return heads if not ctx.is_cuda else min(heads, 2)


def skipped(suite: str, name: str, backend: str, params: dict, reason: str) -> Case:
    return Case(suite, name, backend, params, prepare=lambda: None, skip=reason)


def randn_bshd(ctx, b: int, s: int, h: int, d: int, gen: torch.Generator, requires_grad: bool = False):
    """Random normal ``[b, s, h, d]`` in ``ctx.dtype``: the tests' input factory (drawn in fp32, cast)."""
    from longcat_kernels.testing import make_tensor

    return make_tensor((b, s, h, d), ctx.dtype, ctx.device, requires_grad=requires_grad, generator=gen)
