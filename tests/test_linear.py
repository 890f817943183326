"""lfm_kernels.linear against torch.nn.functional.linear computed in float64."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TOL, assert_close, dtype_id, rel_err
from lfm_kernels import _backend
from lfm_kernels._policy import DEFAULT_POLICY, get_policy, kernel_policy
from lfm_kernels.ops import linear as linear_mod
from lfm_kernels.ops.linear import linear

HAS_EXT = _backend._C is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="CPU extension not built")

# (M, N, K): decode rows 1-4 take the streaming GEMV, 5+ the blocked GEMM. K values hit the 16-wide
# GEMV blocks and the 8-wide packing with and without tails; N values hit the 6/4/3/2-row GEMV groups
# and the 16-column / 128-row GEMM panels with and without tails.
SHAPES = [
    (1, 1000, 777),
    (2, 1000, 777),
    (3, 37, 100),
    (4, 130, 64),
    (5, 1000, 777),
    (64, 257, 250),
    (300, 1000, 777),
    (1, 7, 15),
    (7, 17, 9),
    (13, 129, 263),
    (64, 33, 1),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WDTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _always_kernel():
    """These tests check the C++ kernel, so bf16 GEMMs must not be handed to torch's oneDNN."""
    with kernel_policy(kernel_only=True):
        yield


def _ref(x, w, b=None):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _ids(shape):
    return "M{}-N{}-K{}".format(*shape)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("w_dtype", WDTYPES, ids=dtype_id)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_parity(shape, x_dtype, w_dtype, with_bias):
    m, n, k = shape
    x = torch.randn(m, k).to(x_dtype)
    w = (torch.randn(n, k) / k**0.5).to(w_dtype)
    b = torch.randn(n).to(w_dtype) if with_bias else None
    out = linear(x, w, b)
    assert out.dtype == x_dtype and out.shape == (m, n)
    # the reference uses the same (already rounded) inputs, so any gap is the kernel's arithmetic plus
    # the rounding of the output to x's dtype
    assert_close(out, _ref(x, w, b), x_dtype, what=f"linear M{m} N{n} K{k}")


@needs_ext
@pytest.mark.parametrize("m", [1, 3, 5, 64])
@pytest.mark.parametrize("w_dtype", WDTYPES, ids=dtype_id)
def test_strided_x(m, w_dtype):
    """A row stride larger than K (a slice of a wider activation) is read in place; a transposed x is copied."""
    k, n = 300, 129
    wide = torch.randn(m, 2 * k + 3, dtype=torch.bfloat16)
    x = wide[:, 3 : 3 + k]
    assert x.stride(0) != k
    w = (torch.randn(n, k) / k**0.5).to(w_dtype)
    assert_close(linear(x, w), _ref(x, w), torch.bfloat16)
    xt = torch.randn(k, m, dtype=torch.float32).t()  # column stride m: not unit
    assert_close(linear(xt, w), _ref(xt, w), torch.float32)
    # stride-0 rows (a broadcast row) are a legal x too
    xb = torch.randn(1, k).expand(m, k)
    assert_close(linear(xb, w), _ref(xb, w), torch.float32)


@needs_ext
@pytest.mark.parametrize("lead", [(2, 3), (1, 1), (4, 1, 2)], ids=lambda s: "x".join(map(str, s)))
def test_leading_dims(lead):
    k, n = 96, 70
    x = torch.randn(*lead, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16)
    out = linear(x, w, b)
    assert out.shape == (*lead, n)
    assert_close(out, _ref(x, w, b), torch.bfloat16)
    # 3-D x whose flattening needs a copy
    xp = torch.randn(lead[-1], *lead[:-1], k, dtype=torch.bfloat16).movedim(0, -2)
    assert_close(linear(xp, w), _ref(xp, w), torch.bfloat16)


@needs_ext
@pytest.mark.parametrize("m", [0, 1, 6])
def test_empty(m):
    w = torch.randn(10, 8)
    out = linear(torch.randn(m, 8), w)
    assert out.shape == (m, 10) and torch.isfinite(out).all()
    # K = 0: the empty sum, bias only
    b = torch.randn(10)
    out = linear(torch.randn(m, 0), torch.randn(10, 0), b)
    assert out.shape == (m, 10) and torch.equal(out, b.expand(m, 10))
    # N = 0
    assert linear(torch.randn(m, 8), torch.randn(0, 8)).shape == (m, 0)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1000, 777), (3, 37, 100), (13, 129, 263), (64, 257, 250)], ids=_ids)
