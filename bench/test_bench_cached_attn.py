"""pytest-benchmark cases of the `cached-attn` suite (see bench/suites/cached_attn.py)."""

SUITE = "cached-attn"


def test_cached_attn(benchmark, bench_run, bench_case):
    bench_run(bench_case)
