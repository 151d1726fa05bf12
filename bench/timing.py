"""Timing: CUDA events after warm-up (GPU) or perf_counter (CPU), median of many runs, rotating inputs.

Every timing reports its median, its minimum and its spread, ``(p80 - p20) / median`` (the width
of the middle 60% of the runs relative to the median): on a loaded or clock-throttled machine the
spread grows, and tables mark such a case (``SPREAD_MARK``) so that its noise is not read as a
result.

The number of timed runs adapts to the measured cost of one call so that a whole suite fits a time
budget: ``reps = clamp(budget_s / t_call, min_reps, max_reps)``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call statistics in milliseconds."""

    median_ms: float
    min_ms: float
    mean_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    method: str
    spread: float  # (p80 - p20) / median; 0 for one run


    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TimingPolicy:
    """How long and how often to time one case."""

    warmup: int = 2  # untimed calls before timing (compilation, autotuning, allocator warm-up)
    min_reps: int = 5
    max_reps: int = 100
    budget_s: float = 2.0  # wall time to spend on timed runs of one case

    def __post_init__(self):
        # min_reps 0 timed no run once a call outlasted the budget: a ValueError about "times_ms" after the
        # work; max_reps < min_reps ran min_reps; a NaN budget raised in int() after the warm-up
        for name in ("warmup", "min_reps", "max_reps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}: expected an int, got {v!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup: expected >= 0 (0: the caller warmed up already), got {self.warmup}")
        if self.min_reps < 1:
            raise ValueError(f"min_reps: expected >= 1 timed run, got {self.min_reps}")
        if self.max_reps < self.min_reps:
            raise ValueError(f"max_reps: expected >= min_reps ({self.min_reps}), got {self.max_reps}")
        if not (isinstance(self.budget_s, (int, float)) and math.isfinite(self.budget_s) and self.budget_s >= 0):
            raise ValueError(f"budget_s: expected a finite number of seconds >= 0, got {self.budget_s!r}")

    def reps_for(self, est_s: float) -> int:
        if est_s <= 0:
            return self.max_reps
        return max(self.min_reps, min(self.max_reps, int(self.budget_s / est_s)))


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_vals: list[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


# A case whose spread is above this is marked in every table: its median moves by about as much
# between runs as the differences the tables are read for (a few percent between backends).
SPREAD_LIMIT = 0.10
SPREAD_MARK = "~"
SPREAD_LEGEND = (f"ms: median of the runs; {SPREAD_MARK} after a time: its spread (p80 - p20) / median is "
                 f"above {SPREAD_LIMIT:.0%}, so differences of that size are noise (a loaded machine, clock "
                 "changes); min and spread of every row are in the JSON/CSV")


def _spread(median: float, p20: float, p80: float) -> float:
    return (p80 - p20) / median if median > 0 else 0.0


def row_spread(row: dict) -> float | None:
    """The spread of a result row (``spread``, or from ``ms_p20``/``ms_p80`` of older files)."""
    if row.get("spread") is not None:
        return float(row["spread"])
    if all(isinstance(row.get(k), (int, float)) for k in ("ms", "ms_p20", "ms_p80")):
        return _spread(row["ms"], row["ms_p20"], row["ms_p80"])
    return None


def ms_cell(row: dict, spec: str = ".2f", key: str = "ms") -> str:
    """``row[key]`` formatted, with ``SPREAD_MARK`` appended when the row's spread is large."""
    v = row.get(key)
    if not isinstance(v, (int, float)):
        return "-"
    sp = row_spread(row)
    return format(v, spec) + (SPREAD_MARK if sp is not None and sp > SPREAD_LIMIT else "")


def summarize(times_ms: Sequence[float], method: str) -> Timing:
    if not times_ms:
        raise ValueError("times_ms: expected at least one measurement, got none")
    s = sorted(float(t) for t in times_ms)
    return Timing(
        median_ms=statistics.median(s),
        min_ms=s[0],
        mean_ms=statistics.fmean(s),
        p20_ms=_percentile(s, 0.2),
        p80_ms=_percentile(s, 0.8),
        runs=len(s),
        method=method,
        spread=_spread(statistics.median(s), _percentile(s, 0.2), _percentile(s, 0.8)),
    )


def _time_once_s(fn: Callable, args: tuple, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - t0


def measure(
    fn: Callable,
    inputs: Sequence[tuple],
    device: torch.device | str,
    policy: TimingPolicy = TimingPolicy(),
) -> Timing:
    """Time ``fn(*inputs[i % len(inputs)])``; returns per-call statistics.

    Args:
        fn: the work to time; its result is discarded.
        inputs: one or more argument tuples, rotated between calls so repeated runs do not measure a
            warm cache holding the previous call's data.
        device: where ``fn`` runs. CUDA: each call is bracketed by CUDA events (device time from the
            first enqueued kernel to the last, host gaps included); CPU: ``time.perf_counter``.
        policy: warm-up calls and the repetition budget.
    """
    if not inputs:
        raise ValueError("inputs: expected at least one argument tuple, got an empty sequence")
    device = torch.device(device)
    n = len(inputs)
    cuda = device.type == "cuda"
    # warm-up: every input set at least once, the last call timed to size the repetitions
    # warmup=0: the caller warmed up already (e.g. its parity check ran the same work); the first timed
    # run sizes the repetitions (an estimate of 0 s gave max_reps whatever a call cost: the budget ignored)
    est = 0.0
    for i in range(max(policy.warmup, n) if policy.warmup > 0 else 0):
        est = _time_once_s(fn, inputs[i % n], device)
    first: list[float] = []
    if policy.warmup <= 0:
        synchronize(device)
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(*inputs[0])
            e.record()
            synchronize(device)
            first.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn(*inputs[0])
            first.append((time.perf_counter() - t0) * 1e3)
        est = first[0] * 1e-3
    done = len(first)
    reps = policy.reps_for(est) - done
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        synchronize(device)
        for i in range(reps):
            args = inputs[(i + done) % n]
            starts[i].record()
            fn(*args)
            ends[i].record()
        synchronize(device)
        return summarize(first + [s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda-events")
    times = list(first)
    for i in range(reps):
        args = inputs[(i + done) % n]
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, "perf_counter")


def interleaved(
    fns: dict[str, Callable],
    inputs: Sequence[tuple],
    device: torch.device | str,
    policy: TimingPolicy,
    rounds: int,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Time several functions side by side: each round times every function once (``measure``, in
    order), so drift of the clock or of other load spreads over all of them; returns the median
    over rounds of each function's median and the per-round medians, both keyed by name."""
    if rounds < 1:
        raise ValueError(f"rounds: expected >= 1, got {rounds}")
    per: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(measure(fn, inputs, device, policy).median_ms)
    return {name: statistics.median(v) for name, v in per.items()}, per


def ab_parser(doc: str, *, budget: float, cases: str, cases_help: str | None = None):
    """The options every side-by-side dev script (``bench/dev/*_gpu.py`` A/B runs) takes: ``--out``,
    ``--rounds``, ``--budget`` (seconds per timed function per round), ``--cases``."""
    import argparse  # noqa: PLC0415
    import math  # noqa: PLC0415

    # refused at parse time: --rounds 0 raised in interleaved() after the inputs were built, a NaN budget
    # in int() inside reps_for after the warm-up
    def rounds_type(text):
        n = int(text)
        if n < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
        return n

    def budget_type(text):
        x = float(text)
        if not (math.isfinite(x) and x >= 0):
            raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
        return x

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=rounds_type, default=3)
    p.add_argument("--budget", type=budget_type, default=budget, help="seconds per timed function per round")
    p.add_argument("--cases", default=cases, help=cases_help)
    return p


def ab_results(shape: dict) -> dict | None:
    """The results skeleton of such a script with ``bench.machine``'s header (date, commit,
    versions, driver, clocks); None, after saying why on stderr, without a CUDA GPU."""
    import sys  # noqa: PLC0415

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return None
    from bench.machine import machine_header  # noqa: PLC0415

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "machine": machine_header("cuda"),
            "shape": shape, "cases": []}


def matmul_peak_tflops(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    n: int = 8192,
    policy: TimingPolicy = TimingPolicy(warmup=3, min_reps=10, max_reps=50, budget_s=1.0),
) -> tuple[float, Timing]:
    """Measured dense matmul rate ``2 n^3 / t`` (TFLOP/s), the MFU denominator of this run."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    sets = [
        (torch.randn(n, n, device=device, dtype=dtype, generator=gen),
         torch.randn(n, n, device=device, dtype=dtype, generator=gen))
        for _ in range(2)
    ]
    t = measure(torch.matmul, sets, device, policy)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12, t
