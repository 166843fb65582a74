"""Benchmarks, run as `python -m bench.NAME`; each writes its figures into bench/RESULTS_*.md."""
