"""Benchmarks with JSON results (run from the repository root: python -m benchmarks.NAME)."""
