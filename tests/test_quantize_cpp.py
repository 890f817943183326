"""The C++ weight quantizer (lfm_kernels_cpu::quantize_rows, behind lfm_kernels.quantize on CPU
tensors): byte-identical blocks to gguf.quants (Q8_0 / Q4_0) and to our numpy K-quant search
(Q4_K / Q5_K / Q6_K) on random and adversarial weights, for fp32 / bf16 / fp16 input, the same
bytes on 1 and 2 threads, and bad input."""

import zlib

import numpy as np
import pytest
import torch

from lfm_kernels import _backend, kquants, quantize
from lfm_kernels.quant import _quantize_reference

gguf_quants = pytest.importorskip("gguf.quants", reason="the gguf package is the Q8_0/Q4_0 oracle (pip install gguf)")
from gguf import GGMLQuantizationType  # noqa: E402
from conftest import num_threads

HAS_OP = _backend._C is not None and hasattr(torch.ops.lfm_kernels_cpu, "quantize_rows")
pytestmark = pytest.mark.skipif(not HAS_OP, reason="CPU extension (with quantize_rows) not built")

GGML_TYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _op(x: torch.Tensor, fmt: str) -> np.ndarray:
    return torch.ops.lfm_kernels_cpu.quantize_rows(x, fmt).numpy()


def _assert_same_blocks(ours: np.ndarray, ref: np.ndarray, block_bytes: int, what: str) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.uint8, (ours.shape, ref.shape)
    bad = np.argwhere((ours.reshape(-1, block_bytes) != ref.reshape(-1, block_bytes)).any(1)).ravel()
    assert bad.size == 0, f"{what}: {bad.size} of {ours.size // block_bytes} blocks differ, first block {bad[0]}"


# ----------------------------------------------------------------------------------- Q8_0 / Q4_0


def _adversarial_32(name: str, g: torch.Generator) -> torch.Tensor:
    """[rows, K] weights for one edge case of the 32-blocks."""
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "gaussian":
        return r(37, 320)
    if name == "wide_range":  # scales from 1e-30 to 1e30 across rows
        return r(21, 96) * torch.logspace(-30, 30, 21).unsqueeze(1)
    if name == "zeros_mixed":
        w = r(6, 128)
        w[1] = 0
        w[3, 32:64] = 0
        w[4, 64:96] = -0.0
        return w
    if name == "one_huge":
        w = r(5, 64)
        w[torch.arange(5), torch.randint(0, 64, (5,), generator=g)] = 3e4
        return w
    if name == "negative_only":
        return -torch.rand(7, 64, generator=g) - 0.01
    if name == "fp16_scale_overflow":  # d beyond fp16's 65504: stored as inf
        w = r(4, 64)
        w[:, 5] = torch.tensor([1e8, -1e8, 6e5, 9e6])
        w[:, 40] = torch.tensor([3e38, -3e38, 1e30, 8.3e6])
        return w
    if name == "fp16_scale_subnormal":  # d below fp16's 6.1e-5 (and below its 6e-8: flushed to 0)
        return r(6, 64) * torch.tensor([1e-5, 1e-6, 3e-7, 1e-8, 1e-10, 5e-3]).unsqueeze(1)
    if name == "fp32_subnormal":  # 1 / d overflows: ggml's division by a subnormal scale
        return r(3, 64) * 1e-39
    if name == "ties":  # x / d lands exactly on .5: round-half-away (q8_0) / trunc(+8.5) (q4_0)
        ramp = torch.arange(32, dtype=torch.float32) - 16.0
        q8 = torch.cat([torch.tensor([127.0]), ramp[1:] + 0.5])
        q4 = torch.cat([torch.tensor([-8.0]), (ramp[1:] / 2).clamp(-7.5, 7.5)])
        return torch.stack([q8, -q8, q4, -q4])
    if name == "equal_magnitudes":  # q4_0 keeps the sign of the first of the largest values
        w = r(3, 32)
        w[0, 3], w[0, 9] = 2.0, -2.0
        w[1, 3], w[1, 9] = -2.0, 2.0
        return w
    raise AssertionError(name)


CASES_32 = ["gaussian", "wide_range", "zeros_mixed", "one_huge", "negative_only", "fp16_scale_overflow",
            "fp16_scale_subnormal", "fp32_subnormal", "ties", "equal_magnitudes"]


