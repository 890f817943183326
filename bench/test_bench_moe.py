"""pytest-benchmark: moe, at the shapes of lfm_kernels/benchmark/moe.py (as `lfm-kernels bench`)."""

OP = "moe"


def test_moe(bench_case, impl, run_bench):
    run_bench(bench_case, impl)
