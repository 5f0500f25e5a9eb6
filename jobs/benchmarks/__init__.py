"""Benchmarks: run as scripts (`python jobs/benchmarks/<name>.py`); see each module\x27s docstring."""
