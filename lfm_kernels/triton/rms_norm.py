"""The model's RMSNorm, and the residual add before it, as one Triton kernel (GPU; run interpreted in
the CPU tests).

Eager PyTorch spends three kernels on each of a decode step's 55 norms (the add, F.rms_norm, the
weight product): about 0.26 ms of a 2.3 ms batch-1 step's kernel time on an H200, where every
kernel is a launch of a few microseconds over a 4 KB row. One program per row does the add (rounded
to x's dtype, as the eager add rounds it), the fp32 mean of squares, the normalisation rounded to
x's dtype, and the weight product rounded again: transformers' Lfm2MoeRMSNorm. Only the order of
the fp32 sum of squares differs from the eager ops (the C++ op on the CPU differs the same way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._checks import FLOAT_DTYPES
from ._common import round_to, tl_dtype

MAX_D = 16384  # one row in one block of registers; wider rows stay on the eager ops


@triton.jit
def _add_rms_norm_kernel(
    p_x, p_res, p_w, p_sum, p_out,
    D, R, s_x, s_res, eps,
    HAS_RES: tl.constexpr, XDT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_x = tl.load(p_x + i_row * s_x + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_RES:
        b_r = tl.load(p_res + i_row * s_res + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_x = round_to(b_x + b_r, XDT)
        tl.store(p_sum + i_row * D + o_d, b_x.to(p_sum.dtype.element_ty), mask=m_d)
    b_ms = tl.sum(b_x * b_x, axis=0) / D
    b_y = round_to(b_x / tl.sqrt(b_ms + eps), XDT)
    b_w = tl.load(p_w + (i_row % R) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(p_out + i_row * D + o_d, round_to(b_w * b_y, XDT).to(p_out.dtype.element_ty), mask=m_d)


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    """t as [rows, D] with unit stride along D (a view when it can be one)."""
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 or D == 1 else t2.contiguous()


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this call: x [..., D] (or [..., R, D] with weight [R, D]) in a
    float dtype, weight in x's dtype, D up to MAX_D."""
    D = x.shape[-1] if x.dim() else 0
    if not (1 <= D <= MAX_D) or weight.dtype != x.dtype or x.dtype not in FLOAT_DTYPES:
        return False
    if weight.dim() == 1:
        return weight.shape[0] == D
    return weight.dim() == 2 and x.dim() >= 2 and tuple(weight.shape) == tuple(x.shape[-2:])


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(x + residual, rms_norm(x + residual) * weight), or the norm of x alone when residual is None
    (then the first element is x itself). Callers check `supports(x, weight)` and that residual has
    x's shape and dtype."""
    D = x.shape[-1]
    R = weight.shape[0] if weight.dim() == 2 else 1
    x2 = _rows(x, D)
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x
    r2 = _rows(residual, D) if residual is not None else x2
    w = weight.contiguous()
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x2, r2, w, s, out, D, R, x2.stride(0), r2.stride(0), float(eps),
            HAS_RES=residual is not None, XDT=tl_dtype(x.dtype), BLOCK_D=triton.next_power_of_2(D),
            num_warps=4 if D <= 4096 else 8,
        )
    return s, out