@pytest.mark.parametrize("w_dtype", WDTYPES, ids=dtype_id)
def test_portable_path(shape, w_dtype):
    m, n, k = shape
    x = torch.randn(m, 2 * k, dtype=torch.bfloat16)[:, ::2]  # non-unit column stride: copied
    w = (torch.randn(n, k) / k**0.5).to(w_dtype)
    b = torch.randn(n)
    with _backend.force_portable_cpu():
        assert _backend.cpu_isa() == "portable"
        out = linear(x, w, b)
    assert_close(out, _ref(x, w, b), torch.bfloat16)
    xf = torch.randn(m, k)
    with _backend.force_portable_cpu():
        out = linear(xf, w)
    assert_close(out, _ref(xf, w), torch.float32)


@needs_ext
def test_fp32_exact_tolerance_large_k():
    """fp32 accumulation over K = 7168 (the dense FFN's down projection) stays inside 1e-5."""
    x = torch.randn(9, 7168)
    w = torch.randn(40, 7168) / 7168**0.5
    for m in (1, 9):
        err = rel_err(linear(x[:m], w), _ref(x[:m], w))
        assert err < TOL[torch.float32], err


@needs_ext
def test_matches_eager_torch_bf16_rounding():
    """bf16 x bf16 weights: same rounding class as torch's F.linear (both accumulate in fp32)."""
    x = torch.randn(17, 512, dtype=torch.bfloat16)
    w = torch.randn(300, 512, dtype=torch.bfloat16) / 512**0.5
    ours, theirs, ref = linear(x, w), F.linear(x, w), _ref(x, w)
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref) + 1e-3


def test_opcheck():
    x = torch.randn(5, 24)
    w = torch.randn(10, 24, dtype=torch.bfloat16)
    b = torch.randn(10)
    from lfm_kernels.ops.linear import _linear_op

    for args in [(x, w, b), (x[:1], w, None), (x.bfloat16(), w.float(), None), (x[:, :16], w[:, :16].contiguous(), b)]:
        torch.library.opcheck(_linear_op, args)


def test_fallback_without_extension(monkeypatch):
    """No extension: torch's F.linear (weight cast to x's dtype), still right."""
    monkeypatch.setattr(_backend, "cpu_extension_available", lambda: False)
    x = torch.randn(2, 3, 40)
    w = torch.randn(8, 40, dtype=torch.bfloat16)
    out = linear(x, w)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8)
    assert_close(out, _ref(x, w), torch.float32)


def test_bad_input():
    x = torch.randn(4, 16)
    w = torch.randn(8, 16)
    with pytest.raises(TypeError, match="x"):
        linear(x.numpy(), w)
    with pytest.raises(TypeError, match="weight"):
        linear(x, [[1.0]])
    with pytest.raises(TypeError, match="x must have dtype"):
        linear(x.long(), w)
    with pytest.raises(TypeError, match="weight must have dtype"):
        linear(x, w.to(torch.int8))
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match=r"weight must have 2 dimensions"):
        linear(x, w[0])
    with pytest.raises(ValueError, match=r"weight must have shape \[N, K=16\]"):
        linear(x, torch.randn(8, 15))
    with pytest.raises(ValueError, match=r"bias must have shape \[N=8\]"):
        linear(x, w, torch.randn(7))
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        linear(x, w, torch.randn(1, 8))
    with pytest.raises(TypeError, match="bias must have dtype"):
        linear(x, w, torch.ones(8, dtype=torch.int32))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight is on"):
            linear(x, w.cuda())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_torch():
    x = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    assert_close(linear(x, w), _ref(x, w), torch.bfloat16)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1000, 777), (4, 37, 100), (13, 129, 263)], ids=_ids)
def test_fp16_weight(shape):
    """float16 weights are accepted too (widened with F16C in the fast path)."""
    m, n, k = shape
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = (torch.randn(n, k) / k**0.5).half()
    b = torch.randn(n, dtype=torch.float16)
    assert_close(linear(x, w, b), _ref(x, w, b), torch.bfloat16)
    with _backend.force_portable_cpu():
        assert_close(linear(x.float(), w), _ref(x.float(), w), torch.float32)


@pytest.mark.parametrize("m", [1, 2, 3, 16, 40])
def test_auto_policy(m):
    """Default policy: bf16 x bf16 with >= linear_onednn_min_rows rows goes to torch's GEMM only where the
    CPU has native bf16 dot products; either way the answer is right."""
    with kernel_policy(DEFAULT_POLICY):
        _check_auto_policy(m)


def _check_auto_policy(m):
    x = torch.randn(m, 200, dtype=torch.bfloat16)
    w = torch.randn(50, 200, dtype=torch.bfloat16) / 200**0.5
    b = torch.randn(50)
    out = linear(x, w, b)
    assert_close(out, _ref(x, w, b), torch.bfloat16)
    routed = m >= get_policy().linear_onednn_min_rows and linear_mod.cpu_has_native_bf16_gemm()
    assert linear_mod._use_torch_gemm(x, w) == routed
    if routed:
        assert torch.equal(out, F.linear(x, w, b.bfloat16()))
    assert not linear_mod._use_torch_gemm(x.float(), w)  # fp32 activations always take the kernel
    with kernel_policy(kernel_only=True):
        assert not linear_mod._use_torch_gemm(x, w)


