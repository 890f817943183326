"""K-quant weights (GGUF Q4_K, Q5_K, Q6_K) in `QuantizedTensor` and the quantized `linear`.

Dequantize is checked bit for bit against the gguf package (the decoder llama.cpp maintains). The
kernels are checked against a float64 reference on the same quantized values: the weight
dequantized, x quantized per 256 exactly as the kernels do, exact products. A kernel's per-sub-block
dot products and their scale-weighted sums are exact integers; what rounds is the fp32 combination
per super-block (d * S1 - dmin * S2, times the activation scale) and the fp32 sum over K / 256
super-blocks. Relative error < 2e-6 for fp32 outputs; 1e-2 (the house bf16 tolerance) when the
output is rounded to bf16 / fp16. Every path computes the same integers and fused fp32 steps, so
the portable and AVX2 paths, 1 and 2 threads, and a row's position in the batch give equal bits.
"""


import numpy as np
import pytest
import torch

from conftest import assert_close, dtype_id, num_threads, quant_isa_path, rel_err
from lfm_kernels import QuantizedTensor, _backend, linear, quantize
from lfm_kernels.quant import _linear_reference, _quantize_activations

gguf_quants = pytest.importorskip("gguf.quants", reason="the gguf package is the K-quant oracle (pip install gguf)")
from gguf import GGMLQuantizationType  # noqa: E402

HAS_EXT = _backend._C is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="CPU extension not built")

FORMATS = ["q4_k", "q5_k", "q6_k"]
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
FP32_TOL = 2e-6
ISAS = ["portable", "avx2", "avxvnni", "avx512vnni"]


def _gguf_dequantize(data: torch.Tensor, fmt: str) -> np.ndarray:
    return gguf_quants.dequantize(data.numpy(), GGMLQuantizationType[fmt.upper()])


