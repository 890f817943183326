"""Quantized weights: GGUF Q8_0 / Q4_0 blocks against the gguf package (the oracle llama.cpp
maintains), and the quantized `linear` against a float64 reference on the same quantized values.

Tolerance of the kernels: the reference dequantizes the weight and quantizes x exactly as the
kernels do (bit-identical activation blocks, checked separately), then sums exact products in
float64. A kernel's block dot products are exact integers, so the only difference is its fp32 sum
over K / 32 scaled blocks (and the fp32 product of the two scales): relative error < 2e-6 for fp32
outputs, the house bf16/fp16 tolerance (1e-2) when the output is rounded to those.
"""


import numpy as np
import pytest
import torch

from conftest import assert_close, dtype_id, num_threads, quant_isa_path, rel_err
from lfm_kernels import QuantizedTensor, _backend, linear, quantize
from lfm_kernels.quant import _linear_reference, _quantize_activations

gguf_quants = pytest.importorskip("gguf.quants", reason="the gguf package is the Q8_0/Q4_0 oracle (pip install gguf)")
from gguf import GGMLQuantizationType  # noqa: E402

HAS_EXT = _backend._C is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="CPU extension not built")

FORMATS = ["q8_0", "q4_0"]
GGML_TYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
FP32_TOL = 2e-6


def _gguf_quantize(w: torch.Tensor, fmt: str) -> np.ndarray:
    return gguf_quants.quantize(w.float().numpy(), GGML_TYPE[fmt])


def _gguf_dequantize(data: np.ndarray, fmt: str) -> np.ndarray:
    return gguf_quants.dequantize(data, GGML_TYPE[fmt])


# ---------------------------------------------------------------------------------------------
# The formats


def _adversarial(name: str) -> torch.Tensor:
    """[rows, K] weights for one edge case."""
    if name == "gaussian":
        return torch.randn(37, 320)
    if name == "wide_range":  # scales from 1e-4 to 1e4 across rows
        return torch.randn(16, 96) * torch.logspace(-4, 4, 16).unsqueeze(1)
    if name == "zeros_mixed":  # whole zero blocks among random ones
        w = torch.randn(6, 128)
        w[1] = 0
        w[3, 32:64] = 0
        return w
    if name == "one_huge":  # one value dwarfs its block: the rest quantize to 0 (or 8 in q4_0)
        w = torch.randn(5, 64)
        w[torch.arange(5), torch.randint(0, 64, (5,))] = 3e4
        return w
    if name == "negative_only":
        return -torch.rand(7, 64) - 0.01
    if name == "positive_only":
        return torch.rand(7, 64) + 0.01
    if name == "fp16_scale_overflow":  # d = max/127 (q8_0) or max/-8 (q4_0) beyond fp16's 65504
        w = torch.randn(4, 64)
        w[:, 5] = torch.tensor([1e8, -1e8, 6e5, 9e6])
        return w
    if name == "fp16_scale_subnormal":
        return torch.randn(4, 64) * 1e-5
    if name == "ties":  # x / d lands exactly on .5: round-half-away (q8_0) / trunc(+8.5) (q4_0)
        ramp = torch.arange(32, dtype=torch.float32) - 16.0
        q8 = torch.cat([torch.tensor([127.0]), ramp[1:] + 0.5])  # d = 1: x/d = k + 0.5
        q4 = torch.cat([torch.tensor([-8.0]), (ramp[1:] / 2).clamp(-7.5, 7.5)])  # d = 1
        return torch.stack([q8, -q8, q4, -q4])
    if name == "equal_magnitudes":  # q4_0 keeps the sign of the first of the largest values
        w = torch.randn(3, 32)
        w[0, 3], w[0, 9] = 2.0, -2.0
        w[1, 3], w[1, 9] = -2.0, 2.0
        return w
    raise AssertionError(name)


