"""The Triton RMSNorm / residual add (the model's norms on CUDA) against the eager formula: the sum
exactly as `x + residual` rounds it, the norm within what one last-bit change of the fp32 mean can
do (the kernel sums the squares in its own order). Interpreted on the CPU without a GPU."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, HAS_TRITON, TRITON_DEVICE, assert_norm_close, call_triton, ulps

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

EPS = 1e-5
CASES = [  # (x shape, weight shape)
    ((1, 1, 2048), (2048,)),
    ((3, 5, 96), (96,)),  # D not a power of two: a masked block
    ((2, 40, 64), (40, 64)),  # per-head weights stacked: q and k heads of a decode step
    ((7,), (7,)),
]


def eager(x, r, w, eps):
    s = x if r is None else x + r
    return s, w * F.rms_norm(s, (s.shape[-1],), None, eps)


@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("xs,ws", CASES, ids=[f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}" for x, w in CASES])
def test_triton_add_rms_norm_matches_eager(xs, ws, dtype, with_residual):
    from lfm_kernels.triton.rms_norm import add_rms_norm_triton, supports

    g = torch.Generator().manual_seed(sum(xs) * 7 + sum(ws))
    x = (torch.randn(xs, generator=g) * 3).to(dtype)
    r = (torch.randn(xs, generator=g) * 3).to(dtype) if with_residual else None
    w = (1 + 0.5 * torch.randn(ws, generator=g)).to(dtype)
    before = (x.clone(), None if r is None else r.clone())
    assert supports(x, w)
    s, y = call_triton(add_rms_norm_triton, x, r, w, EPS)
    assert torch.equal(x, before[0]) and (r is None or torch.equal(r, before[1]))
    es, ey = eager(x, r, w, EPS)
    assert s.dtype == y.dtype == dtype and y.shape == x.shape
    assert torch.equal(s, es)  # the add rounds exactly as the eager add
    assert_norm_close(y, ey, dtype)


def test_triton_norm_refuses_what_it_does_not_take():
    from lfm_kernels.triton.rms_norm import MAX_D, supports

    x = torch.randn(2, 64)
    assert not supports(x, torch.randn(64).bfloat16())  # mixed dtypes: eager type promotion
    assert not supports(x, torch.randn(32))
    assert not supports(torch.randn(2, MAX_D + 1), torch.randn(MAX_D + 1))
    assert not supports(x.double(), torch.randn(64, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: the model routes only CUDA tensors to the kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_model_norms_match_eager(dtype):
    """The model's entry points on CUDA (the kernel, compiled) against the eager ops: the real width
    and the per-head qk norm."""
    from lfm_kernels.model.model import add_rms_norm, rms_norm

    lim = 2 if dtype == torch.bfloat16 else 4
    x = torch.randn(4, 1, 2048, device=TRITON_DEVICE).to(dtype)
    r = torch.randn(4, 1, 2048, device=TRITON_DEVICE).to(dtype)
    w = torch.randn(2048, device=TRITON_DEVICE).to(dtype)
    s, y = add_rms_norm(x, r, w, EPS)
    es, ey = eager(x, r, w, EPS)
    assert torch.equal(s, es) and ulps(y, ey, dtype).max() <= lim
    assert ulps(rms_norm(x, w, EPS), eager(x, None, w, EPS)[1], dtype).max() <= lim
    qk, wh = torch.randn(4, 40, 64, device=TRITON_DEVICE).to(dtype), torch.randn(40, 64, device=TRITON_DEVICE).to(dtype)
    assert ulps(rms_norm(qk, wh, EPS), eager(qk, None, wh, EPS)[1], dtype).max() <= lim
