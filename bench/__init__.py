"""Benchmarks: run with ``python -m bench.<name>``; figures are measured, never recorded."""