CASES = [
    "gaussian",
    "wide_range",
    "zeros_mixed",
    "one_huge",
    "negative_only",
    "positive_only",
    "fp16_scale_overflow",
    "fp16_scale_subnormal",
    "ties",
    "equal_magnitudes",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_matches_gguf(fmt, case):
    w = _adversarial(case)
    qt = quantize(w, fmt)
    ref = _gguf_quantize(w, fmt)
    assert qt.data.dtype == torch.uint8 and tuple(qt.data.shape) == ref.shape
    mism = np.argwhere(qt.data.numpy() != ref)
    assert mism.size == 0, f"{fmt} {case}: {len(mism)} bytes differ from gguf, first at {mism[0].tolist()}"
    # dequantize: the same values as gguf (NaN where gguf has NaN: inf scale times q = 0)
    out, ref_deq = qt.dequantize().numpy(), _gguf_dequantize(ref, fmt)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, ref_deq.reshape(out.shape))
    if case == "fp16_scale_overflow":
        assert np.isinf(out).any(), "an overflowing scale is stored as inf, as ggml does"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_quantize_low_precision_input_and_3d(fmt, dtype):
    """bf16 / fp16 weights quantize as their (exact) fp32 values; [E, N, K] stacks row by row."""
    w = torch.randn(3, 5, 96).to(dtype)
    qt = quantize(w, fmt)
    assert qt.shape == (3, 5, 96) and qt.format == fmt
    assert qt.nbytes == 3 * 5 * 3 * BLOCK_BYTES[fmt] == qt.data.numel()
    ref = _gguf_quantize(w.reshape(15, 96), fmt)
    assert np.array_equal(qt.data.reshape(15, -1).numpy(), ref)
    np.testing.assert_array_equal(qt.dequantize().reshape(15, 96).numpy(), _gguf_dequantize(ref, fmt))
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", FORMATS)
def test_gguf_bytes_roundtrip(fmt):
    """Blocks made by gguf (as a GGUF file holds them) wrap as a QuantizedTensor unchanged."""
    w = torch.randn(9, 64)
    raw = _gguf_quantize(w, fmt)
    qt = QuantizedTensor(torch.from_numpy(raw.copy()), fmt, (9, 64))
    np.testing.assert_array_equal(qt.dequantize().numpy(), _gguf_dequantize(raw, fmt))
    moved = qt.to("cpu")
    assert torch.equal(moved.data, qt.data) and moved.shape == qt.shape and "q" in repr(qt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_quantize_rejects_non_finite(fmt, bad):
    w = torch.randn(4, 64)
    w[2, 40] = bad
    with pytest.raises(ValueError, match=r"finite.*row 2, column 40"):
        quantize(w, fmt)


def test_quantize_bad_input():
    with pytest.raises(ValueError, match="K=48"):
        quantize(torch.randn(4, 48), "q4_0")
    with pytest.raises(ValueError, match="format"):
        quantize(torch.randn(4, 64), "q5_0")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        quantize(torch.randn(64), "q8_0")
    with pytest.raises(TypeError, match="dtype"):
        quantize(torch.randint(0, 9, (4, 64)), "q8_0")
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize(np.zeros((4, 64), np.float32), "q8_0")


def test_quantized_tensor_bad_input():
    data = torch.zeros(4, 2 * 18, dtype=torch.uint8)
    QuantizedTensor(data, "q4_0", (4, 64))  # valid
    with pytest.raises(ValueError, match=r"data must have shape \[4, 36\].*got \[4, 35\]"):
        QuantizedTensor(data[:, :35], "q4_0", (4, 64))
    with pytest.raises(ValueError, match=r"data must have shape \[4, 68\]"):
        QuantizedTensor(data, "q8_0", (4, 64))
    with pytest.raises(ValueError, match="K=40"):
        QuantizedTensor(data, "q4_0", (4, 40))
    with pytest.raises(TypeError, match="uint8"):
        QuantizedTensor(data.to(torch.int8), "q4_0", (4, 64))
    with pytest.raises(ValueError, match="format"):
        QuantizedTensor(data, "Q4_0", (4, 64))
    with pytest.raises(ValueError, match=r"\[N, K\] or \[E, N, K\]"):
        QuantizedTensor(data.reshape(-1), "q4_0", (4 * 64,))


# ---------------------------------------------------------------------------------------------
# Kernel paths

ISAS = ["portable", "avx2", "avxvnni", "avx512vnni"]


def _act_blocks(m: int, k: int, dtype) -> torch.Tensor:
    """Activations with the edge cases of the int8 step: a zero block, exact .5 ties, a big outlier."""
    x = torch.randn(m, k) * torch.logspace(-2, 2, m).unsqueeze(1)
    x[0, :32] = 0
    if k >= 64:
        x[-1, 32:64] = torch.arange(32) - 15.5  # amax 15.5 -> (x / d) hits .5 ties only if exact
        x[-1, 32] = 127.0  # d = 1: x * (1/d) = k - 15.5 exactly, ties to even
    if k >= 96:
        x[m // 2, 70] = 1e4
    return x.to(dtype)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_quantize_activations_bitwise(isa, dtype):
    x = _act_blocks(7, 160, dtype)
    x[3, 100] = float("nan")
    x[5, 10] = float("inf")
    with quant_isa_path(isa):
        q, d = torch.ops.lfm_kernels_cpu.quantize_activations(x)
    q_ref, d_ref = _quantize_activations(x)
    assert q.dtype == torch.int8 and d.dtype == torch.float32
    assert torch.equal(q, q_ref), f"int8 activations differ at {(q != q_ref).nonzero()[:5].tolist()}"
    assert torch.equal(d.isnan(), d_ref.isnan()) and d[3, 3].isnan() and d[5, 0].isnan()
    assert torch.equal(d.nan_to_num(), d_ref.nan_to_num())
    assert q.abs().max() <= 127


# (M, N, K): M in 1..4 runs the decode GEMV, >= 5 the blocked GEMM (4-row tiles, 64-row chunks:
# 7 and 300 leave tails); odd N leaves weight-row tails in both.
SHAPES = [
    (1, 37, 32),
    (2, 37, 32),
    (3, 37, 32),
    (7, 37, 32),
    (64, 37, 32),
    (300, 37, 32),
    (1, 67, 2048),
    (2, 67, 2048),
    (3, 67, 2048),
    (7, 67, 2048),
    (64, 67, 2048),
    (1, 19, 7168),
    (300, 19, 7168),
]


def _ids(shape):
    return "M{}-N{}-K{}".format(*shape)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_parity(isa, fmt, shape):
    m, n, k = shape
    w = torch.randn(n, k) / k**0.5
    qt = quantize(w, fmt)
    x = _act_blocks(m, k, torch.float32)
    ref = _linear_reference(x, qt)
    with quant_isa_path(isa):
        out = linear(x, qt)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    err = rel_err(out, ref)
    assert err < FP32_TOL, f"{isa} {fmt} M{m} N{n} K{k}: relative error {err:.3g} >= {FP32_TOL:g}"
    # and the quantization itself is a small perturbation of the float product
    assert rel_err(out, x.double() @ w.double().T) < (0.02 if fmt == "q8_0" else 0.2)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m", [1, 4, 9])
def test_linear_low_precision_x_bias_and_leading_dims(isa, dtype, m):
    k, n = 256, 45
    qt = quantize(torch.randn(n, k), "q4_0")
    x = torch.randn(2, m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    with quant_isa_path(isa):
        out = linear(x, qt, bias)
    assert out.dtype == dtype and out.shape == (2, m, n)
    ref = _linear_reference(x.reshape(-1, k), qt, bias).reshape(2, m, n)
    assert_close(out, ref, dtype, what=f"{isa} quantized linear {dtype}")


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bits_independent_of_threads_and_batch(isa, fmt):
    """Each output is one fixed-order sum: 1 and 2 threads give identical bits, and so does a row's
    position in the batch (among decode batches of 1..4 rows, and among prefill batches of 5+)."""
    k, n, m = 2048, 301, 70
    qt = quantize(torch.randn(n, k), fmt)
    x = torch.randn(m, k)
    with quant_isa_path(isa):
        with num_threads(1):
            one = linear(x, qt)
            first9 = linear(x[:9], qt)
            row = linear(x[5:6], qt)
            rows4 = linear(x[4:8], qt)
        with num_threads(2):
            two = linear(x, qt)
            row2 = linear(x[5:6], qt)
    assert torch.equal(one, two) and torch.equal(row, row2)
    assert torch.equal(first9, one[:9])
    assert torch.equal(row, rows4[1:2])
    # decode and prefill kernels sum in different orders (on the SIMD paths): fp32 rounding apart
    assert rel_err(row, one[5:6]) < FP32_TOL


@needs_ext
def test_linear_paths_agree():
    """The SIMD paths and the portable one sum the same exact block products: close to fp32 rounding."""
    k, n = 2048, 129
    qt = quantize(torch.randn(n, k), "q8_0")
    x = torch.randn(5, k)
    with quant_isa_path("portable"):
        ref = linear(x, qt)
    assert rel_err(linear(x, qt), ref) < FP32_TOL


@needs_ext
@pytest.mark.parametrize("m", [1, 6])
def test_linear_non_finite_activations(m):
    """A NaN / inf in x poisons only its own output row (its block's scale is NaN)."""
    k, n = 128, 33
    qt = quantize(torch.randn(n, k), "q4_0")
    x = torch.randn(m, k)
    x[m - 1, 70] = float("nan") if m == 1 else float("inf")
    out = linear(x, qt)
    assert out[m - 1].isnan().all()
    assert torch.isfinite(out[: m - 1]).all()


@needs_ext
def test_linear_strided_x():
    k, n = 256, 41
    qt = quantize(torch.randn(n, k), "q8_0")
    wide = torch.randn(9, 2 * k)
    x = wide[:, 7 : 7 + k]
    assert rel_err(linear(x, qt), _linear_reference(x.contiguous(), qt)) < FP32_TOL
    xt = torch.randn(k, 5).t()
    assert rel_err(linear(xt, qt), _linear_reference(xt.contiguous(), qt)) < FP32_TOL


def test_linear_quantized_bad_input():
    qt = quantize(torch.randn(16, 64), "q4_0")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., K=64\]"):
        linear(torch.randn(3, 32), qt)
    with pytest.raises(TypeError, match="x must have dtype"):
        linear(torch.randint(0, 3, (3, 64)), qt)
    with pytest.raises(ValueError, match=r"bias must have shape \[N=16\]"):
        linear(torch.randn(3, 64), qt, torch.randn(15))
    with pytest.raises(ValueError, match=r"quantized \[N, K\]"):
        linear(torch.randn(3, 64), quantize(torch.randn(2, 16, 64), "q8_0"))
    with pytest.raises(NotImplementedError, match="CPU only.*meta"):
        linear(torch.randn(3, 64, device="meta"), qt)


@needs_ext
def test_cpp_op_bad_input():
    op = torch.ops.lfm_kernels_cpu.linear_quant
    qt = quantize(torch.randn(16, 64), "q4_0")
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="qweight must hold 576 bytes"):
        op(x, qt.data[:, :-1], "q4_0", 16, 64, None)
    with pytest.raises(ValueError, match="qweight must hold 1088 bytes"):
        op(x, qt.data, "q8_0", 16, 64, None)
    with pytest.raises(ValueError, match="format"):
        op(x, qt.data, "q4_1", 16, 64, None)
    with pytest.raises(ValueError, match="multiple of 32"):
        op(torch.randn(3, 48), qt.data, "q4_0", 12, 48, None)
    with pytest.raises(ValueError, match=r"x must be \[M, K=64\]"):
        op(torch.randn(3, 32), qt.data, "q4_0", 16, 64, None)
    with pytest.raises(ValueError, match="unknown path"):
        torch.ops.lfm_kernels_cpu._quant_pin_isa("sse9")


@needs_ext
@pytest.mark.parametrize("m", [1, 5])
def test_opcheck(m):
    qt = quantize(torch.randn(24, 64), "q8_0")
    x = torch.randn(m, 64)
    for bias in (None, torch.randn(24)):
        args = (x, qt.data, "q8_0", 24, 64, bias)
        torch.library.opcheck(torch.ops.lfm_kernels.linear_quant.default, args)
        torch.library.opcheck(torch.ops.lfm_kernels_cpu.linear_quant.default, args)
    torch.library.opcheck(torch.ops.lfm_kernels_cpu.quantize_activations.default, (x,))
