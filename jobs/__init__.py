"""Entry points: the `gen1` CLI, Ray Job entry scripts, job specs and benchmarks."""
