"""Benchmark cases shared by `lfm-kernels bench` and bench/ (one module per op)."""
