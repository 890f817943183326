"""pytest-benchmark: linear, at the shapes of lfm_kernels/benchmark/linear.py (as `lfm-kernels bench`)."""

OP = "linear"


def test_linear(bench_case, impl, run_bench):
    run_bench(bench_case, impl)