def _weight(n: int, k: int) -> torch.Tensor:
    # rows of different magnitude and an outlier: sub-block scales and mins all over their range
    w = torch.randn(n, k) * torch.logspace(-1, 1, n).unsqueeze(1) / k**0.5
    w[n // 2, 3] = 5.0
    return w


def _act(m: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """Activations with a zero super-block, a big outlier and rows of very different scale."""
    x = torch.randn(m, k) * torch.logspace(-2, 2, m).unsqueeze(1)
    if k > 256:
        x[0, :256] = 0
    elif m > 1:
        x[m - 1] = 0
    if m > 1:
        x[m // 2, 70] = 1e4
    return x.to(dtype)


# ------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(3, 256), (5, 2048), (2, 3, 512)], ids=str)
def test_dequantize_equals_gguf(fmt, shape):
    w = torch.randn(shape) * 0.1
    w.view(-1)[7] = -3.0  # a sub-block dominated by one negative weight
    qt = quantize(w, fmt)
    assert qt.format == fmt and qt.shape == torch.Size(shape)
    assert qt.data.shape == (*shape[:-1], shape[-1] // 256 * BLOCK_BYTES[fmt])
    assert qt.nbytes == qt.data.numel()
    ours = qt.dequantize().numpy()
    ref = _gguf_dequantize(qt.data, fmt).reshape(shape)
    assert ours.dtype == np.float32
    diff = np.flatnonzero(ours.view(np.uint32) != ref.view(np.uint32))
    assert diff.size == 0, f"{fmt}: {diff.size} values differ from gguf, first at flat index {diff[0]}"
    # and the blocks stand for the weight (K-quant error on Gaussian weights: a few percent)
    assert rel_err(torch.from_numpy(ours), w) < (0.1 if fmt == "q4_k" else 0.05)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_random_bytes_equals_gguf(fmt):
    """Any byte pattern (every scale, min and high-bit combination) decodes as gguf decodes it."""
    data = torch.randint(0, 256, (7, 2 * BLOCK_BYTES[fmt]), dtype=torch.uint8)
    # fp16 factors finite, so that equality is not between NaNs
    offs = [208] if fmt == "q6_k" else [0, 2]
    for b in range(2):
        for o in offs:
            data[:, b * BLOCK_BYTES[fmt] + o + 1] &= 0x3B  # exponent < 31, sign kept
    ours = QuantizedTensor(data, fmt, (7, 512)).dequantize().numpy()
    ref = _gguf_dequantize(data, fmt).reshape(7, 512)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_kquant_bad_input(fmt):
    with pytest.raises(ValueError, match=f"multiple of 256 for {fmt}, got K=288"):
        quantize(torch.randn(4, 288), fmt)
    with pytest.raises(ValueError, match=f"multiple of 256 for {fmt}, got K=128"):
        QuantizedTensor(torch.zeros(4, BLOCK_BYTES[fmt] // 2, dtype=torch.uint8), fmt, (4, 128))
    with pytest.raises(ValueError, match=rf"data must have shape \[4, {BLOCK_BYTES[fmt]}\]"):
        QuantizedTensor(torch.zeros(4, BLOCK_BYTES[fmt] - 1, dtype=torch.uint8), fmt, (4, 256))
    with pytest.raises(ValueError, match="finite"):
        quantize(torch.full((2, 256), float("nan")), fmt)
    with pytest.raises(ValueError, match="format must be one of"):
        quantize(torch.randn(2, 256), fmt.upper())


# ------------------------------------------------------------------------------------ kernels

# (M, N, K): M in 1..4 runs the decode GEMV, >= 5 the blocked GEMM (4-row tiles: 7 leaves a tail;
# 300 splits M into several tasks); odd N leaves weight-row tails in both (and partial 8-row groups
# in the SIMD path's packed panels).
SHAPES = [(m, 67, 256) for m in (1, 2, 3, 7, 64, 300)] + [(m, 37, 2048) for m in (1, 2, 3, 7, 64, 300)]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_parity(isa, fmt, shape):
    m, n, k = shape
    w = _weight(n, k)
    qt = quantize(w, fmt)
    x = _act(m, k)
    ref = _linear_reference(x, qt)
    with quant_isa_path(isa):
        out = linear(x, qt)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    err = rel_err(out, ref)
    assert err < FP32_TOL, f"{isa} {fmt} M{m} N{n} K{k}: relative error {err:.3g} >= {FP32_TOL:g}"
    # each row on its own scale: the worst row within tolerance too
    row_err = max(rel_err(out[i], ref[i]) for i in range(m) if ref[i].norm() > 0)
    assert row_err < 1e-5, f"{isa} {fmt}: worst row relative error {row_err:.3g}"
    # and the quantization itself is a small perturbation of the float product
    assert rel_err(out, x.double() @ w.double().T) < 0.2


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_activation_blocks_are_256(fmt):
    """The reference quantizes x per 256: a kernel quantizing per 32 would miss it by far more than
    the tolerance on activations with a wide range inside a super-block."""
    k, n = 512, 33
    qt = quantize(_weight(n, k), fmt)
    x = torch.randn(3, k) * torch.logspace(-3, 1, k)
    out = linear(x, qt)
    assert rel_err(out, _linear_reference(x, qt)) < FP32_TOL
    q32, d32 = _quantize_activations(x, 32)
    per32 = (q32.double().reshape(3, -1, 32) * d32.double().unsqueeze(-1)).reshape(3, k) @ qt.dequantize(torch.float64).T
    assert rel_err(out, per32) > 100 * FP32_TOL


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m", [1, 9])
def test_linear_low_precision_x_bias_and_leading_dims(isa, fmt, dtype, m):
    k, n = 512, 45
    qt = quantize(_weight(n, k), fmt)
    x = torch.randn(2, m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    with quant_isa_path(isa):
        out = linear(x, qt, bias)
    assert out.dtype == dtype and out.shape == (2, m, n)
    ref = _linear_reference(x.reshape(-1, k), qt, bias).reshape(2, m, n)
    assert_close(out, ref, dtype, what=f"{isa} {fmt} linear {dtype}")


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_bits_equal_across_paths_threads_and_batch(fmt):
    """Same integers, same fused fp32 steps: portable == AVX2, 1 thread == 2 threads, and a row's
    result does not depend on the batch around it (decode GEMV or prefill GEMM)."""
    k, n, m = 2048, 301, 70
    qt = quantize(_weight(n, k), fmt)
    x = torch.randn(m, k)
    results = {}
    for isa in ("portable", "avx2"):
        if isa == "avx2" and "avx2" not in torch.ops.lfm_kernels_cpu._quant_isa_info()[1:]:
            continue  # the portable-only checks below still run; avx2 is skipped visibly in test_linear_parity
        with quant_isa_path(isa):
            with num_threads(1):
                one = linear(x, qt)
                row = linear(x[5:6], qt)
                rows4 = linear(x[4:8], qt)
                first9 = linear(x[:9], qt)
            with num_threads(2):
                two = linear(x, qt)
                row2 = linear(x[5:6], qt)
        assert torch.equal(one, two) and torch.equal(row, row2), isa
        assert torch.equal(row, one[5:6]) and torch.equal(rows4, one[4:8]) and torch.equal(first9, one[:9]), isa
        results[isa] = one
    if "avx2" in results:
        assert torch.equal(results["avx2"], results["portable"])


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 6])
def test_linear_non_finite_activations(fmt, m):
    """A NaN / inf in x poisons only its own output row (its super-block's scale is NaN)."""
    k, n = 512, 33
    qt = quantize(_weight(n, k), fmt)
    x = torch.randn(m, k)
    x[m - 1, 300] = float("nan") if m == 1 else float("inf")
    out = linear(x, qt)
    assert out[m - 1].isnan().all()
    assert torch.isfinite(out[: m - 1]).all()


@needs_ext
def test_cpp_op_bad_input():
    op = torch.ops.lfm_kernels_cpu.linear_kquant
    qt = quantize(_weight(16, 512), "q4_k")
    x = torch.randn(3, 512)
    with pytest.raises(ValueError, match="qweight must hold 4608 bytes"):
        op(x, qt.data[:, :-1], "q4_k", 16, 512, None)
    with pytest.raises(ValueError, match="qweight must hold 6720 bytes"):
        op(x, qt.data, "q6_k", 16, 512, None)
    with pytest.raises(ValueError, match="multiple of 256 for q5_k"):
        op(torch.randn(3, 96), qt.data, "q5_k", 16, 96, None)
    with pytest.raises(ValueError, match=r"x must be \[M, K=512\]"):
        op(torch.randn(3, 256), qt.data, "q4_k", 16, 512, None)
    with pytest.raises(ValueError, match="format must be 'q4_k', 'q5_k' or 'q6_k', got 'q3_k'"):
        op(x, qt.data, "q3_k", 16, 512, None)
    with pytest.raises(ValueError, match="format must be 'q4_k', 'q5_k' or 'q6_k', got 'q8_0'"):
        op(x, qt.data, "q8_0", 16, 512, None)
    # the Q8_0 / Q4_0 op takes no K-quant (its own unit: linear_kquant)
    with pytest.raises(ValueError, match="K-quants: linear_kquant"):
        torch.ops.lfm_kernels_cpu.linear_quant(x, qt.data, "q4_k", 16, 512, None)


def test_linear_kquant_bad_input():
    qt = quantize(_weight(16, 256), "q6_k")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., K=256\]"):
        linear(torch.randn(3, 512), qt)
    with pytest.raises(ValueError, match=r"bias must have shape \[N=16\]"):
        linear(torch.randn(3, 256), qt, torch.randn(15))


@needs_ext
@pytest.mark.parametrize("m", [1, 5])
def test_opcheck(m):
    qt = quantize(_weight(24, 256), "q4_k")
    x = torch.randn(m, 256)
    for bias in (None, torch.randn(24)):
        args = (x, qt.data, "q4_k", 24, 256, bias)
        torch.library.opcheck(torch.ops.lfm_kernels.linear_quant.default, args)
        torch.library.opcheck(torch.ops.lfm_kernels_cpu.linear_kquant.default, args)
