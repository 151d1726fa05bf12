"""pytest-benchmark cases of the `pipeline` suite (see bench/suites/pipeline.py)."""

SUITE = "pipeline"


def test_pipeline(benchmark, bench_run, bench_case):
    bench_run(bench_case)