@pytest.mark.parametrize("case", CASES_32)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_q8_0_q4_0_match_gguf(fmt, case):
    w = _adversarial_32(case, torch.Generator().manual_seed(zlib.crc32(case.encode())))
    ref = gguf_quants.quantize(w.numpy(), GGML_TYPE[fmt])
    _assert_same_blocks(_op(w, fmt), ref, 34 if fmt == "q8_0" else 18, f"{fmt} {case}")
    # and quantize() takes the C++ op for it
    _assert_same_blocks(quantize(w, fmt).data.numpy(), ref, 34 if fmt == "q8_0" else 18, f"quantize {fmt} {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_q8_0_q4_0_dtypes(fmt, dtype):
    """bf16 / fp16 rows quantize as their exact fp32 values, read directly by the op."""
    w = torch.randn(19, 224).to(dtype)
    ref = gguf_quants.quantize(w.float().numpy(), GGML_TYPE[fmt])
    _assert_same_blocks(_op(w, fmt), ref, 34 if fmt == "q8_0" else 18, f"{fmt} {dtype}")


# ----------------------------------------------------------------------------------- K-quants

K_FORMATS = ["q4_k", "q5_k", "q6_k"]
K_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def _adversarial_256(name: str, rng: np.random.Generator) -> np.ndarray:
    n = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if name == "gaussian":
        return n(24, 768) * rng.uniform(0.01, 3, (24, 1)).astype(np.float32)
    if name == "wide_range":  # row scales 1e-30 .. 1e15
        return n(10, 256) * np.logspace(-30, 15, 10, dtype=np.float32)[:, None]
    if name == "zeros":
        x = n(3, 512)
        x[0] = 0
        x[1, 256:] = 0
        x[2, 32:64] = 0  # one zero sub-block in a live super-block
        return x
    if name == "constant":
        return np.full((2, 256), 0.37, np.float32) * np.array([[1], [-1]], np.float32)
    if name == "negative_only":
        return -np.abs(n(3, 256)) - 0.01
    if name == "positive_only":
        return np.abs(n(3, 256)) + 2
    if name == "one_huge":
        x = n(3, 256)
        x[np.arange(3), [5, 77, 255]] = [1e4, -3e5, 7e3]
        return x
    if name == "subnormal":  # fp32 subnormals: the reciprocal scales overflow
        return n(2, 256) * np.float32(1e-40)
    if name == "sparse":
        return np.where(np.arange(256) % 37 == 0, n(2, 256), 0).astype(np.float32)
    if name == "bf16_grid":  # few distinct values: ties in the search's comparisons
        return np.round(n(4, 512) * 4) / 4
    raise AssertionError(name)


CASES_256 = ["gaussian", "wide_range", "zeros", "constant", "negative_only", "positive_only", "one_huge", "subnormal",
             "sparse", "bf16_grid"]


@pytest.mark.parametrize("case", CASES_256)
@pytest.mark.parametrize("fmt", K_FORMATS)
def test_k_quants_match_numpy(fmt, case):
    x = _adversarial_256(case, np.random.default_rng(zlib.crc32(f"{fmt} {case}".encode())))
    with np.errstate(all="ignore"):
        ref = kquants.quantize(x, fmt)
    _assert_same_blocks(_op(torch.from_numpy(x), fmt), ref, K_BYTES[fmt], f"{fmt} {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", K_FORMATS)
def test_k_quants_dtypes_and_3d(fmt, dtype):
    w = torch.randn(2, 5, 512).to(dtype)
    ref = kquants.quantize(w.float().numpy(), fmt)
    qt = quantize(w, fmt)
    assert qt.shape == (2, 5, 512) and qt.format == fmt
    _assert_same_blocks(qt.data.numpy(), ref, K_BYTES[fmt], f"{fmt} {dtype}")
    _assert_same_blocks(qt.data.numpy(), _quantize_reference(w, fmt).data.numpy(), K_BYTES[fmt], "reference path")


# ----------------------------------------------------------------------------------- threads, chunks


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q6_k"])
def test_threads_give_identical_bytes(fmt):
    w = torch.randn(67, 1024)
    with num_threads(1):
        one = _op(w, fmt)
    with num_threads(2):
        two = _op(w, fmt)
    assert np.array_equal(one, two)


def test_quantize_chunks_and_strided_rows():
    """quantize() feeds the op a chunk of rows at a time (and a contiguous copy of strided rows):
    the same bytes as one call on the whole contiguous weight, and as the torch reference."""
    w = torch.randn(3, 700, 64)
    whole = _op(w.reshape(-1, 64).contiguous(), "q4_0")
    strided = torch.randn(64, 2100).T.reshape(3, 700, 64)  # not contiguous
    strided.copy_(w)
    assert not strided.is_contiguous()
    qt = quantize(strided, "q4_0")
    assert np.array_equal(qt.data.reshape(-1, whole.shape[1]).numpy(), whole)
    assert np.array_equal(qt.data.numpy(), _quantize_reference(w, "q4_0").data.numpy())
    # more rows than one chunk (4M weights)
    big = torch.randn(4200, 1024, dtype=torch.bfloat16)
    qb = quantize(big, "q8_0")
    _assert_same_blocks(qb.data.numpy(), gguf_quants.quantize(big.float().numpy(), GGML_TYPE["q8_0"]), 34, "chunked")


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_raises(fmt, bad):
    w = torch.randn(4, 512)
    w[2, 300] = bad
    w[3, 10] = bad
    with pytest.raises(ValueError, match=r"rows must be finite.* at row 2, column 300"):
        _op(w, fmt)
    with pytest.raises(ValueError, match=rf"weight must be finite to quantize to {fmt}.*flat row 2, column 300"):
        quantize(w, fmt)
    big = torch.randn(5000, 1024)  # the bad weight in the second of quantize()'s chunks
    big[4500, 7] = bad
    with pytest.raises(ValueError, match=r"flat row 4500, column 7"):
        quantize(big, fmt)


def test_op_bad_input():
    op = torch.ops.lfm_kernels_cpu.quantize_rows
    with pytest.raises(ValueError, match=r"rows must be contiguous"):
        op(torch.randn(64, 8).T, "q8_0")
    with pytest.raises(ValueError, match=r"rows must be float32, bfloat16 or float16"):
        op(torch.randn(4, 64).double(), "q8_0")
    with pytest.raises(ValueError, match=r"rows must be float32, bfloat16 or float16"):
        op(torch.ones(4, 64, dtype=torch.int32), "q4_0")
    with pytest.raises(ValueError, match=r"rows' K .* multiple of 32 for q4_0"):
        op(torch.randn(4, 48), "q4_0")
    with pytest.raises(ValueError, match=r"rows' K .* multiple of 256 for q6_k"):
        op(torch.randn(4, 320), "q6_k")
    with pytest.raises(ValueError, match=r"rows must have shape \[R, K\]"):
        op(torch.randn(2, 4, 64), "q8_0")
    with pytest.raises(ValueError, match=r"format must be one of"):
        op(torch.randn(4, 64), "q5_0")
    assert op(torch.randn(0, 64), "q8_0").shape == (0, 68)
