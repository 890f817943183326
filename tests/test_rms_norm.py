"""The model's RMSNorm (C++ op on the CPU) against transformers' formula: fp32 normalisation rounded to
x's dtype, then the weight product rounded again. The op sums the squares in another order than eager
PyTorch, so the reference takes the mean in float64 and the comparison allows what one last-bit change
of the fp32 mean can do: a one-step rounding change in a few elements."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_norm_close, ulps

from lfm_kernels import _backend
from lfm_kernels.model.model import _cpu_rms_norm, add_rms_norm, rms_norm

EPS = 1e-5

pytestmark = pytest.mark.skipif(
    _backend._C is None or not hasattr(torch.ops.lfm_kernels_cpu, "rms_norm"),
    reason="needs the compiled CPU extension (lfm_kernels._C with the rms_norm op)",
)


def reference(x, w, eps):
    xd = x.double()
    r = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    normed = (xd * r).to(x.dtype)
    return (w.double() * normed.double()).to(x.dtype)


CASES = [  # (x shape, weight shape)
    ((1, 2048), (2048,)),
    ((3, 7, 2048), (2048,)),
    ((2, 2051), (2051,)),
    ((5,), (5,)),
    ((2, 40, 64), (40, 64)),  # per-head weights stacked: q and k heads of a decode step
    ((300, 256), (256,)),  # enough rows for the threaded path
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("xs,ws", CASES, ids=[f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}" for x, w in CASES])
def test_rms_norm_matches_reference(xs, ws, dtype):
    g = torch.Generator().manual_seed(hash((xs, ws)) % 2**31)
    x = (torch.randn(xs, generator=g) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(ws, generator=g)).to(dtype)
    x_before = x.clone()
    out = _cpu_rms_norm()(x, w, EPS)
    assert torch.equal(x, x_before)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    ref = reference(x, w, EPS)
    assert_norm_close(out, ref, dtype)
    # the model's entry point takes the op, and the eager formula it replaces agrees the same way
    assert torch.equal(rms_norm(x, w, EPS), out)
    eager = w * F.rms_norm(x, (x.shape[-1],), None, EPS)
    assert ulps(out, eager, dtype).max() <= (4 if dtype == torch.float32 else 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("xs,ws", CASES, ids=[f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}" for x, w in CASES])
def test_avx2_rows_give_the_portable_bits(xs, ws, dtype):
    """The AVX2 row (vectors of 8, a scalar tail) keeps the portable row's operations and order."""
    from conftest import cpu_isa_path

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(xs, generator=g) * 3).to(dtype)
    r = (torch.randn(xs, generator=g) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(ws, generator=g)).to(dtype)
    runs = {}
    for isa in ("portable", "avx2"):
        with cpu_isa_path(isa):
            runs[isa] = (torch.ops.lfm_kernels_cpu.rms_norm(x, w, EPS), *torch.ops.lfm_kernels_cpu.add_rms_norm(x, r, w, EPS))
    for a, b in zip(runs["portable"], runs["avx2"]):
        assert torch.equal(a, b)


def test_rms_norm_is_thread_count_independent():
    x = torch.randn(700, 2048).bfloat16()
    w = torch.randn(2048).bfloat16()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpu_rms_norm()(x, w, EPS)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(_cpu_rms_norm()(x, w, EPS), one)


def test_rms_norm_bad_input():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="weight must be"):
        _cpu_rms_norm()(x, torch.randn(32), EPS)
    with pytest.raises(RuntimeError, match="dtype"):
        _cpu_rms_norm()(x, torch.randn(64).bfloat16(), EPS)
    # the model's entry point falls back to eager PyTorch for mixed dtypes (type promotion as transformers)
    w = torch.randn(64, dtype=torch.float64)
    assert rms_norm(x, w, EPS).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("xs,ws", CASES, ids=[f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}" for x, w in CASES])
def test_add_rms_norm_is_the_add_then_the_norm(xs, ws, dtype):
    """The fused residual add: the sum exactly as `x + residual` rounds it, the norm exactly the op's."""
    g = torch.Generator().manual_seed(hash((xs, ws, 1)) % 2**31)
    x = (torch.randn(xs, generator=g) * 3).to(dtype)
    r = (torch.randn(xs, generator=g) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(ws, generator=g)).to(dtype)
    before = (x.clone(), r.clone())
    s, y = torch.ops.lfm_kernels_cpu.add_rms_norm(x, r, w, EPS)
    assert torch.equal(x, before[0]) and torch.equal(r, before[1])
    assert s.dtype == y.dtype == dtype and s.shape == y.shape == x.shape
    assert torch.equal(s, x + r)
    assert torch.equal(y, _cpu_rms_norm()(x + r, w, EPS))
    s2, y2 = add_rms_norm(x, r, w, EPS)  # the model's entry point takes the op
    assert torch.equal(s2, s) and torch.equal(y2, y)
    # a non-contiguous input reads the same values
    xt = x.unsqueeze(0).expand(2, *x.shape)[1]
    assert torch.equal(torch.ops.lfm_kernels_cpu.add_rms_norm(xt, r, w, EPS)[1], y)


def test_add_rms_norm_bad_input():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        torch.ops.lfm_kernels_cpu.add_rms_norm(x, torch.randn(1, 64), torch.randn(64), EPS)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        torch.ops.lfm_kernels_cpu.add_rms_norm(x, torch.randn(2, 64).bfloat16(), torch.randn(64), EPS)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.lfm_kernels_cpu.add_rms_norm(x, x, torch.randn(32), EPS)
    # the model's entry point falls back to eager PyTorch where the op does not apply (broadcasting)
    r, w = torch.randn(1, 64), torch.randn(64)
    s, y = add_rms_norm(x, r, w, EPS)
    assert torch.equal(s, x + r) and torch.equal(y, rms_norm(x + r, w, EPS))
