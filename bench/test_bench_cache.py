"""pytest-benchmark cases of the `cache` suite (see bench/suites/cache.py)."""

SUITE = "cache"


def test_cache(benchmark, bench_run, bench_case):
    bench_run(bench_case)
