"""LongCat-Video benchmarks: `python -m bench` (CLI) and `pytest bench/ --benchmark-only`.

See bench/cli.py for the flags, bench/suites/ for the cases, bench/timing.py for how a case is
timed (median, min, spread), bench/report.py for the README table. bench/dev/ holds the kernel
tuning and profiling scripts (the workshop, indexed in bench/dev/README.md); bench/results/ the
committed measurements (indexed in bench/results/README.md).
"""
