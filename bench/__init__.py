"""Benchmarks: run from the repository root, e.g. `python -m bench.step_overhead` (see each module)."""
