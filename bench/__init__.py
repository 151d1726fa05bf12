"""LongCat-Video benchmarks: `python -m bench` (CLI) and `pytest bench/ --benchmark-only`.

See bench/cli.py for the flags, bench/suites/ for the cases, bench/report.py for the README table.
"""
