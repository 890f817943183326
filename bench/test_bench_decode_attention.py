"""pytest-benchmark: decode_attention, at the shapes of lfm_kernels/benchmark/decode_attention.py (as `lfm-kernels bench`)."""

OP = "decode_attention"


def test_decode_attention(bench_case, impl, run_bench):
    run_bench(bench_case, impl)
