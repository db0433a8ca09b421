"""Benchmarks behind ``sparsekernels bench`` (and the pytest-benchmark suites in bench/)."""
