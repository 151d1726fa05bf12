"""pytest-benchmark entry: `pytest bench/ --benchmark-only` runs the suites' cases.

The same cases as `python -m bench` (bench/suites/), one test per case: parity is checked once
(a failure fails the test and nothing is timed), then pytest-benchmark times rounds of the case
with rotating inputs. On CUDA every round ends with a synchronize (so the wall time is the device
time) and the CUDA-event median is stored in the benchmark's extra_info. On CPU, or with
--bench-quick, the tiny shapes of `python -m bench --quick` are used.
"""

from __future__ import annotations

import math
import re
import statistics

import pytest
import torch

_CTX = {}


def pytest_addoption(parser):
    group = parser.getgroup("longcat-bench")
    group.addoption("--bench-quick", action="store_true", help="tiny shapes (default on CPU)")
    group.addoption("--bench-full", action="store_true", help="the real shapes even on CPU (slow)")
    group.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when available)")
    group.addoption("--bench-backends", default=None, help="comma-separated kernel backends")
    group.addoption("--bench-depth", type=int, default=None, help="DiT depth of the cache/pipeline cases")


def bench_context(config):
    """One Context per session, shared by collection (case lists) and the tests."""
    if "ctx" not in _CTX:
        from bench.suites import Context

        dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(dev)
        quick = config.getoption("--bench-quick") or (device.type == "cpu" and not config.getoption("--bench-full"))
        backends = config.getoption("--bench-backends")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        _CTX["ctx"] = Context(
            device=device,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            quick=quick,
            backends=[b for b in backends.split(",") if b] if backends else None,
            depth=config.getoption("--bench-depth"),
            log=lambda msg: None,
        )
    return _CTX["ctx"]


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    from bench.suites import load_suite

    suite = getattr(metafunc.module, "SUITE")
    ctx = bench_context(metafunc.config)
    try:
        cases = load_suite(suite).cases(ctx)
        ids = [re.sub(r"[^A-Za-z0-9_.+-]+", "-", c.id) for c in cases]
    except Exception as e:  # reported by the test, not as a collection crash
        cases, ids = [e], [f"{suite}-unavailable"]
    metafunc.parametrize("bench_case", cases, ids=ids)


@pytest.fixture
def bench_ctx(request):
    return bench_context(request.config)


def run_benchmark(benchmark, ctx, case):
    """Check parity once, then time ``case`` with pytest-benchmark."""
    if isinstance(case, Exception):
        pytest.fail(f"cannot build the cases: {type(case).__name__}: {case}")
    if case.skip:
        pytest.skip(case.skip)
    prepared = case.prepare()
    if prepared.check is not None:
        err, tol = prepared.check()
        assert math.isfinite(err) and err <= tol, f"{case.id}: parity failed, rel. L2 {err:.3g} > {tol:.3g}"
        benchmark.extra_info["rel_l2"] = err
    policy = prepared.policy or ctx.policy()
    fn, inputs, n = prepared.fn, prepared.inputs, len(prepared.inputs)
    cuda = ctx.device.type == "cuda"
    # warm-up outside pytest-benchmark (compilation, autotuning)
    for i in range(max(policy.warmup, 1)):
        fn(*inputs[i % n])
    if cuda:
        torch.cuda.synchronize()
    events = []
    it = iter(range(1 << 30))

    def setup():
        return inputs[next(it) % n], {}

    def target(*args):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(*args)
            e.record()
            torch.cuda.synchronize()
            events.append((s, e))
        else:
            fn(*args)

    rounds = max(policy.min_reps, 1) if ctx.quick else policy.min_reps * 2
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({k: v for k, v in case.params.items() if isinstance(v, (int, float, str))})
    benchmark.extra_info["backend"] = case.backend
    if events:
        # statistics.median: ms[n // 2] was the upper of the two middle runs for an even n (the default)
        benchmark.extra_info["cuda_event_median_ms"] = statistics.median(s.elapsed_time(e) for s, e in events)
    if prepared.flops:
        benchmark.extra_info["gflop"] = prepared.flops / 1e9


@pytest.fixture
def bench_run(benchmark, bench_ctx):
    """``bench_run(case)``: parity check, then pytest-benchmark timing of ``case``."""
    return lambda case: run_benchmark(benchmark, bench_ctx, case)
