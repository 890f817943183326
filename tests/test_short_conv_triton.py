"""Triton short conv against the reference, under the interpreter on CPU (or on CUDA when present)."""

import pytest
import torch

from conftest import HAS_CUDA, HAS_TRITON, TOL, assert_close, dtype_id

from lfm_kernels import reference

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = "cuda" if HAS_CUDA else "cpu"
SHAPES = [(1, 1, 5, 3), (2, 7, 130, 3), (3, 4, 33, 2), (2, 5, 20, 4), (1, 17, 67, 3)]


def _case_id(shape):
    b, t, d, l = shape
    return f"B{b}-T{t}-D{d}-L{l}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_short_conv_triton_matches_reference(shape, dtype, state, mask):
    from lfm_kernels.triton.short_conv import short_conv_triton

    b, t, d, l = shape
    # strided bcx: a slice of a wider buffer
    bcx = torch.randn(b, t, 3 * d + 5, device=DEVICE).to(dtype)[:, :, 2 : 2 + 3 * d]
    weight = torch.randn(d, l, device=DEVICE).to(dtype)
    bias = torch.randn(d, device=DEVICE).to(dtype) if mask else None
    s0 = torch.randn(b, d, l, device=DEVICE).to(dtype) if state else None
    m = (torch.rand(b, t, device=DEVICE) > 0.3) if mask else None
    s_out = s0.clone() if state else None
    s_ref = s0.clone() if state else None
    out = short_conv_triton(bcx, weight, bias, s_out, m)
    ref = reference.short_conv(bcx, weight, bias, s_ref, m)
    assert torch.isfinite(out).all()
    assert_close(out, ref, dtype)
    if state:
        assert torch.equal(s_out, s_ref), "conv state must be bit-exact (the kernel only moves B*x values)"
    assert TOL[dtype] > 0