@needs_ext
@pytest.mark.parametrize("m", [1, 3, 70])
def test_single_thread(m):
    """One thread: the workers run inline (no parallel region) and still cover every task."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(m, 333)
        w = torch.randn(515, 333, dtype=torch.bfloat16) / 333**0.5
        assert_close(linear(x, w), _ref(x, w), torch.float32)
    finally:
        torch.set_num_threads(prev)


# The AVX-512 GEMVs: K values around the 32-element steps, the 4x32 unrolled loop and the masked
# tails; N odd. bf16 x on bf16 weights takes the AVX512-BF16 dot product (M <= 2) where the CPU has
# it, other dtypes the FMA twin (both at M <= linear_avx512_max_rows).
AVX512_SHAPES = [(1, 7, 15), (1, 33, 31), (2, 33, 33), (1, 65, 128), (2, 129, 777), (1, 300, 2048), (2, 17, 2049)]


def _avx512_gemv():
    if not HAS_EXT or not _backend._C.cpu_supports_avx512():
        pytest.skip("needs AVX-512 (F/BW/VL/DQ): this CPU does not have it, so the AVX-512 GEMV cannot run here")
    return kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=2)


@needs_ext
@pytest.mark.parametrize("shape", AVX512_SHAPES, ids=_ids)
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_avx512_gemv_parity(shape, x_dtype, w_dtype, with_bias):
    m, n, k = shape
    big = torch.randn(m, k + 5).to(x_dtype)
    x = big[:, :k]  # row stride k + 5: the GEMV reads x through its stride
    w = (torch.randn(n, k) / k**0.5).to(w_dtype)
    b = torch.randn(n) if with_bias else None
    with _avx512_gemv():
        path = linear_mod._linear_path(x, w)
        out = linear(x, w, b)
    dot = x_dtype == w_dtype == torch.bfloat16 and _backend._C.cpu_supports_avx512bf16()
    assert path == ("avx512-bf16dot" if dot else "avx512")
    assert_close(out, _ref(x, w, b).to(x_dtype), x_dtype)
    # the AVX2 kernel on the same call agrees within the same bound
    with kernel_policy(DEFAULT_POLICY, linear_avx512_max_rows=0):
        assert linear_mod._linear_path(x, w) == "avx2"
        assert_close(linear(x, w, b), _ref(x, w, b).to(x_dtype), x_dtype)


@needs_ext
def test_avx512_gemv_special_values():
    """Inf and NaN in x propagate as in the reference; an all-zero weight row gives exactly the bias."""
    x = torch.randn(2, 96).to(torch.bfloat16)
    x[0, 5] = float("inf")
    x[1, 7] = float("nan")
    w = (torch.randn(40, 96) / 10).to(torch.bfloat16)
    w[3] = 0
    b = torch.randn(40)
    with _avx512_gemv():
        out = linear(x, w, b)
    ref = _ref(x, w, b)
    assert torch.isnan(out[1]).all() and torch.isnan(ref[1]).all()
    # row 0: inf * w[n, 5] is +-inf for every n but 3, where inf * 0 is NaN
    assert torch.equal(torch.isnan(out[0]), torch.isnan(ref[0])) and torch.isnan(out[0, 3])
    assert torch.equal(torch.isinf(out[0]), torch.isinf(ref[0]))
    inf = torch.isinf(ref[0])
    assert torch.equal(out[0].float()[inf], ref[0].float()[inf])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_fp32_weights_on_torch_gemm(x_dtype):
    """The fp32-weight hand-off (policy threshold reached) keeps the op's contract: products and sums
    in fp32, one rounding to x's dtype, bias in fp32; the caller's tensors unchanged."""
    from lfm_kernels.ops.linear import _linear_path

    x = torch.randn(9, 3, 64).to(x_dtype)
    w, b = torch.randn(33, 64) / 8, torch.randn(33)
    x0, w0 = x.clone(), w.clone()
    with kernel_policy(DEFAULT_POLICY, linear_fp32_torch_min_rows=4):  # not this module's kernel_only
        assert _linear_path(x.reshape(-1, 64), w) == "torch-fp32"
        out = linear(x, w, b)
        small = linear(x[:1, :1], w, b)  # 1 row: our kernel
    ref = (x.double() @ w.double().T + b.double()).to(x_dtype)
    assert out.dtype == x_dtype and out.shape == (9, 3, 33)
    assert_close(out, ref, x_dtype)
    assert_close(small, ref[:1, :1], x_dtype)
    assert torch.equal(x, x0) and torch.equal(w, w0)
