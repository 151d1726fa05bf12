"""Benchmark suites and the machinery they share.

A suite module exposes ``NAME``, ``cases(ctx) -> list[Case]`` (used by the CLI and by pytest-benchmark
alike), ``finish(ctx, rows) -> rows`` (derived columns: speedups, MFU) and ``table(rows) -> str``.
Every case checks parity once before it is timed; a case whose check fails (or is not finite) is
reported as ``parity-failed`` with no timing, and the CLI exits non-zero.
"""

from __future__ import annotations

import gc
import importlib
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.shapes import COND_FRAMES, SPARSITIES, Grid
from bench.timing import TimingPolicy, measure

SUITES = ("cache", "bsa", "cached-attn", "pipeline")
_MODULES = {"cache": "bench.suites.cache", "bsa": "bench.suites.bsa",
            "cached-attn": "bench.suites.cached_attn", "pipeline": "bench.suites.pipeline"}

# rel. L2 bound per compute dtype for parity checks (common.md / METHOD.md)
REL_L2_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def load_suite(name: str):
    if name not in _MODULES:
        raise ValueError(f"suite: expected one of {list(_MODULES)}, got {name!r}")
    return importlib.import_module(_MODULES[name])


@dataclass
class Context:
    """What a suite needs to know about this run."""

    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    grids: list[Grid] | None = None  # --shapes; None = the suite's defaults
    backends: list[str] | None = None  # --backends; None = every available (suite decides)
    depth: int | None = None  # --depth (DiT suites)
    cond_frames: tuple[int, ...] = COND_FRAMES
    sparsities: tuple[float, ...] = SPARSITIES
    budget: float = 1.0  # multiplies every case's timing budget
    seed: int = 0
    peak_tflops: float | None = None  # measured matmul peak of this run (MFU denominator)
    log: Callable[[str], None] = print
    shared: dict = field(default_factory=dict)  # objects reused across cases (models), freed per suite

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def policy(self, *, warmup: int = 2, min_reps: int = 5, max_reps: int = 100, budget_s: float = 1.0) -> TimingPolicy:
        if self.quick:
            return TimingPolicy(warmup=1, min_reps=2, max_reps=3, budget_s=0.05)
        if not self.is_cuda:  # CPU runs are a demonstration: keep them near a minute per suite
            min_reps, warmup = min(min_reps, 3), min(warmup, 1)
        return TimingPolicy(warmup=warmup, min_reps=min_reps, max_reps=max_reps, budget_s=budget_s * self.budget)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed + offset)

    def free(self) -> None:
        self.shared.clear()
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()


@dataclass
class Prepared:
    """A case ready to run: the timed function, its rotating inputs, and its parity check."""

    fn: Callable
    inputs: list[tuple]
    # returns (rel_l2, tol); raising or a non-finite/over-tolerance value refuses the case
    check: Callable[[], tuple[float, float]] | None
    flops: float | None = None  # FLOPs of one call (effective for sparse cases)
    extra: dict = field(default_factory=dict)  # more columns (memory, dense-equivalent FLOPs, ...)
    policy: TimingPolicy | None = None


@dataclass
class Case:
    suite: str
    name: str
    backend: str
    params: dict
    prepare: Callable[[], Prepared]
    skip: str | None = None  # reason this case cannot run here

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.name}/{self.backend}"


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; inf when out has a NaN/inf or shapes differ."""
    if out.shape != ref.shape:
        return math.inf
    o = out.detach().double()
    r = ref.detach().double()
    if not bool(torch.isfinite(o).all()):
        return math.inf
    num = torch.linalg.vector_norm(o - r)
    den = torch.linalg.vector_norm(r)
    return float(num / den) if float(den) > 0 else float(num)


def run_case(ctx: Context, case: Case, default_policy: TimingPolicy | None = None) -> dict:
    """Prepare, check parity once, then time ``case``; returns a result row (never raises)."""
    row = {"suite": case.suite, "case": case.name, "backend": case.backend, **case.params}
    if case.skip:
        row.update(status="skipped", reason=case.skip)
        return row
    prepared = None
    try:
        prepared = case.prepare()
        if prepared.check is not None:
            err, tol = prepared.check()
            row.update(rel_l2=err, tol=tol)
            if not (math.isfinite(err) and err <= tol):
                row.update(status="parity-failed", reason=f"rel. L2 {err:.3g} > tol {tol:.3g}")
                return row
        policy = prepared.policy or default_policy or ctx.policy()
        t = measure(prepared.fn, prepared.inputs, ctx.device, policy)
        row.update(status="ok", ms=t.median_ms, ms_min=t.min_ms, ms_p20=t.p20_ms, ms_p80=t.p80_ms,
                   spread=t.spread, runs=t.runs, timer=t.method)
        if prepared.flops:
            row.update(gflop=prepared.flops / 1e9, tflops=prepared.flops / (t.median_ms * 1e-3) / 1e12)
        row.update(prepared.extra)
    except Exception as e:  # one broken case must not stop the run; it is reported as an error
        row.update(status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        del prepared
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    return row


def fmt(v, spec: str = ".3g", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain monospace table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)
