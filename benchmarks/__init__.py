"""Benchmarks of imgpipe, run as modules from the repository root:

    .venv/bin/python -m benchmarks.bench_command [--quick]

Only light imports here: the scripts set OMP_WAIT_POLICY before torch loads.
"""
