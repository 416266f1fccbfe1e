"""Benchmark harness of vpns_fast: ``python -m bench CASE ...`` (see bench/README.md).

Each case (``bench/cases/``) owns one setup factory that both the speed runner
(``bench/runner.py``) and the pytest-benchmark suite (``bench/test_bench_ops.py``) use, so the
two always time the same inputs, implementations and baselines.
"""
