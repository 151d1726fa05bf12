"""pytest-benchmark cases of the `bsa` suite (see bench/suites/bsa.py)."""

SUITE = "bsa"


def test_bsa(benchmark, bench_run, bench_case):
    bench_run(bench_case)
