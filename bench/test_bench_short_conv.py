"""pytest-benchmark: short_conv, at the shapes of lfm_kernels/benchmark/short_conv.py (as `lfm-kernels bench`)."""

OP = "short_conv"


def test_short_conv(bench_case, impl, run_bench):
    run_bench(bench_case, impl)
